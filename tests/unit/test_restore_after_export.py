"""A restore that fails after a good export keeps the image: the job fails with exit 3
and says what to run (the old rollback ran discard_output and deleted the image)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

import imgprep.jobs
from imgprep.cli import EXIT_OK, EXIT_UNRESTORED, main
from imgprep.config import Config
from imgprep.errors import ImgprepError, RestoreFailed, TransientError
from imgprep.jobs import recover
from imgprep.jobstore import JobStore
from tests.api.fakebackend import FakeBackend, add_vm, open_gate

VM = "5d0f3a52-8a57-4a0e-9d8e-6c2f9b1e0a11"


class RestoreFails(FakeBackend):
    def restore_disks(self) -> None:
        raise ImgprepError("revert failed: the disk is locked")


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "world"
    add_vm(root, VM, "proto")
    open_gate(root, VM)
    monkeypatch.setenv("IMGPREP_FAKE_WORLD", str(root))
    monkeypatch.setenv("IMGPREP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("IMGPREP_CONFIG", raising=False)
    (tmp_path / "out").mkdir()
    return root


def create(tmp_path: Path, backend: type[Any], monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict[str, Any], str]:
    monkeypatch.setattr(imgprep.jobs, "backend_class", lambda _name: backend)
    out, err = io.StringIO(), io.StringIO()
    code = main(["create", "--vm", VM, "--output-dir", str(tmp_path / "out"), "--json"], out=out, err=err)
    return code, json.loads(out.getvalue().splitlines()[-1]), err.getvalue()


def test_the_image_is_kept_and_the_job_fails_with_exit_3(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, summary, err = create(tmp_path, RestoreFails, monkeypatch)
    assert code == EXIT_UNRESTORED, err
    assert summary["execution"] == "failed"
    assert "is complete and was kept" in err
    assert f"imgprep jobs recover {summary['job_uuid']}" in err
    image = Path(summary["file"])
    assert image.exists()
    assert (image.parent / f"{summary['image_uuid']}.imgmanifest").exists()
    store = JobStore(tmp_path / "state")
    manifest, file_path, _ = store.get_image(summary["image_uuid"])
    assert (manifest["state"], file_path) == ("active", str(image))
    record = store.get(summary["job_uuid"])
    assert record["onerror_results"] == []  # discard_output never ran
    assert record["vm_restored"] is False


def test_control_with_a_working_restore_the_job_succeeds(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, summary, err = create(tmp_path, FakeBackend, monkeypatch)
    assert code == EXIT_OK, err
    assert summary["execution"] == "succeeded"
    assert Path(summary["file"]).exists()


class FlakyRestore(FakeBackend):
    """restore_disks fails once with a transient error, then works."""

    calls = 0

    def restore_disks(self) -> None:
        type(self).calls += 1
        if type(self).calls == 1:
            raise TransientError("libvirtd restarted")
        super().restore_disks()


@pytest.mark.parametrize("attempts", [1, 2])
def test_recover_honours_the_configured_retry_policy(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attempts: int
) -> None:
    code, summary, _ = create(tmp_path, RestoreFails, monkeypatch)
    assert code == EXIT_UNRESTORED
    FlakyRestore.calls = 0
    monkeypatch.setattr(imgprep.jobs, "backend_class", lambda _name: FlakyRestore)
    config = Config(state_dir=tmp_path / "state", retry_attempts=attempts, retry_max_seconds=30)
    if attempts == 1:  # no retry allowed: the transient failure stays a failure
        with pytest.raises(RestoreFailed):
            recover(config, summary["job_uuid"])
        assert FlakyRestore.calls == 1
    else:
        record = recover(config, summary["job_uuid"])
        assert record["vm_restored"] is True
        assert FlakyRestore.calls == 2
        assert JobStore(tmp_path / "state").get_image(summary["image_uuid"])[0]["state"] == "active"
