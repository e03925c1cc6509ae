"""Fault injection against the real test guest: nothing is lost, whatever breaks.

Every case ends with the same checks: the prototype's disk is block-identical to a copy
taken before the job (``qemu-img compare``), no checkpoint remains, the VM's run state
is what it was, the output directory holds no image of a failed job, and the job
record says what happened. Each passing case adds a row to the reliability table
printed at the end of the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from imgprep import artifacts
from imgprep import pointintime as pit
from imgprep.config import Config
from imgprep.jobs import chain_names
from tests.e2e.conftest import REPO, CliResult, Prototype, no_verify
from tests.e2e.test_create import TIMEOUTS, inspect_disk

pytestmark = pytest.mark.e2e

# Every create and always step, from the chains themselves: a new step gets SIGKILL
# coverage. Clone mode (the default): every step; in place: the steps it does not share
# with the clone (the shared ones are the same code).
NAMES = {capture: chain_names(Config(), "libvirt", capture) for capture in ("clone", "in-place")}
ORDER = {capture: [*names["create"], *names["always"]] for capture, names in NAMES.items()}
STEPS = [
    (capture, chain, step)
    for capture, names in NAMES.items()
    for chain, steps in (("chain_results", names["create"]), ("always_results", names["always"]))
    for step in steps
    if capture == "clone" or step not in ORDER["clone"]
]


class RunningJob:
    """``imgprep create --json`` as a child process, its events read as they come."""

    def __init__(self, args: list[str], state_dir: Path) -> None:
        env = {**os.environ, "IMGPREP_STATE_DIR": str(state_dir)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgprep", "create", "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self._stderr.extend(self.proc.stderr)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._queue.put(json.loads(line))
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"event not seen in {timeout}s; got {self.events[-3:]}") from None
            if event is None:
                raise AssertionError(f"imgprep exited before the event; last events {self.events[-3:]}")
            self.events.append(event)
            if predicate(event):
                return event

    def wait_step(self, step: str, status: str = "started", chain: str = "chain_results") -> dict[str, Any]:
        return self.wait_for(
            lambda e: (
                e.get("event") == "step"
                and e.get("step") == step
                and e.get("status") == status
                and e.get("chain") == chain
            )
        )

    def finish(self, timeout: float = 900) -> CliResult:
        self.proc.wait(timeout=timeout)
        while True:  # the reader thread ends with None once stdout is closed
            item = self._queue.get(timeout=30)
            if item is None:
                break
            self.events.append(item)
        time.sleep(0.5)  # let the stderr thread drain the closed pipe
        stderr = "".join(self._stderr)
        sys.stderr.write(stderr)
        return CliResult(self.proc.returncode, "\n".join(json.dumps(e) for e in self.events), stderr)

    @property
    def job_uuid(self) -> str:
        return str(self.events[0]["job_uuid"])


@pytest.fixture
def start_job(state_dir: Path) -> Iterator[Callable[..., RunningJob]]:
    jobs: list[RunningJob] = []

    def start(*args: str, verify: bool = False) -> RunningJob:
        """``--no-verify`` unless ``verify`` (conftest.no_verify)."""
        job = RunningJob(no_verify(["create", *args], verify)[1:], state_dir)
        jobs.append(job)
        return job

    yield start
    for job in jobs:
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


def reference_copy(proto: Prototype, tmp_path: Path) -> Path:
    reference = tmp_path / "before.qcow2"
    subprocess.run(["cp", "--sparse=always", str(proto.disk), str(reference)], check=True)
    return reference


def assert_restored_exactly(proto: Prototype, reference: Path, output_dir: Path, *, image_kept: bool = False) -> None:
    assert not proto.is_running()
    assert proto.snapshots() == []
    compare = subprocess.run(
        ["qemu-img", "compare", str(reference), str(proto.disk)], capture_output=True, text=True, check=False
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    if image_kept:  # killed while restoring after a good export: the finished image stays
        assert sorted(p.suffix for p in output_dir.iterdir()) == [".imgmanifest", ".qcow2"]
    else:
        assert list(output_dir.iterdir()) == [], "a failed job leaves no image behind"


def assert_no_traces(proto: Prototype) -> None:
    """For a prototype that ran again: shut it down and look for anything imgprep injected."""
    proto.wait_console("login:")  # an ACPI request during early boot is dropped
    proto.shutdown()
    facts = inspect_disk(proto.disk)
    assert facts["traces"] == []
    assert facts["ssh_host_keys"], "the prototype's own identity was restored"
    assert facts["machine_id"].strip() not in ("", "uninitialized")


def wait_agent(proto: Prototype) -> None:
    """A running prototype's agent answers (clone mode then freezes, never stops it)."""
    deadline = time.monotonic() + 300
    while not pit.agent_answers(proto.dom):
        assert time.monotonic() < deadline, "the guest agent never answered"
        time.sleep(1)


def clone_leftovers(proto: Prototype, job_uuid: str) -> list[str]:
    """The clone and verification domains, a backup job on the prototype, the view and
    verification directories."""
    found = [d.name() for d in proto.conn.listAllDomains() if d.name().startswith(f"imgprep-{job_uuid[:8]}")]
    if proto.is_running():
        with contextlib.suppress(libvirt.libvirtError):  # no job: an error
            found.append(f"backup job {proto.dom.backupGetXMLDesc(0)[:80]}")
    views = [Config().view_dir / job_uuid, pit.SOCKET_ROOT / job_uuid]
    views += [Config().view_dir / f"{job_uuid}.verify", pit.SOCKET_ROOT / f"{job_uuid}.verify"]  # verifyboot.py
    return found + [str(p) for p in views if p.exists()]


def job_record(imgprep: Any, job_uuid: str) -> dict[str, Any]:
    result = imgprep("jobs", "get", job_uuid)
    assert result.returncode == 0, result.stderr
    record: dict[str, Any] = json.loads(result.stdout)
    return record


# --- SIGKILL during every step, then `imgprep jobs recover` -------------------------------


@pytest.mark.parametrize(("capture", "chain", "step"), STEPS, ids=[f"{c}-{step}" for c, _, step in STEPS])
def test_sigkill_during_step_then_recover(
    capture: str,
    chain: str,
    step: str,
    make_prototype: Callable[..., Prototype],
    start_job: Callable[..., RunningJob],
    imgprep: Any,
    output_dir: Path,
    tmp_path: Path,
    reliability: Callable[..., None],
) -> None:
    # these steps act on a running VM (the clone's capture: a backup job under a freeze)
    running = step in ("stop_vm", "restart_vm", "capture")
    proto = make_prototype()
    if running:
        proto.start()
        wait_agent(proto)
    reference = None if running else reference_copy(proto, tmp_path)
    definition = proto.persistent_xml()
    dom_id = proto.dom.ID() if running else None

    # the verification boot runs (minutes) only for the steps about it
    job = start_job(
        "--vm", proto.uuid, "--capture", capture, "--output-dir", str(output_dir), *TIMEOUTS,
        verify=step in ("verify", "discard_verify"),
    )  # fmt: skip
    job.wait_step(step, chain=chain)
    job.proc.send_signal(signal.SIGKILL)
    assert job.finish().returncode == -signal.SIGKILL

    listed = json.loads(imgprep("jobs", "list", "--json").stdout)
    (entry,) = [j for j in listed if j["uuid"] == job.job_uuid]
    touched = job_record(imgprep, job.job_uuid)["vm_touched"]
    assert entry["needs_recovery"] is touched
    if touched:
        refused = imgprep("create", "--vm", proto.uuid, "--output-dir", str(output_dir))
        assert refused.returncode == 2
        assert "imgprep jobs recover" in refused.stderr

    first = imgprep("jobs", "recover", job.job_uuid)
    assert first.returncode == 0, first.stderr
    second = imgprep("jobs", "recover", job.job_uuid)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout

    record = job_record(imgprep, job.job_uuid)
    assert record["execution"] == "failed"
    assert record["error"]["code"] == "Interrupted"
    stopped_in = re.search(r"during step (\w+)", record["error"]["message"]).group(1)  # type: ignore[union-attr]
    assert ORDER[capture].index(stopped_in) >= ORDER[capture].index(step)
    assert record["needs_recovery"] is False
    assert record["verification"]["status"] != "running"  # an interrupted verification says so
    assert all(r["error"] is None for r in record["onerror_results"] + record["always_results"])
    always = NAMES[capture]["always"]
    if touched:  # killed before it touched anything, a job has nothing to clean up
        assert [r["name"] for r in record["always_results"]][-len(always) :] == always
    else:
        assert record["always_results"] == []
    assert proto.persistent_xml() == definition

    if capture == "clone":
        assert proto.is_running() is running
        if running:
            assert proto.dom.ID() == dom_id, "the prototype was restarted"
        else:
            assert reference is not None
            assert_restored_exactly(proto, reference, output_dir, image_kept=chain == "always_results")
        assert clone_leftovers(proto, job.job_uuid) == []
    elif running:
        assert proto.is_running()
        assert proto.snapshots() == []
        assert_no_traces(proto)
    else:
        assert reference is not None
        assert_restored_exactly(proto, reference, output_dir, image_kept=chain == "always_results")
    reliability(
        f"imgprep killed during {step}",
        "SIGKILL, then `imgprep jobs recover` (twice)",
        f"{capture}: {'running' if running else 'disk block-identical, still off'}; "
        f"record: Interrupted during {stopped_in}",
    )


# --- failures inside the job ----------------------------------------------------------------


def test_script_hang_is_killed_at_the_prepare_timeout(
    prototype: Prototype, imgprep: Any, output_dir: Path, tmp_path: Path, reliability: Callable[..., None]
) -> None:
    script = tmp_path / "hang"
    script.write_text("#!/bin/sh\necho 'waiting forever'\nexec sleep 100000\n")
    reference = reference_copy(prototype, tmp_path)
    timeouts = [*TIMEOUTS]
    timeouts[timeouts.index("--prepare-timeout") + 1] = "20"

    result = imgprep(
        "create", "--vm", prototype.uuid, "--script", str(script), "--output-dir", str(output_dir), "--json", *timeouts
    )

    assert result.returncode == 1, result.stderr
    error = result.summary["error"]
    assert error["code"] == "PrepareImageError"
    assert "timed out after 20s" in error["message"]
    assert "waiting forever" in error["message"]
    assert_restored_exactly(prototype, reference, output_dir)
    reliability(
        "operator script hangs",
        "script sleeps past --prepare-timeout 20",
        "guest kills it, reports error; exit 1; restored",
    )


def test_guest_that_never_reports(
    make_prototype: Callable[..., Prototype],
    imgprep: Any,
    output_dir: Path,
    tmp_path: Path,
    reliability: Callable[..., None],
) -> None:
    # A guest that refuses to run imgprep's unit (masked on its kernel command line)
    proto = make_prototype(extra_cmdline=f"systemd.mask={artifacts.UNIT_NAME}")
    reference = reference_copy(proto, tmp_path)
    timeouts = [*TIMEOUTS]
    timeouts[timeouts.index("--boot-timeout") + 1] = "90"

    # in place: the prepare boot is the prototype's own domain, so its console (the
    # control below) shows that boot; a clone's definition drops the prototype's console
    result = imgprep(
        "create", "--vm", proto.uuid, "--capture", "in-place", "--output-dir", str(output_dir), "--json", *timeouts
    )

    assert result.returncode == 1, result.stderr
    assert result.summary["error"]["code"] == "PrepareImageDidNotRun"
    assert [e for e in result.events if e.get("event") == "guest"] == []
    # control: the guest did boot (it just never ran the unit)
    assert "login:" in proto.console_text()
    assert_restored_exactly(proto, reference, output_dir)
    reliability(
        "guest never reports", "unit masked in the guest; --boot-timeout 90", "PrepareImageDidNotRun; exit 1; restored"
    )


def test_export_target_fills_up(
    prototype: Prototype,
    start_job: Callable[..., RunningJob],
    imgprep: Any,
    tmp_path: Path,
    reliability: Callable[..., None],
) -> None:
    reference = reference_copy(prototype, tmp_path)
    needed = int(
        json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(prototype.disk)], capture_output=True, check=True
            ).stdout
        )["actual-size"]
    )
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={needed + (8 << 20)},mode=0700", "tmpfs", str(small)], check=True
    )
    try:
        job = start_job("--vm", prototype.uuid, "--output-dir", str(small), *TIMEOUTS)
        job.wait_step("wait_running")  # validation (free space) passed; now the disk fills up
        filler = small / "filler"
        subprocess.run(["fallocate", "-l", str(needed), str(filler)], check=True)
        result = job.finish()
        assert result.returncode == 1, result.stderr
        summary = result.summary
        # free space is checked again before export, against what the disk holds now
        assert summary["error"]["code"] == "InsufficientSpace"
        assert "not enough free space" in summary["error"]["message"]
        filler.unlink()
        assert_restored_exactly(prototype, reference, small)
    finally:
        subprocess.run(["umount", str(small)], check=False)
    reliability(
        "export target full",
        "output filesystem filled during the prepare boot",
        "refused before export (free space checked again); exit 1; restored, no partial file",
    )


@pytest.mark.serial  # restarts the host's libvirtd under every other test
def test_libvirtd_restarted_mid_job(
    prototype: Prototype,
    start_job: Callable[..., RunningJob],
    imgprep: Any,
    output_dir: Path,
    reliability: Callable[..., None],
) -> None:
    job = start_job("--vm", prototype.uuid, "--output-dir", str(output_dir), *TIMEOUTS)
    job.wait_step("wait_running")
    subprocess.run(["pkill", "-x", "libvirtd"], check=True)
    time.sleep(2)
    subprocess.run(["libvirtd", "-d"], check=True)
    result = job.finish()

    assert result.returncode == 0, result.stderr
    assert result.summary["execution"] == "succeeded"
    retries = [e for e in result.events if e.get("event") == "retry"]
    assert retries, "the dropped connection was retried"
    record = job_record(imgprep, result.summary["job_uuid"])
    assert any(r.get("retries") for r in record["chain_results"])
    assert not prototype.is_running()
    assert prototype.snapshots() == []
    reliability(
        "libvirtd restarted mid-job",
        "pkill libvirtd during the prepare boot, restart it",
        "step retried after reconnect; job succeeded; restored",
    )


def test_sigterm_cancels_and_restores(
    prototype: Prototype,
    start_job: Callable[..., RunningJob],
    imgprep: Any,
    output_dir: Path,
    tmp_path: Path,
    reliability: Callable[..., None],
) -> None:
    reference = reference_copy(prototype, tmp_path)
    job = start_job("--vm", prototype.uuid, "--output-dir", str(output_dir), *TIMEOUTS)
    job.wait_step("wait_running")

    # while it runs, a second job on the same VM is refused and touches nothing
    second = imgprep("create", "--vm", prototype.uuid, "--output-dir", str(output_dir))
    assert second.returncode == 2
    assert "locked by another running imgprep job" in second.stderr

    job.proc.send_signal(signal.SIGTERM)
    result = job.finish()
    assert result.returncode == 130, result.stderr
    assert result.summary["execution"] == "canceled"
    record = job_record(imgprep, result.summary["job_uuid"])
    assert record["vm_restored"] is True
    assert_restored_exactly(prototype, reference, output_dir)
    reliability(
        "canceled (SIGTERM / Ctrl-C)",
        "SIGTERM during the prepare boot; a 2nd create meanwhile",
        "2nd create refused (exit 2); rollback; exit 130; restored",
    )


# --- bad input: one-line error, exit 2, nothing touched ------------------------------------


def test_bad_input_touches_nothing(
    prototype: Prototype,
    imgprep: Any,
    output_dir: Path,
    tmp_path: Path,
    libvirt_uri: str,
    reliability: Callable[..., None],
) -> None:
    reference = reference_copy(prototype, tmp_path)
    raw = tmp_path / "raw.img"
    subprocess.run(["qemu-img", "create", "-f", "raw", str(raw), "64M"], check=True, capture_output=True)
    import libvirt

    conn = libvirt.open(libvirt_uri)
    raw_xml = prototype.persistent_xml()
    raw_xml = raw_xml.replace(f"<name>{prototype.name}</name>", f"<name>{prototype.name}-raw</name>")
    raw_xml = raw_xml.replace(f"<uuid>{prototype.uuid}</uuid>", "")
    raw_xml = raw_xml.replace("type='qcow2'", "type='raw'").replace(str(prototype.disk), str(raw))
    raw_dom = conn.defineXML(raw_xml)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(tiny)], check=True)
    try:
        cases = {
            "unknown VM": (["--vm", "no-such-vm"], "no VM 'no-such-vm'"),
            "non-qcow2 disk in place": (
                ["--vm", f"{prototype.name}-raw", "--capture", "in-place"],
                "is raw; in place, only qcow2 disks are supported",
            ),
            "no such disk": (["--vm", prototype.uuid, "--disk", "vdz"], "--disk vdz: VM"),
            "not enough free space": (["--vm", prototype.uuid, "--output-dir", str(tiny)], "not enough free space"),
            "unreachable libvirt": (
                ["--vm", prototype.uuid, "--libvirt-uri", "qemu+unix:///system?socket=/nonexistent"],
                "cannot connect to libvirt",
            ),
        }
        for name, (args, expected) in cases.items():
            extra = [] if "--output-dir" in args else ["--output-dir", str(output_dir)]
            result = imgprep("create", *args, *extra)
            assert result.returncode == 2, (name, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, (name, lines)
            assert expected in lines[0], (name, lines[0])
    finally:
        subprocess.run(["umount", str(tiny)], check=False)
        raw_dom.undefine()
        conn.close()
    assert imgprep("jobs", "list", "--json").stdout.strip() == "[]"
    assert_restored_exactly(prototype, reference, output_dir)
    reliability(
        "bad input",
        "unknown VM, raw disk in place, no such --disk, no space, unreachable libvirt",
        "one-line error; exit 2; no job, VM untouched",
    )
