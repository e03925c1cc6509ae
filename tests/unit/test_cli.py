"""The CLI: bad input -> exit 2 with one line naming the problem, before any backend is
touched; ``jobs list`` / ``jobs get`` / ``jobs recover`` against a temporary state dir."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

import imgprep.cli
import imgprep.jobs
from imgprep.cli import EXIT_INVALID, EXIT_OK, HumanEvents, format_boot_report, main
from imgprep.jobstore import JobStore, Record
from imgprep.lock import VmLock, lock_key
from imgprep.workflow import new_record

VM = "3a9f0c2e-5b1d-4c8e-9f7a-6d2e1b0c4a5f"
OTHER_VM = "7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"


class Touched(AssertionError):
    pass


class ForbiddenBackend:
    """Looking the class up is fine (build_request reads ``default_script``, ``default_compression``,
    ``needs_host`` and ``verification_available``); creating one means the CLI went past input
    validation."""

    default_script: ClassVar[str] = "operator_scripts/linux-prepare-image"
    default_compression: ClassVar[str] = "zstd"
    needs_host: ClassVar[bool] = False
    verification_available: ClassVar[bool] = True

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        raise Touched("a backend was instantiated for invalid input")


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated environment; yields the (not yet existing) state dir."""
    state = tmp_path / "state"
    monkeypatch.setenv("IMGPREP_STATE_DIR", str(state))
    monkeypatch.delenv("IMGPREP_CONFIG", raising=False)
    monkeypatch.setattr(imgprep.jobs, "backend_class", lambda _name: ForbiddenBackend)

    def no_job(*_args: Any, **_kwargs: Any) -> None:
        raise Touched("a job was created for invalid input")

    monkeypatch.setattr(imgprep.cli, "Job", no_job)
    # and should anything reach for the hypervisor anyway, make that fail too
    monkeypatch.setitem(sys.modules, "libvirt", None)
    monkeypatch.setitem(sys.modules, "imgprep.backends.libvirt", None)
    return state


def call(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def assert_invalid(argv: list[str], *fragments: str, state: Path) -> str:
    code, out, err = call(*argv)
    assert code == EXIT_INVALID, err
    assert out == ""
    assert err.startswith("imgprep: error: ")
    assert err.endswith("\n")
    assert err.count("\n") == 1, f"not one line: {err!r}"
    for fragment in fragments:
        assert fragment in err
    assert not state.exists()  # nothing was touched, not even the state dir
    return err


def script(tmp_path: Path) -> Path:
    path = tmp_path / "prepare.sh"
    path.write_text("#!/bin/sh\nexit 0\n")
    return path


# --- create: invalid input -------------------------------------------------------------


def test_missing_vm(cli: Path) -> None:
    assert_invalid(["create"], "the following arguments are required: --vm", state=cli)


def test_no_command(cli: Path) -> None:
    assert_invalid([], "command", state=cli)


def test_bad_compression(cli: Path, tmp_path: Path) -> None:
    assert_invalid(
        ["create", "--vm", VM, "--compression", "lz4", "--output-dir", str(tmp_path)],
        "--compression",
        "'lz4'",
        state=cli,
    )


@pytest.mark.parametrize("value", ["-5", "0", "soon"])
def test_bad_timeout(cli: Path, tmp_path: Path, value: str) -> None:
    assert_invalid(
        ["create", "--vm", VM, "--prepare-timeout", value, "--output-dir", str(tmp_path)],
        "--prepare-timeout",
        repr(value),
        state=cli,
    )


def test_unreadable_script(cli: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.sh"
    assert_invalid(
        ["create", "--vm", VM, "--script", str(missing), "--output-dir", str(tmp_path)],
        f"script {missing}: cannot read: No such file or directory",
        state=cli,
    )
    assert_invalid(
        ["create", "--vm", VM, "--script", str(tmp_path), "--output-dir", str(tmp_path)],
        f"script {tmp_path}: cannot read: Is a directory",
        state=cli,
    )


def test_script_without_shebang(cli: Path, tmp_path: Path) -> None:
    path = tmp_path / "prepare.sh"
    path.write_text("rm -f /etc/ssh/ssh_host_*\n")
    assert_invalid(
        ["create", "--vm", VM, "--script", str(path), "--output-dir", str(tmp_path)],
        "must start with a #! line",
        state=cli,
    )


def test_manifest_invalid_json(cli: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text('{\n  "name": "x",,\n}\n')
    assert_invalid(
        ["create", "--vm", VM, "--manifest", str(manifest), "--output-dir", str(tmp_path)],
        f"manifest {manifest}:2: invalid JSON",
        state=cli,
    )


def test_manifest_bad_fields_are_all_named(cli: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"os": "dos", "requirements": {"min_ram": -1}, "state": "active"}))
    assert_invalid(
        ["create", "--vm", VM, "--manifest", str(manifest), "--output-dir", str(tmp_path)],
        "manifest .os:",
        "manifest .requirements.min_ram:",
        "manifest .state:",
        state=cli,
    )


def test_manifest_missing(cli: Path, tmp_path: Path) -> None:
    assert_invalid(
        ["create", "--vm", VM, "--manifest", str(tmp_path / "m.json"), "--output-dir", str(tmp_path)],
        "cannot read: No such file or directory",
        state=cli,
    )


def test_bad_name_and_version_flags(cli: Path, tmp_path: Path) -> None:
    assert_invalid(
        ["create", "--vm", VM, "--name", "has space", "--version", "1+2", "--output-dir", str(tmp_path)],
        "manifest .name:",
        "manifest .version:",
        state=cli,
    )


def test_bad_config_yaml_names_the_line(cli: Path, tmp_path: Path) -> None:
    config = tmp_path / "imgprep.yaml"
    config.write_text("compression: zstd\ntimeouts:\n  boot: [5\n")
    err = assert_invalid(["create", "--vm", VM, "--config", str(config)], f"config file {config}:", state=cli)
    assert "invalid YAML" in err


def test_bad_config_keys_all_reported(cli: Path, tmp_path: Path) -> None:
    config = tmp_path / "imgprep.yaml"
    config.write_text("frobnicate: 1\ncompression: lz4\n")
    assert_invalid(
        ["create", "--vm", VM, "--config", str(config)],
        f"{config}:1: frobnicate: unknown key",
        f"{config}:2: compression: must be one of",
        state=cli,
    )


def test_config_from_environment(cli: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "imgprep.yaml"
    config.write_text("frobnicate: 1\n")
    monkeypatch.setenv("IMGPREP_CONFIG", str(config))
    assert_invalid(["create", "--vm", VM], f"{config}:1: frobnicate: unknown key", state=cli)


def test_missing_output_dir(cli: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    assert_invalid(
        ["create", "--vm", VM, "--script", str(script(tmp_path)), "--output-dir", str(missing)],
        f"output directory {missing} does not exist",
        state=cli,
    )


def test_output_dir_is_a_file(cli: Path, tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    assert_invalid(["create", "--vm", VM, "--output-dir", str(path)], "does not exist", state=cli)


def test_output_dir_not_writable(cli: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # We run as root here, for whom mode bits do not deny writing; so the permission
    # answer is faked, for that one directory only.
    out = tmp_path / "readonly"
    out.mkdir(mode=0o555)
    real_access = os.access

    def access(path: Any, mode: int, **kwargs: Any) -> bool:
        if Path(path) == out and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    assert_invalid(
        ["create", "--vm", VM, "--output-dir", str(out)],
        f"output directory {out} is not writable",
        state=cli,
    )


def test_output_dir_others_can_write_is_refused(cli: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o1777)  # like /tmp: anyone could plant names in it
    assert_invalid(["create", "--vm", VM, "--output-dir", str(out)], "writable by its group or others", state=cli)


def test_every_input_problem_in_one_line(cli: Path, tmp_path: Path) -> None:
    err = assert_invalid(
        [
            "create",
            "--vm",
            VM,
            "--script",
            str(tmp_path / "nope.sh"),
            "--output-dir",
            str(tmp_path / "nope"),
            "--name",
            "bad name",
        ],
        "script",
        "output directory",
        "manifest .name",
        state=cli,
    )
    assert err.count("; ") >= 2


def test_guard_would_notice_a_backend(cli: Path, tmp_path: Path) -> None:
    """Control: valid input does reach the (forbidden) job, so the tests above prove something.

    (The CLI reports any crash in one line -- a traceback only with --debug -- so the
    guard's exception shows as an internal error.)"""
    code, out, err = call("create", "--vm", VM, "--script", str(script(tmp_path)), "--output-dir", str(tmp_path))
    assert (code, out) == (1, "")
    assert "Touched: a job was created for invalid input" in err
    assert err.count("\n") == 1  # one line, no traceback


# --- jobs -------------------------------------------------------------------------------


def make_job(store: JobStore, vm: str, execution: str, *, touched: bool, restored: bool, created_at: str) -> Record:
    record = new_record(
        name=f"create-from-vm-{vm}",
        params={
            "vm": vm,
            "vm_uuid": vm,
            "backend": "libvirt",
            "image_uuid": "00000000-0000-4000-8000-00000000000" + created_at[-2],
            "output_dir": "/tmp",
        },
        chain=["validate", "stop_vm"],
        onerror=["restore_disks"],
        timeout=1200,
    )
    record.update(execution=execution, vm_touched=touched, vm_restored=restored, created_at=created_at)
    store.save(record)
    return record


@pytest.fixture
def jobs(cli: Path) -> dict[str, Record]:
    store = JobStore(cli)
    return {
        "ok": make_job(store, VM, "succeeded", touched=True, restored=True, created_at="2024-01-01T00:00:01Z"),
        "broken": make_job(store, VM, "failed", touched=True, restored=False, created_at="2024-01-01T00:00:02Z"),
        "live": make_job(store, OTHER_VM, "running", touched=True, restored=False, created_at="2024-01-01T00:00:03Z"),
        "queued": make_job(store, OTHER_VM, "queued", touched=False, restored=False, created_at="2024-01-01T00:00:04Z"),
    }


@pytest.fixture
def live_lock(cli: Path) -> Iterator[None]:
    """The "live" job's process: it holds its VM's lock."""
    with VmLock(cli, lock_key("libvirt", OTHER_VM)):
        yield


def test_jobs_list_json_flags_the_job_needing_recovery(jobs: dict[str, Record], live_lock: None) -> None:
    code, out, err = call("jobs", "list", "--json")
    assert code == EXIT_OK, err
    rows = json.loads(out)
    assert [r["uuid"] for r in rows] == [jobs[k]["uuid"] for k in ("ok", "broken", "live", "queued")]
    assert {r["uuid"]: r["needs_recovery"] for r in rows} == {
        jobs["ok"]["uuid"]: False,
        jobs["broken"]["uuid"]: True,
        jobs["live"]["uuid"]: False,  # touched, not restored, but its process is alive
        jobs["queued"]["uuid"]: False,
    }
    assert rows[1]["vm"] == VM
    assert rows[1]["execution"] == "failed"


def test_jobs_list_human(jobs: dict[str, Record], live_lock: None) -> None:
    code, out, _ = call("jobs", "list")
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].split() == ["JOB", "VM", "EXECUTION", "CREATED", "NOTE"]
    flagged = [ln for ln in lines if "NEEDS RECOVERY" in ln]
    assert len(flagged) == 1
    assert flagged[0].startswith(jobs["broken"]["uuid"])
    assert flagged[0].endswith(f"NEEDS RECOVERY: imgprep jobs recover {jobs['broken']['uuid']}")


def test_a_dead_live_job_needs_recovery(jobs: dict[str, Record]) -> None:
    """Without its lock holder, the "running" job is an interrupted one."""
    code, out, _ = call("jobs", "list", "--json")
    assert code == EXIT_OK
    flagged = {r["uuid"] for r in json.loads(out) if r["needs_recovery"]}
    assert flagged == {jobs["broken"]["uuid"], jobs["live"]["uuid"]}


def test_jobs_get(jobs: dict[str, Record], live_lock: None) -> None:
    code, out, err = call("jobs", "get", jobs["broken"]["uuid"])
    assert code == EXIT_OK, err
    record = json.loads(out)
    assert record["uuid"] == jobs["broken"]["uuid"]
    assert record["needs_recovery"] is True
    assert record["running"] is False
    assert record["chain"] == [{"name": "validate"}, {"name": "stop_vm"}]
    assert err == ""  # no boot report in this record
    code, out, _ = call("jobs", "get", jobs["live"]["uuid"])
    assert code == EXIT_OK
    record = json.loads(out)
    assert record["running"] is True
    assert record["needs_recovery"] is False


def test_jobs_get_prints_the_boot_report(cli: Path) -> None:
    store = JobStore(cli)
    record = make_job(store, VM, "succeeded", touched=True, restored=True, created_at="2024-01-01T00:00:05Z")
    record["boot_report"] = {
        "timeline_ms": {"kernel_to_userspace": 1500.0, "unit_start": 20100.0},
        "services": ["systemd-journald.service"],
        "late_services": [],
        "targets": {"sysinit.target": "inactive"},
    }
    store.save(record)
    code, _, err = call("jobs", "get", record["uuid"])
    assert code == EXIT_OK
    assert "operator-script unit start  20.10s" in err
    assert "of those, regular services  none" in err
    assert "sysinit.target=inactive" in err


def test_jobs_get_unknown(cli: Path) -> None:
    JobStore(cli)
    code, out, err = call("jobs", "get", "nope")
    assert code == EXIT_INVALID
    assert out == ""
    assert err == "imgprep: error: no job nope\n"


def test_jobs_recover_an_untouched_interrupted_job(jobs: dict[str, Record]) -> None:
    """Nothing to roll back, so no backend is needed; the record stops claiming to be queued."""
    code, out, err = call("jobs", "recover", jobs["queued"]["uuid"], "--json")
    assert code == EXIT_OK, err
    assert json.loads(out) == {
        "job_uuid": jobs["queued"]["uuid"],
        "execution": "failed",
        "recovery": "nothing to do: the VM was never touched",
    }
    record = JobStore(Path(os.environ["IMGPREP_STATE_DIR"])).get(jobs["queued"]["uuid"])
    assert record["error"]["code"] == "Interrupted"


HOSTILE = "\x1b[2K\rimgprep: job succeeded\nimgprep: forged line"


def test_guest_text_in_a_failed_step_cannot_rewrite_the_terminal() -> None:
    err = io.StringIO()
    HumanEvents(err).emit(
        {"event": "step", "step": "wait_result", "status": "failed", "error": {"message": HOSTILE}, "elapsed": 1.0}
    )
    text = err.getvalue()
    assert "\x1b" not in text
    assert "\r" not in text
    assert text.count("\n") == 1  # one line, however many the guest sent
    assert "\\x1b[2K\\rimgprep: job succeeded\\nimgprep: forged line" in text


def test_guest_text_in_the_boot_report_is_escaped() -> None:
    report = {"services": [HOSTILE], "late_services": [], "targets": {"a": HOSTILE}, "timeline_ms": {}}
    text = format_boot_report(report)
    assert "\x1b" not in text
    assert "\r" not in text
    assert len(text.splitlines()) == 8  # the report's own lines only
