"""build_request: input checks that need no hypervisor, and per-backend defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgprep.config import Config
from imgprep.errors import InvalidInput
from imgprep.jobs import build_request


def test_default_compression_is_the_backends(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path, output_dir=tmp_path)
    assert build_request(config, vm="vm1").compression == "zstd"
    assert build_request(config, vm="vm1", backend="smartos", host="cn1").compression == "gzip"


def test_configured_compression_wins_over_the_backend_default(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path, output_dir=tmp_path, compression="xz")
    assert build_request(config, vm="vm1", backend="smartos", host="cn1").compression == "xz"
    assert build_request(config, vm="vm1", compression="none").compression == "none"


def test_default_script_is_the_backends(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path, output_dir=tmp_path)
    assert build_request(config, vm="vm1").script_name == "linux-prepare-image"
    assert build_request(config, vm="vm1", backend="smartos", host="cn1").script_name == "smartos-prepare-image"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    config = Config(state_dir=tmp_path, output_dir=tmp_path / "missing")
    with pytest.raises(InvalidInput) as info:
        build_request(config, vm="vm1", compression="lz4", script=tmp_path / "nope", backend="smartos")
    problems = info.value.problems
    assert any("compression" in p for p in problems)
    assert any("output directory" in p for p in problems)
    assert any("script" in p for p in problems)
    assert any("--host" in p for p in problems)


def test_strict_comes_from_the_config_unless_given(tmp_path: Path) -> None:
    plain = Config(state_dir=tmp_path, output_dir=tmp_path)
    strict = Config(state_dir=tmp_path, output_dir=tmp_path, strict=True)
    assert build_request(plain, vm="vm1").strict is False
    assert build_request(strict, vm="vm1").strict is True
    assert build_request(plain, vm="vm1", strict=True).strict is True
    assert build_request(strict, vm="vm1", strict=False).strict is False
