"""Point-in-time views of a prototype's disks, taken without writing them or changing
its definition (docs/capture.md says why this mechanism and what it costs).

* Running prototype: libvirt's backup API in *pull* mode. QEMU starts a copy-before-
  write filter and an NBD server on a unix socket in the view directory; each disk is
  exported as it was when the job began, and only the blocks the prototype overwrites
  afterwards are copied into a per-disk scratch qcow2. Around ``backupBegin``:
  ``freeze`` (guest agent fsfreeze, bounded, thaw retried and reported loudly),
  ``stop`` (graceful shutdown, start *paused*, begin, resume: the downtime is one
  shutdown plus one start) or ``crash`` (nothing: as after a power loss).
* Shut-off prototype: no QEMU runs to serve a backup, so ``qemu-nbd`` exports each
  disk read-only with image locking off (the prototype can still be started at any
  time) and the view records a fingerprint of the prototype; :func:`check_unchanged`
  fails the job if the prototype was started meanwhile (its disks may have changed
  under the view). The prototype is never blocked and never written.

Either way every disk gets a throwaway qcow2 overlay whose backing file is the NBD
export; libguestfs and the clone use the overlays, and :func:`cleanup` (idempotent,
also what ``imgprep jobs recover`` runs) ends the backup job or ``qemu-nbd`` and
deletes everything in the view directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import stat
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import libvirt
import libvirt_qemu

from imgprep.errors import ImgprepError, NotSupported
from imgprep.run import run

log = logging.getLogger(__name__)
T = TypeVar("T")

Consistency = Literal["freeze", "stop", "crash"]
CONSISTENCIES: tuple[Consistency, ...] = ("freeze", "stop", "crash")
THAW_ATTEMPTS = 5
THAW_RETRY_DELAY = 0.5  # seconds
QEMU_NBD_START_TIMEOUT = 30.0
BACKUP_END_TIMEOUT = 60.0
# libvirt prints every error to stderr by default; ours are raised and reported once.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class CaptureError(ImgprepError):
    code = "CaptureFailed"


class FreezeFailed(CaptureError):
    """The guest agent did not answer or could not freeze: nothing was captured."""

    code = "FreezeFailed"


class ThawFailed(CaptureError):
    """The guest's filesystems may still be frozen: an outage of the prototype."""

    code = "GuestStillFrozen"


class PrototypeChanged(CaptureError):
    """The shut-off prototype was started (or its disks written) during the job."""

    code = "PrototypeChanged"


class ViewEnded(CaptureError):
    """The running prototype's backup job (its point-in-time view) is gone."""

    code = "ViewEnded"


class PrototypeStopped(ViewEnded):
    """The running prototype stopped: its QEMU, which served the view, exited."""

    code = "PrototypeStopped"


class ScratchSpaceLow(ViewEnded):
    """imgprep ended the backup job before its scratch files could fill the view directory."""

    code = "ScratchSpaceLow"


@dataclasses.dataclass(frozen=True)
class SourceDisk:
    """One ``device='disk'`` disk of the prototype."""

    target: str  # vda
    type: Literal["file", "block"]
    format: Literal["qcow2", "raw"]
    path: str

    @staticmethod
    def from_xml(domain_xml: str) -> list[SourceDisk]:
        disks: list[SourceDisk] = []
        problems: list[str] = []
        for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
            if disk.get("device", "disk") != "disk":
                continue
            kind = disk.get("type", "file")
            target_el, driver, source = disk.find("target"), disk.find("driver"), disk.find("source")
            target = target_el.get("dev", "") if target_el is not None else ""
            fmt = driver.get("type", "raw") if driver is not None else "raw"
            path = (source.get("file") or source.get("dev") or "") if source is not None else ""
            if kind not in ("file", "block"):
                problems.append(f"disk {target} is a {kind} disk; only file and block disks are supported")
            elif fmt not in ("qcow2", "raw"):
                problems.append(f"disk {target} is {fmt}; only qcow2 and raw disks are supported")
            elif not path or not target:
                problems.append(f"disk {target or '?'} has no source or target")
            else:
                disks.append(SourceDisk(target, kind, fmt, path))  # type: ignore[arg-type]
        if problems:
            raise NotSupported("; ".join(problems))
        if not disks:
            raise NotSupported("the VM has no disk")
        return disks


SOCKET_ROOT = Path("/run/imgprep/views")  # short: a UNIX socket path has at most 107 bytes


@dataclasses.dataclass(frozen=True)
class ViewFiles:
    """Everything a view puts on the host: files under one directory (the view
    directory), the NBD sockets under ``socket_dir`` (by default the same directory;
    a UNIX socket path must be short, so imgprep passes one under ``SOCKET_ROOT``)."""

    directory: Path
    socket_dir: Path | None = None

    @property
    def sockets(self) -> Path:
        return self.socket_dir or self.directory

    @property
    def socket(self) -> Path:
        return self.sockets / "nbd.sock"

    def disk_socket(self, target: str) -> Path:
        return self.sockets / f"nbd-{target}.sock"

    def pidfile(self, target: str) -> Path:
        return self.directory / f"nbd-{target}.pid"

    def scratch(self, target: str) -> Path:
        return self.directory / f"{target}.scratch.qcow2"

    def overlay(self, target: str) -> Path:
        return self.directory / f"{target}.overlay.qcow2"

    def nvram(self) -> Path:
        return self.directory / "nvram.fd"

    @property
    def record(self) -> Path:
        return self.directory / "view.json"

    def create(self, owner: tuple[int, int]) -> None:
        """Make the directory, owned by QEMU's user (it binds the socket and opens the
        overlays there), and make sure QEMU can traverse every parent."""
        for directory in {self.directory, self.sockets}:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chown(directory, *owner)
            for parent in directory.parents:
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)  # traverse only, no listing


@dataclasses.dataclass(frozen=True)
class FreezeReport:
    frozen: int  # filesystems the agent froze
    window_ms: float  # freeze requested -> thaw answered (an upper bound of the freeze)
    thaw_attempts: int


@dataclasses.dataclass(frozen=True)
class ViewDisk:
    target: str
    uri: str  # nbd+unix:///<export>?socket=<path>, the overlay's backing file
    overlay: Path
    source: SourceDisk


@dataclasses.dataclass(frozen=True)
class View:
    """A point-in-time view of every disk of the prototype."""

    how: Literal["backup", "qemu-nbd"]
    consistency: Literal["freeze", "stop", "crash", "shutoff"]
    disks: tuple[ViewDisk, ...]
    taken_at: float  # wall clock (time.time()) of the point in time
    freeze: FreezeReport | None = None
    downtime_s: float | None = None  # stop: shutdown requested -> running again
    fingerprint: dict[str, Any] | None = None  # shut-off prototype, for check_unchanged
    domain_id: int | None = None  # running prototype: its QEMU's libvirt ID, for check_running

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for disk in data["disks"]:
            disk["overlay"] = str(disk["overlay"])
        return data


# --- libvirt helpers -------------------------------------------------------------------


def qemu_owner(conn: Any, domain_type: str = "qemu") -> tuple[int, int]:
    """uid:gid QEMU runs as (the DAC base label in the host capabilities)."""
    caps = ET.fromstring(conn.getCapabilities())
    for model in caps.findall("./host/secmodel"):
        if model.findtext("model") == "dac":
            for label in model.findall("baselabel"):
                if label.get("type") == domain_type and label.text:
                    uid, gid = label.text.replace("+", "").split(":")
                    return int(uid), int(gid)
    return 0, 0  # no DAC driver: QEMU runs as root


def agent_answers(dom: Any, timeout: int = 5) -> bool:
    """Does the guest agent answer a ping within ``timeout`` seconds?"""
    try:
        libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}), timeout, 0)
    except libvirt.libvirtError as exc:
        log.info("guest agent does not answer: %s", exc.get_error_message())
        return False
    return True


def thaw(dom: Any, *, attempts: int = THAW_ATTEMPTS, delay: float = THAW_RETRY_DELAY) -> int:
    """Thaw the guest's filesystems, retrying; the number of attempts it took. Raises
    ThawFailed (loudly: a frozen guest is an outage) when every attempt failed."""
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            dom.fsThaw()
            if attempt > 1:
                log.warning("guest thawed at attempt %d", attempt)
            return attempt
        except libvirt.libvirtError as exc:
            last = exc.get_error_message()
            log.error("THAW FAILED (attempt %d/%d): %s", attempt, attempts, last)
            if attempt < attempts:
                time.sleep(delay)
    raise ThawFailed(
        f"the prototype's filesystems may still be FROZEN: {attempts} thaw attempts failed ({last}); "
        "thaw it now: virsh domfsthaw <vm>"
    )


def frozen(
    dom: Any, action: Callable[[], T], *, timeout: int, thaw_fn: Callable[[Any], int] = thaw
) -> tuple[T, FreezeReport]:
    """Run ``action`` with the guest's filesystems frozen through the agent, for as
    short a time as possible; every agent call is bounded by ``timeout`` seconds."""
    dom.agentSetResponseTimeout(timeout)
    t0 = time.monotonic()
    try:
        count = int(dom.fsFreeze())
    except libvirt.libvirtError as exc:
        # a freeze that failed half-way may have frozen some filesystems
        with contextlib.suppress(ThawFailed):
            thaw_fn(dom)
        raise FreezeFailed(f"the guest agent could not freeze the filesystems: {exc.get_error_message()}") from None
    try:
        result = action()
    finally:
        attempts = thaw_fn(dom)
        window = (time.monotonic() - t0) * 1000
        log.info("filesystems frozen for at most %.0f ms (%d filesystems)", window, count)
    return result, FreezeReport(count, round(window, 1), attempts)


def backup_xml(files: ViewFiles, disks: list[SourceDisk]) -> str:
    root = ET.Element("domainbackup", {"mode": "pull"})
    ET.SubElement(root, "server", {"transport": "unix", "socket": str(files.socket)})
    elements = ET.SubElement(root, "disks")
    for disk in disks:
        d = ET.SubElement(elements, "disk", {"name": disk.target, "backup": "yes", "type": "file"})
        ET.SubElement(d, "scratch", {"file": str(files.scratch(disk.target))})
        ET.SubElement(d, "driver", {"type": "qcow2"})
    return ET.tostring(root, encoding="unicode")


def _nbd_uri(export: str, socket: Path) -> str:
    return f"nbd+unix:///{export}?socket={socket}"


def _view_disks(files: ViewFiles, disks: list[SourceDisk], per_disk_socket: bool) -> tuple[ViewDisk, ...]:
    return tuple(
        ViewDisk(
            d.target,
            _nbd_uri(d.target, files.disk_socket(d.target) if per_disk_socket else files.socket),
            files.overlay(d.target),
            d,
        )
        for d in disks
    )


# backupGetXMLDesc's answers that mean "there is no backup job": any other error (a
# dropped connection, libvirtd restarting) says nothing about the job and is raised
_NO_BACKUP_JOB = {libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN}


def our_backup_job(dom: Any, files: ViewFiles) -> bool:
    """Is the prototype's current backup job ours (its socket in our view directory)?"""
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in _NO_BACKUP_JOB:
            return False
        raise
    server = ET.fromstring(xml).find("server")
    return server is not None and server.get("socket") == str(files.socket)


def _wait_shut_off(dom: Any, timeout: float, repeat: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    next_request = time.monotonic() + repeat
    while dom.isActive():
        if time.monotonic() >= deadline:
            raise CaptureError(f"the prototype did not shut down within {timeout:.0f}s", code="StopTimeout")
        if time.monotonic() >= next_request:
            with contextlib.suppress(libvirt.libvirtError):
                dom.shutdown()  # a guest still booting drops the first ACPI request
            next_request = time.monotonic() + repeat
        time.sleep(0.2)


def capture_running(
    dom: Any,
    files: ViewFiles,
    disks: list[SourceDisk],
    consistency: Consistency,
    *,
    agent_timeout: int = 10,
    stop_timeout: float = 300.0,
    thaw_fn: Callable[[Any], int] = thaw,
) -> View:
    """A pull-mode backup of the running prototype: its point in time is now."""
    xml = backup_xml(files, disks)

    def begin() -> float:
        dom.backupBegin(xml, None, 0)
        return time.time()

    freeze: FreezeReport | None = None
    downtime: float | None = None
    if consistency == "freeze":
        taken, freeze = frozen(dom, begin, timeout=agent_timeout, thaw_fn=thaw_fn)
    elif consistency == "crash":
        taken = begin()
    else:
        t0 = time.monotonic()
        dom.shutdown()
        _wait_shut_off(dom, stop_timeout)
        # started paused: the backup's point in time is the disk as the shutdown left it
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        try:
            taken = begin()
        finally:
            dom.resume()
            downtime = round(time.monotonic() - t0, 3)
            log.info("prototype down for %.1f s (stop, start)", downtime)
    view_disks = _view_disks(files, disks, False)
    return View("backup", consistency, view_disks, taken, freeze, downtime, domain_id=int(dom.ID()))


def check_running(dom: Any, view: View, files: ViewFiles) -> None:
    """Fail if a running prototype's view ended: the prototype stopped (the QEMU serving
    the view exited; a prototype started again since is another QEMU, with another ID)
    or its backup job is gone. Errors other than "no such job" are raised as they are
    (a lost libvirt connection says nothing about the view)."""
    if view.how != "backup":
        return

    def stopped() -> bool:
        return not dom.isActive() or (view.domain_id is not None and int(dom.ID()) != view.domain_id)

    if not stopped():
        if our_backup_job(dom, files):
            return
        if not stopped():  # (it may have stopped between the two questions)
            raise ViewEnded(
                "the prototype's backup job ended during the job (it was aborted outside imgprep): its "
                "point-in-time view is gone, so no image is made from it (the prototype runs on, untouched)"
            )
    raise PrototypeStopped(
        "the prototype stopped during the job: its point-in-time view ended with it, so no image is "
        "made from it (imgprep does not start the prototype again: that is its owner's choice)"
    )


def end_backup(dom: Any, files: ViewFiles, timeout: float = BACKUP_END_TIMEOUT) -> bool:
    """Abort the prototype's backup job if it is ours and wait until it has ended (libvirt
    then removes the socket and the scratch files); whether there was one to end."""
    if not dom.isActive() or not our_backup_job(dom, files):
        return False
    with contextlib.suppress(libvirt.libvirtError):  # it may end by itself meanwhile
        dom.abortJob()
    deadline = time.monotonic() + timeout
    while our_backup_job(dom, files):
        if time.monotonic() > deadline:
            raise CaptureError(f"the backup job of the prototype did not end within {timeout:.0f}s")
        time.sleep(0.05)  # an aborted pull job ends within milliseconds: the guard waits on this
    return True


def resume_after_write_error(dom: Any) -> bool:
    """Resume a prototype QEMU paused on a write error (the scratch filled before its
    backup job could be ended): QEMU retries the paused write, now without the backup's
    copy-before-write filter. A prototype paused for any other reason is left alone."""
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
        dom.resume()
        log.warning("resumed the prototype, paused by a write error while its backup job ran")
        return True
    return False


def _fingerprint_disk(disk: SourceDisk) -> dict[str, Any]:
    st = os.stat(disk.path)
    if disk.type == "block":
        # a write to a block device does not touch its inode; the kernel counts them
        dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        fields = Path(f"/sys/dev/block/{dev}/stat").read_text().split()
        return {"rdev": dev, "sectors_written": int(fields[6])}
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(dom: Any, disks: list[SourceDisk]) -> dict[str, Any]:
    state, reason = dom.state()
    return {
        "state": state,
        "reason": reason,
        "disks": {d.target: _fingerprint_disk(d) for d in disks},
    }


def check_unchanged(dom: Any, view: View) -> None:
    """Fail if a shut-off prototype was started or its disks written since the view."""
    if view.fingerprint is None:
        return
    disks = [d.source for d in view.disks]
    now = fingerprint(dom, disks)
    if now["state"] != libvirt.VIR_DOMAIN_SHUTOFF or now != view.fingerprint:
        raise PrototypeChanged(
            "the prototype was started (or its disks written) during the job; the view of its "
            "disks is no longer a point in time, so no image is made from it (the prototype is untouched)"
        )


def _qemu_nbd_image_opts(disk: SourceDisk) -> str:
    driver = "host_device" if disk.type == "block" else "file"
    # comma is the separator of --image-opts: a path with one is refused up front
    if "," in disk.path:
        raise NotSupported(f"disk {disk.target}: a path with a comma is not supported ({disk.path!r})")
    # locking off: the prototype must stay startable while the view is open
    return f"driver={disk.format},file.driver={driver},file.filename={disk.path},file.locking=off"


def serve_readonly(files: ViewFiles, disk: SourceDisk, owner: tuple[int, int]) -> str:
    """Serve ``disk`` read-only through ``qemu-nbd`` (as root: QEMU's user need not reach
    the file) on its socket in ``files``; the NBD URI. ``cleanup`` stops it."""
    sock, pidfile = files.disk_socket(disk.target), files.pidfile(disk.target)
    run(
        [
            "qemu-nbd",
            "--read-only",
            "--persistent",
            "--shared=0",  # libguestfs, the clone and the export each connect
            "--fork",
            f"--pid-file={pidfile}",
            f"--socket={sock}",
            f"--export-name={disk.target}",
            "--cache=none" if disk.type == "block" else "--cache=writeback",
            "--image-opts",
            _qemu_nbd_image_opts(disk),
        ],
        timeout=QEMU_NBD_START_TIMEOUT,
    )
    os.chown(sock, *owner)  # the clone's QEMU connects as QEMU's user
    return _nbd_uri(disk.target, sock)


def capture_shutoff(dom: Any, files: ViewFiles, disks: list[SourceDisk], owner: tuple[int, int]) -> View:
    """Export each disk of the shut-off prototype read-only through ``qemu-nbd``."""
    if dom.isActive():
        raise CaptureError("the prototype is running; a shut-off view needs it shut off", code="VmRunning")
    print_ = fingerprint(dom, disks)
    taken = time.time()
    for disk in disks:
        serve_readonly(files, disk, owner)
    view = View("qemu-nbd", "shutoff", _view_disks(files, disks, True), taken, fingerprint=print_)
    check_unchanged(dom, view)  # started while the exports came up?
    return view


def make_overlays(view: View) -> None:
    """A throwaway qcow2 overlay over each disk's NBD export (libguestfs writes there)."""
    for disk in view.disks:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", disk.uri, str(disk.overlay)])


def save(files: ViewFiles, view: View) -> None:
    tmp = files.record.with_suffix(".tmp")
    tmp.write_text(json.dumps(view.as_json(), indent=1))
    tmp.rename(files.record)


def nvram_source(nvram: Path, template: Path | None) -> Path:
    """Where the clone's UEFI variable store comes from: the prototype's own, or, when
    the prototype has never been started (libvirt creates the store from the template on
    the first start), the template -- what the prototype's first boot would get."""
    if nvram.exists():
        return nvram
    if template is not None and template.is_file():
        return template
    raise NotSupported(
        f"the VM's UEFI variable store {nvram} does not exist and its definition names no readable template"
    )


def copy_nvram(nvram: Path, template: Path | None, files: ViewFiles, owner: tuple[int, int]) -> Path:
    """A private copy of the UEFI variable store (read, never written; never created
    for the prototype either)."""
    dest = files.nvram()
    shutil.copyfile(nvram_source(nvram, template), dest)
    os.chown(dest, *owner)
    return dest


# --- cleanup ---------------------------------------------------------------------------


def _stop_qemu_nbd(pidfile: Path, sock: Path) -> str | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return None
    # a recycled pid is not ours: only kill the qemu-nbd serving our socket
    if not cmdline or not cmdline[0].endswith(b"qemu-nbd") or f"--socket={sock}".encode() not in cmdline:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
    return f"stopped qemu-nbd {pid}"


def cleanup(conn: Any, vm_uuid: str, files: ViewFiles, clone_name: str | None) -> list[str]:
    """Destroy the clone, end the backup job or the qemu-nbd exports, delete the view
    directory. Idempotent; what it did, one line per action."""
    done: list[str] = []
    if clone_name:
        with contextlib.suppress(libvirt.libvirtError):
            clone = conn.lookupByName(clone_name)
            if clone.isActive():
                clone.destroy()
                done.append(f"destroyed clone {clone_name}")
            if clone.isPersistent():  # never defined by imgprep; a leftover of a crash mid-define
                clone.undefine()
    try:
        dom = conn.lookupByUUIDString(vm_uuid)
    except libvirt.libvirtError:
        dom = None
    if dom is not None and end_backup(dom, files):
        done.append("ended the backup job")
    if files.directory.exists():
        for pidfile in sorted(files.directory.glob("nbd-*.pid")):
            target = pidfile.name[len("nbd-") : -len(".pid")]
            stopped = _stop_qemu_nbd(pidfile, files.disk_socket(target))
            if stopped:
                done.append(stopped)
        _rmtree(files.directory)
        done.append(f"removed {files.directory}")
    if files.socket_dir is not None and files.socket_dir.exists():
        _rmtree(files.socket_dir)
        done.append(f"removed {files.socket_dir}")
    return done


def _rmtree(path: Path) -> None:
    """Remove a tree whose files libvirt or QEMU may be removing at the same moment."""

    def gone_already(_fn: Any, _path: str, info: Any) -> None:
        if not issubclass(info[0], FileNotFoundError):
            raise info[1]

    shutil.rmtree(path, onerror=gone_already)  # onexc= from Python 3.12 on
