"""imgprep.limits (what IMGAPI accepts) and the export step's warning / --strict error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imgprep.backends.base import Backend, CreateRequest, JobState, VmFacts
from imgprep.channel import GuestStatus
from imgprep.config import Config
from imgprep.errors import ImgprepError
from imgprep.export import ExportResult
from imgprep.limits import MAX_FILE_BYTES, violations


def entry(size: int, compression: str = "gzip") -> dict[str, Any]:
    return {"size": size, "compression": compression, "sha1": "x", "format": "raw"}


def test_within_the_limits_is_no_violation() -> None:
    for compression in ("none", "gzip", "bzip2", "xz"):
        assert violations([entry(MAX_FILE_BYTES, compression)]) == []  # exactly 20 GiB is accepted


def test_over_20_gib_is_a_violation() -> None:
    (problem,) = violations([entry(MAX_FILE_BYTES + 1)])
    assert "IMGAPI accepts at most 20 GiB" in problem
    assert str(MAX_FILE_BYTES + 1) in problem


def test_unknown_compression_and_several_files() -> None:
    assert violations([entry(1, "zstd")]) == ["compression 'zstd': IMGAPI accepts none, gzip, bzip2, xz"]
    assert violations([entry(1), entry(1)]) == ["2 files: IMGAPI takes 1 file per image"]


class Engine:
    """The little of the workflow engine the export step uses."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {"state": {}, "vm_touched": True}
        self.events: list[dict[str, Any]] = []
        self.before_save: Any = None

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def save(self) -> None:
        pass


class SizedExport(Backend[JobState]):
    """Only ``export``: it reports a file of a given size."""

    name = "sized"
    default_script = "operator_scripts/linux-prepare-image"
    state_type = JobState
    size = 0

    def export(self) -> ExportResult:
        return ExportResult(Path("/nonexistent/image.raw.gz"), self.size, "a", "b", "gzip", "raw")

    def locate(self) -> str:
        raise NotImplementedError

    def validate(self) -> VmFacts:
        raise NotImplementedError

    def inject(self) -> None: ...
    def boot_prepare(self) -> None: ...
    def poll_guest(self) -> tuple[GuestStatus, bool]:
        raise NotImplementedError


def export_step(size: int, *, strict: bool) -> tuple[Engine, SizedExport]:
    engine = Engine()
    request = CreateRequest(
        vm="vm1",
        image_uuid="00000000-0000-4000-8000-000000000001",
        manifest={},
        script=b"#!/bin/sh\n",
        script_name="s",
        compression="gzip",
        output_dir=Path("/nonexistent"),
        strict=strict,
    )
    backend = SizedExport(Config(), engine, request)  # type: ignore[arg-type]
    backend.size = size
    backend._export_step()
    return engine, backend


def test_an_oversized_export_is_a_warning() -> None:
    engine, backend = export_step(MAX_FILE_BYTES + 1, strict=False)
    assert [e["event"] for e in engine.events] == ["warning"]
    assert backend.record["warnings"] == violations([{"size": MAX_FILE_BYTES + 1, "compression": "gzip"}])
    assert backend.state.export is not None
    assert backend.state.export["size"] == MAX_FILE_BYTES + 1


def test_an_oversized_export_fails_under_strict() -> None:
    with pytest.raises(ImgprepError, match="exceeds what IMGAPI accepts") as info:
        export_step(MAX_FILE_BYTES + 1, strict=True)
    assert info.value.code == "ImgapiLimit"


def test_control_a_fitting_export_is_silent_under_strict() -> None:
    engine, backend = export_step(MAX_FILE_BYTES, strict=True)
    assert engine.events == []
    assert "warnings" not in backend.record
