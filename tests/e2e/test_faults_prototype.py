"""Faults on the prototype's side of clone mode, against a RUNNING prototype: its owner
shuts it down mid-job, libvirtd restarts mid-job, the view directory fills while the
backup job's scratch file grows. Real libvirtd, QEMU (TCG), libguestfs and the Debian
test guest; nothing mocked.

Every case ends with the same checks: the prototype was never hurt (running with the
same domain ID and never paused, or shut off as its owner left it and not started
again), no image of a failed job, and nothing of the job left (no clone, no backup
job, no view directory, socket or process using it). Each adds its row to the
reliability table.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from imgprep import pointintime as pit
from imgprep import scratchguard
from tests.e2e.conftest import LIBVIRT_URI, VM_ROOT, Prototype
from tests.e2e.test_clone import LifecycleEvents, leftovers, lifecycle  # noqa: F401 - lifecycle is a fixture
from tests.e2e.test_create import TIMEOUTS, inspect_disk
from tests.e2e.test_faults import NAMES, RunningJob, job_record, start_job, wait_agent  # noqa: F401 - start_job: fixture

pytestmark = pytest.mark.e2e

LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")


def agent(dom: Any, command: str, **arguments: Any) -> Any:
    """One guest-agent command (bounded: 10 s)."""
    request = {"execute": command, "arguments": arguments} if arguments else {"execute": command}
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(request), 10, 0))["return"]


def guest_start(dom: Any, *argv: str) -> int:
    """Start a command in the guest through its agent; its pid, for :func:`guest_wait`."""
    return int(agent(dom, "guest-exec", path=argv[0], arg=list(argv[1:]), **{"capture-output": True})["pid"])


def guest_wait(dom: Any, pid: int, timeout: float = 600) -> tuple[int, str]:
    """The exit code and output of a command started by :func:`guest_start`."""
    deadline = time.monotonic() + timeout
    while True:
        status = agent(dom, "guest-exec-status", pid=pid)
        if status["exited"]:
            out = base64.b64decode(status.get("out-data", "")) + base64.b64decode(status.get("err-data", ""))
            return int(status.get("exitcode", -1)), out.decode(errors="replace")
        assert time.monotonic() < deadline, f"guest process {pid} did not finish in {timeout}s"
        time.sleep(1)


def guest_run(dom: Any, *argv: str) -> tuple[int, str]:
    return guest_wait(dom, guest_start(dom, *argv))


def running_prototype(proto: Prototype) -> int:
    """Boot the prototype until its agent answers (clone mode then freezes, never stops
    it); its libvirt domain ID, which stays the same as long as its QEMU runs."""
    proto.start()
    wait_agent(proto)
    return int(proto.dom.ID())


def assert_failed_cleanly(imgprep: Any, job_uuid: str, proto: Prototype, output_dir: Path) -> dict[str, Any]:
    record = job_record(imgprep, job_uuid)
    assert record["execution"] == "failed"
    assert record["needs_recovery"] is False
    assert [r["name"] for r in record["always_results"]] == NAMES["clone"]["always"]
    assert all(r["error"] is None for r in record["always_results"] + record["onerror_results"])
    assert list(output_dir.iterdir()) == [], "a failed job leaves no image behind"
    assert leftovers(proto.conn, job_uuid, proto) == []
    return record


# --- the owner shuts the prototype down mid-job -------------------------------------------


def test_prototype_shut_down_by_its_owner_mid_job(
    prototype: Prototype,
    start_job: Callable[..., RunningJob],  # noqa: F811 - the fixture
    imgprep: Any,
    output_dir: Path,
    lifecycle: Callable[[str], LifecycleEvents],  # noqa: F811 - the fixture
    reliability: Callable[..., None],
) -> None:
    running_prototype(prototype)
    events = lifecycle(prototype.uuid)
    job = start_job("--vm", prototype.uuid, "--output-dir", str(output_dir), *TIMEOUTS)
    job.wait_step("wait_running")  # the clone boots from the prototype's view

    prototype.shutdown()  # its owner: `virsh shutdown`; QEMU exits, the view with it
    result = job.finish()

    assert result.returncode == 1, result.stderr
    error = result.summary["error"]
    assert error["code"] == "PrototypeStopped", error
    assert "the prototype stopped during the job" in error["message"]
    record = assert_failed_cleanly(imgprep, job.job_uuid, prototype, output_dir)
    failed = [r["name"] for r in record["chain_results"] if r["error"]]
    # the owner's choice stands: shut off, and never started again by imgprep
    time.sleep(2)  # let the event thread take the last events
    assert not prototype.is_running()
    assert events.count(libvirt.VIR_DOMAIN_EVENT_STOPPED) == 1, events.events  # control: events are seen
    assert events.count(libvirt.VIR_DOMAIN_EVENT_STARTED) == 0, events.events
    reliability(
        "prototype shut down by its owner mid-job (clone, running)",
        "`virsh shutdown` of the prototype during the clone's prepare boot",
        f"`PrototypeStopped` in {failed[0]}; exit 1; no image; prototype stays shut off (not restarted); "
        "no clone, backup job or view left",
    )


# --- libvirtd restarts mid-job ------------------------------------------------------------


def restart_libvirtd() -> None:
    """Stop libvirtd (SIGTERM to the daemon's own pid) and start it again; domains run on."""
    pid = int(LIBVIRTD_PIDFILE.read_text().strip())
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.2)
    time.sleep(2)  # a few seconds without a daemon
    subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            libvirt.open(LIBVIRT_URI).close()
            return
        except libvirt.libvirtError:
            assert time.monotonic() < deadline, "libvirtd did not come back"
            time.sleep(0.5)


@pytest.mark.serial  # restarts the host's libvirtd under every other test
def test_libvirtd_restarted_mid_job_on_a_running_prototype(
    prototype: Prototype,
    start_job: Callable[..., RunningJob],  # noqa: F811 - the fixture
    imgprep: Any,
    output_dir: Path,
    reliability: Callable[..., None],
) -> None:
    dom_id = running_prototype(prototype)
    job = start_job("--vm", prototype.uuid, "--output-dir", str(output_dir), *TIMEOUTS)
    job.wait_step("wait_running")  # the backup job serves the clone's boot

    restart_libvirtd()
    # libvirt 9.0 keeps the pull-mode backup job across its restart (status XML)
    files = pit.ViewFiles(Path("/nonexistent"), pit.SOCKET_ROOT / job.job_uuid)
    if not pit.our_backup_job(prototype.dom, files):
        jobs = libvirt_qemu.qemuMonitorCommand(prototype.dom, '{"execute": "query-block-jobs"}', 0)
        raise AssertionError(f"the backup job did not survive libvirtd's restart; QEMU's block jobs: {jobs}")
    result = job.finish()

    assert result.returncode == 0, result.stderr
    assert result.summary["execution"] == "succeeded"
    record = job_record(imgprep, job.job_uuid)
    retried = [r["name"] for r in record["chain_results"] if r.get("retries")]
    assert retried, "the dropped connection was retried"
    assert prototype.is_running()
    assert prototype.dom.ID() == dom_id, "the prototype was restarted"
    facts = inspect_disk(Path(result.summary["file"]))
    assert facts["traces"] == []
    assert facts["ssh_host_keys"] == []
    assert leftovers(prototype.conn, job.job_uuid, prototype) == []
    reliability(
        "libvirtd restarted mid-job (clone, running prototype)",
        "libvirtd stopped during the clone's prepare boot, started again 2 s later",
        f"the backup job survives; {', '.join(retried)} retried after reconnecting; job succeeds; "
        "prototype ran on (same domain ID); no backup job left",
    )


# --- the view directory fills ---------------------------------------------------------------

FILLER = "/root/imgprep-filler"
NEW_DATA = "/root/imgprep-new-data"
FILLER_MIB = 192  # what the prototype overwrites during the job: more than the view directory holds
VIEW_FS_MIB = 160
RESERVE_MIB = 48


def overwrite_filler(dom: Any) -> int:
    """Start the prototype overwriting FILLER in place with NEW_DATA (during a backup
    job, each block's first write sends its old block to the scratch file); its pid."""
    return guest_start(dom, "/bin/dd", f"if={NEW_DATA}", f"of={FILLER}", "bs=1M", "conv=notrunc,fsync")


def filler_holds_new_data(dom: Any) -> tuple[int, str]:
    """``cmp`` of FILLER with NEW_DATA, read back from the prototype's disk (caches dropped)."""
    return guest_run(dom, "/bin/sh", "-c", f"sync && echo 3 > /proc/sys/vm/drop_caches && cmp {NEW_DATA} {FILLER}")


@pytest.fixture
def small_view_dir(prototype: Prototype) -> Iterator[Path]:
    """A view directory on a small tmpfs (a host filesystem: never a guest's)."""
    path = VM_ROOT / prototype.name / "views"
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={VIEW_FS_MIB}m,mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        # A failed job can leave QEMU holding a file in it: detach it lazily then.
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=False)


def test_view_dir_fills_while_the_prototype_writes(
    prototype: Prototype,
    small_view_dir: Path,
    start_job: Callable[..., RunningJob],  # noqa: F811 - the fixture
    imgprep: Any,
    output_dir: Path,
    tmp_path: Path,
    reliability: Callable[..., None],
) -> None:
    dom_id = running_prototype(prototype)
    dom = prototype.dom
    # before the job: data the prototype will overwrite in place (so every block it
    # writes during the job sends an old block to the scratch file), and what it writes
    for path in (FILLER, NEW_DATA):
        code, out = guest_run(
            dom, "/bin/dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={FILLER_MIB}", "conv=fsync"
        )
        assert code == 0, out
    config = tmp_path / "imgprep.yaml"
    config.write_text(f"view_dir: {small_view_dir}\nscratch_reserve_mib: {RESERVE_MIB}\n")

    job = start_job("--vm", prototype.uuid, "--config", str(config), "--output-dir", str(output_dir), *TIMEOUTS)
    job.wait_step("wait_running")
    writer = overwrite_filler(dom)
    result = job.finish()
    code, out = guest_wait(dom, writer)

    # the prototype: every write succeeded, never paused, never restarted
    assert code == 0, out
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert prototype.dom.ID() == dom_id
    code, out = filler_holds_new_data(dom)
    assert code == 0, f"the prototype's file is not what it wrote: {out}"
    code, kernel_log = guest_run(dom, "/bin/dmesg")
    assert code == 0
    assert "Linux version" in kernel_log  # control: this is the prototype's kernel log, from its boot
    errors = [line for line in kernel_log.splitlines() if "I/O error" in line or "EXT4-fs error" in line]
    assert errors == [], errors

    # the job: failed, the view ended by the guard before the scratch filled
    assert result.returncode == 1, result.stderr
    error = result.summary["error"]
    assert error["code"] == "ScratchSpaceLow", error
    assert "ended the backup job before its scratch file could fill it" in error["message"]
    record = assert_failed_cleanly(imgprep, job.job_uuid, prototype, output_dir)
    trip = record["state"]["clone"]["scratch_trip"]
    assert trip["rate"] > 0  # the free space was falling when the guard acted: the scratch grew
    assert trip["ended"] is True
    assert trip["resumed"] is False  # no write of the prototype ever failed (none paused it)
    assert list(small_view_dir.iterdir()) == [], "the job's view directory is left"

    # control: the same writer, the same view directory, a backup job with no guard:
    # the scratch fills and QEMU pauses the prototype on the failed write (what the
    # guard prevented above). Ending the job and resuming lets that write through.
    paused_without_a_guard(prototype, small_view_dir)
    reliability(
        "view directory fills during the point-in-time view (clone, running)",
        f"view_dir on a {VIEW_FS_MIB} MiB tmpfs, reserve {RESERVE_MIB} MiB; the prototype overwrites "
        f"{FILLER_MIB} MiB during the prepare boot, as fast as it can",
        "the scratch guard ends the backup job before the reserve is reached at the rate the free space falls: "
        "`ScratchSpaceLow`; exit 1; no image; every prototype write succeeded (file complete, no I/O error in its "
        "kernel log), never paused; nothing left. Control, the same writer with no guard: the prototype pauses "
        "on the full scratch; ended and resumed, its write completes",
    )


def paused_without_a_guard(prototype: Prototype, view_dir: Path) -> None:
    """A pull backup of the running prototype with its scratch in ``view_dir`` and no
    guard; the prototype overwrites FILLER again: it must pause on a write error. Then
    the job is ended, the prototype resumed, and its write must complete."""
    dom = prototype.dom
    files = pit.ViewFiles(view_dir / "control", pit.SOCKET_ROOT / f"e2e-{prototype.uuid}")
    files.create(pit.qemu_owner(prototype.conn))
    try:
        pit.capture_running(dom, files, pit.SourceDisk.from_xml(dom.XMLDesc(0)), "crash")
        writer = overwrite_filler(dom)
        deadline = time.monotonic() + 300
        while dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
            assert time.monotonic() < deadline, "the unguarded scratch never filled: the writer is too slow"
            time.sleep(0.05)
        assert dom.state()[1] == libvirt.VIR_DOMAIN_PAUSED_IOERROR, dom.state()
        assert scratchguard.free_bytes(view_dir) < RESERVE_MIB << 20  # the scratch filled the view directory
    finally:
        ended = pit.end_backup(dom, files)
        resumed = pit.resume_after_write_error(dom)
        pit.cleanup(prototype.conn, prototype.uuid, files, None)
    assert ended, "the control's backup job was gone before it was ended"
    assert resumed, "the prototype paused by the full scratch was not resumed"
    code, out = guest_wait(dom, writer)
    assert code == 0, out  # the paused write went through once the job had ended
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    code, out = filler_holds_new_data(dom)
    assert code == 0, f"the prototype's file is not what it wrote after the resume: {out}"
