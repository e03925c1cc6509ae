"""libvirt/KVM backend: local disks, a systemd guest, a pluggable capture.

* capture (``Capture``): how the VM's disks are held still for the prepare boot and
  given back after it. Each capture contributes its create steps, its always steps,
  its own state dataclass, the disks inject writes and export reads, and the domain
  the prepare boot runs as. ``CloneCapture`` (``--capture clone``, the default,
  docs/capture.md): a point-in-time view of every disk (guest-agent freeze, stop or
  crash consistency; the prototype keeps running), throwaway qcow2 overlays and a
  transient clone; always: destroy the clone, end the backup job, delete the view.
  ``InPlaceCapture`` (``--capture in-place``): stop the VM, an internal qcow2
  snapshot of every disk of the shut-off domain; always: revert, delete the
  snapshot, restart;
* inject: the early unit, its runner and the operator script, written offline with
  libguestfs; inspection names the disk holding the root filesystem (the one
  exported, unless ``--disk`` names another);
* prepare boot: ``createXML`` of a live definition (in place: the domain's own
  persistent definition; clone: the clone's) plus one extra serial port on a UNIX
  socket (the guest's channel to us, never rotated by virtlogd and costing no host
  disk: see guestchannel.py) and ``on_poweroff`` destroy. The prototype's
  persistent definition is never changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypeVar

import libvirt

from imgprep import artifacts, identities
from imgprep import pointintime as pit
from imgprep.backends.base import Backend, JobState, StopTimeout, VmFacts
from imgprep.channel import ChannelParser, GuestStatus
from imgprep.clonecapture import CloneCapture as CloneView
from imgprep.clonecapture import CloneState, choose_consistency, nvram_of
from imgprep.config import Config
from imgprep.errors import ImgprepError, InvalidInput, NotSupported, TransientError, VmBusy
from imgprep.export import ExportResult, export_disk, export_need
from imgprep.guestagent import probe as probe_agent
from imgprep.guestchannel import SocketChannel, prepare_socket_dir, socket_path
from imgprep.leftovers import check_clean
from imgprep.libguestfs import Guest, open_guest, selinux_label
from imgprep.run import run
from imgprep.scratchguard import MiB, view_room_problem
from imgprep.verify import VerificationFailed, decide, failure_message, parse_report
from imgprep.verifyboot import VerifyBoot, VerifyState
from imgprep.workflow import Engine, Step

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINT_PREFIX = "imgprep-pre-prepare-"
MAX_SERIAL_PORTS = 4  # ISA serial: ttyS0..ttyS3
SHUTDOWN_REPEAT = 15.0  # seconds between repeated ACPI shutdown requests
ET.register_namespace("qemu", "http://libvirt.org/schemas/domain/qemu/1.0")
# libvirt prints every error to stderr by default; ours are raised and reported once.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# libvirt error codes that mean "the connection or daemon went away": retry.
_TRANSIENT_CODES = {
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
}


def _is_transient(exc: libvirt.libvirtError) -> bool:
    code = exc.get_error_code()
    message = str(exc)
    # "Failed to get ... lock": a dying process (e.g. a killed job's libguestfs appliance)
    # still holds the image lock for a moment.
    return (
        code in _TRANSIENT_CODES
        or "client socket is closed" in message
        or "is busy" in message
        or "Failed to get" in message
    )


def _reports_view_end(step: Callable[[LibvirtBackend], T]) -> Callable[[LibvirtBackend], T]:
    """A step that reads the view (libguestfs, the clone's QEMU, qemu-img) and fails: if
    the view ended meanwhile, that is the cause reported (not the read error it caused)."""

    @functools.wraps(step)
    def wrapper(self: LibvirtBackend) -> T:
        try:
            return step(self)
        except (pit.CaptureError, TransientError):
            raise
        except Exception as exc:
            try:
                self.capture.check()
            except pit.CaptureError as cause:
                raise cause from exc
            except Exception as unknown:  # the check could not tell: report the step's own error
                log.debug("checking the view after %s failed: %s", step.__name__, unknown)
            raise

    return wrapper


def disks_of(xml: str) -> list[dict[str, str]]:
    """The domain's disk devices: device, type, format, path, target, bus."""
    disks = []
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        source = disk.find("source")
        driver = disk.find("driver")
        target = disk.find("target")
        disks.append(
            {
                "device": disk.get("device", "disk"),
                "type": disk.get("type", "file"),
                "format": driver.get("type", "raw") if driver is not None else "raw",
                "path": (source.get("file") or source.get("dev") or "") if source is not None else "",
                "target": target.get("dev", "?") if target is not None else "?",
                "bus": target.get("bus", "") if target is not None else "",
            }
        )
    return disks


def channel_element(persistent_xml: str, channel_path: Path) -> tuple[ET.Element, int]:
    """The guest channel: one more serial port (the first free one) on a UNIX socket."""
    devices = ET.fromstring(persistent_xml).find("devices")
    if devices is None:
        raise NotSupported("domain XML has no <devices>")
    ports = [int(t.get("port", "0")) for t in devices.findall("./serial/target") if t.get("port", "0").isdigit()]
    port = max(ports, default=-1) + 1
    if port >= MAX_SERIAL_PORTS:
        raise NotSupported(f"the domain already uses serial ports up to ttyS{port - 1}; imgprep needs one free")
    serial = ET.Element("serial", {"type": "unix"})
    ET.SubElement(serial, "source", {"mode": "bind", "path": str(channel_path)})
    ET.SubElement(serial, "target", {"port": str(port)})
    return serial, port


def prepare_xml(persistent_xml: str, channel_path: Path) -> tuple[str, int]:
    """The live definition for the in-place prepare boot, and the guest's channel port index."""
    root = ET.fromstring(persistent_xml)
    devices = root.find("devices")
    if devices is None:
        raise NotSupported("domain XML has no <devices>")
    serial, port = channel_element(persistent_xml, channel_path)
    devices.append(serial)
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        element = root.find(event)
        if element is None:
            element = ET.SubElement(root, event)
        element.text = "destroy"
    return ET.tostring(root, encoding="unicode"), port


def backing_chain(path: Path) -> list[dict[str, Any]]:
    """``qemu-img info`` of the image and every backing file, top layer first."""
    chain: list[dict[str, Any]] = json.loads(
        run(["qemu-img", "info", "--force-share", "--output=json", "--backing-chain", str(path)]).stdout
    )
    return chain


@dataclasses.dataclass
class InPlaceState:
    """What the in-place capture did (its undo depends on it)."""

    checkpoint: str | None = None  # the internal snapshot's name, saved before it is created
    shutdown_requested: bool = False
    stop_timed_out: bool = False
    root_target: str | None = None  # the disk exported (inspection, or --disk)
    stopped_at: float | None = None  # wall clock: the shutdown was requested
    downtime_s: float | None = None  # shutdown requested -> running again (restart_vm)


@dataclasses.dataclass
class LibvirtState(JobState):
    """The libvirt job state. A capture keeps its own dataclass in its own field."""

    in_place: InPlaceState = dataclasses.field(default_factory=InPlaceState)
    clone: CloneState = dataclasses.field(default_factory=CloneState)
    injected: list[str] = dataclasses.field(default_factory=list)
    guest_os: dict[str, str] | None = None
    channel_bytes: int = 0  # what the guest wrote on its channel during the prepare boot
    selinux_file_contexts: str | None = None  # the guest's file_contexts the injection was labelled with
    # sha256 of each identity file of the prototype (identities.py), read during inject
    prototype_identities: dict[str, list[str]] | None = None
    verify: VerifyState = dataclasses.field(default_factory=VerifyState)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        data = dict(data)
        in_place = dict(data.pop("in_place", None) or {})
        for key in ("checkpoint", "shutdown_requested", "stop_timed_out"):  # version 1: flat
            if key in data:
                in_place.setdefault(key, data.pop(key))
        clone = dict(data.pop("clone", None) or {})
        verify = dict(data.pop("verify", None) or {})
        state = super().from_json(data)
        state.in_place = InPlaceState(**in_place)
        state.clone = CloneState(**clone)
        state.verify = VerifyState(**verify)
        return state


class Capture(Protocol):
    """How the prototype's disks are captured for the prepare boot, and released after it.

    ``create_steps`` run after validate and before inject; ``always_steps`` are part of
    the chain's ``finally`` (idempotent: recovery runs them again). ``disks`` are what
    inject writes and export reads, the exported (root) disk first once ``set_root``
    named it; ``check`` runs after each step that read them (is the capture still a
    point in time?); ``boot_xml`` is the prepare boot's live definition and
    ``boot_domain`` the domain it runs as (None while there is none); ``report`` is
    what the job record shows of the capture."""

    name: ClassVar[str]

    def create_steps(self) -> list[Step]: ...

    def always_steps(self) -> list[Step]: ...

    def disks(self) -> list[tuple[Path, str]]: ...

    def targets(self) -> list[str]: ...

    def set_root(self, target: str) -> None: ...

    def check(self) -> None: ...

    def boot_xml(self, channel: ET.Element) -> str: ...

    def boot_domain(self) -> Any: ...

    def report(self) -> dict[str, Any]: ...


CAPTURES: dict[str, Callable[[LibvirtBackend], Capture]] = {}


class LibvirtBackend(Backend[LibvirtState]):
    name = "libvirt"
    default_script = "operator_scripts/linux-prepare-image"
    state_type = LibvirtState
    verification_available = True

    def __init__(self, config: Config, engine: Engine, request: Any) -> None:
        super().__init__(config, engine, request)
        if request.capture not in CAPTURES:
            raise InvalidInput(f"unknown capture {request.capture!r} (known: {', '.join(CAPTURES)})")
        self.capture: Capture = CAPTURES[request.capture](self)
        self._conn: Any = None
        self._parser = ChannelParser()  # what the guest reported during the prepare boot
        self._channel: SocketChannel | None = None  # our end of the guest's serial port
        self._verify_boot: VerifyBoot | None = None

    # --- lifecycle ----------------------------------------------------------------

    def open(self) -> None:
        if self._conn is None:
            try:
                self._conn = libvirt.open(self.config.libvirt_uri)
            except libvirt.libvirtError as exc:
                raise InvalidInput(
                    f"cannot connect to libvirt at {self.config.libvirt_uri}: {exc.get_error_message()}",
                    code="LibvirtUnreachable",
                ) from None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def connection(self) -> dict[str, Any]:
        return {"libvirt_uri": self.config.libvirt_uri}

    def check_recovery_target(self) -> None:
        stored = self.record["params"].get("libvirt_uri")
        if stored and stored != self.config.libvirt_uri:
            raise InvalidInput(
                f"job {self.record['uuid']} ran against libvirt at {stored!r}, not the configured "
                f"{self.config.libvirt_uri!r}; recovery uses only the configured connection: check that URI, "
                "then configure it (libvirt_uri, or --libvirt-uri) and run the recovery again",
                code="RecoveryTargetMismatch",
            )

    def capture_steps(self) -> list[Step]:
        return self.capture.create_steps()

    def verify_release_steps(self) -> list[Step]:
        return [Step("discard_verify", self.discard_verify)]

    def release_steps(self) -> list[Step]:
        return self.capture.always_steps()

    # --- libvirt plumbing -------------------------------------------------------

    def _connect(self) -> Any:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if self._conn.isAlive():
                    return self._conn
            self._conn = None
        try:
            self._conn = libvirt.open(self.config.libvirt_uri)
        except libvirt.libvirtError as exc:
            raise TransientError(f"cannot connect to libvirt at {self.config.libvirt_uri}: {exc}") from None
        return self._conn

    def _libvirt_error(self, what: str, exc: libvirt.libvirtError) -> ImgprepError:
        """The error for a failed libvirt call: transient (the connection is dropped, so the
        retried step reconnects) or final."""
        if _is_transient(exc):
            self._conn = None
            return TransientError(f"{what}: {exc}")
        return ImgprepError(f"{what}: {exc}", code="LibvirtError")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Call libvirt; a dropped connection becomes TransientError (the step is retried)."""
        try:
            return fn()
        except libvirt.libvirtError as exc:
            raise self._libvirt_error(what, exc) from None

    def _domain(self) -> Any:
        conn = self._connect()
        return self._call("look up the VM", lambda: conn.lookupByUUIDString(self.state.vm_uuid))

    def _channel_path(self) -> Path:
        return socket_path(self.record["uuid"])

    def _guest_channel(self) -> SocketChannel:
        if self._channel is None:
            self._channel = SocketChannel(self._channel_path(), self._parser)
        return self._channel

    # --- validate ---------------------------------------------------------------

    def _lookup(self) -> Any:
        self.open()
        conn = self._conn
        vm = self.request.vm
        dom = None
        try:
            uuidlib.UUID(vm)
            dom = conn.lookupByUUIDString(vm)
        except (ValueError, libvirt.libvirtError):
            with contextlib.suppress(libvirt.libvirtError):
                dom = conn.lookupByName(vm)
        if dom is None:
            raise InvalidInput(f"no VM {vm!r} at {self.config.libvirt_uri}", code="VmNotFound")
        return dom

    def locate(self) -> str:
        return str(self._lookup().UUIDString())

    def validate(self) -> VmFacts:
        dom = self._lookup()
        problems: list[str] = []
        name = dom.name()
        if not dom.isPersistent():
            problems.append(f"VM {name} is transient; imgprep needs a defined (persistent) domain")
        state = dom.state()[0]
        if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_SHUTOFF):
            problems.append(
                f"VM {name} is neither running nor shut off (libvirt state {state}); resume or stop it first"
            )
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        disks = [d for d in disks_of(xml) if d["device"] == "disk"]
        clone = self.request.capture == "clone"
        if not disks:
            problems.append(f"VM {name} has no disk")
        elif clone:
            self._validate_clone(dom, xml, state == libvirt.VIR_DOMAIN_RUNNING, problems)
        for disk in disks:
            where = f"disk {disk['target']} ({disk['path'] or disk['type']})"
            if clone:
                if disk["path"] and not os.access(disk["path"], os.R_OK):
                    problems.append(f"{where} is not readable here (imgprep must run on the VM's host)")
            elif disk["type"] != "file":
                problems.append(
                    f"{where} is a {disk['type']} disk; in place, only file-backed qcow2 disks are supported "
                    "(--capture clone takes raw files and block devices)"
                )
            elif disk["format"] != "qcow2":
                problems.append(
                    f"{where} is {disk['format']}; in place, only qcow2 disks are supported (--capture clone takes raw)"
                )
            elif not os.access(disk["path"], os.R_OK | os.W_OK):
                problems.append(f"{where} is not readable and writable here (imgprep must run on the VM's host)")
        if self.request.disk is not None and self.request.disk not in [d["target"] for d in disks]:
            known = ", ".join(d["target"] for d in disks) or "none"
            problems.append(f"--disk {self.request.disk}: VM {name} has no such disk (its disks: {known})")
        for snap_name in dom.snapshotListNames():
            if snap_name.startswith(CHECKPOINT_PREFIX):
                raise VmBusy(
                    f"VM {name} still has checkpoint {snap_name} from an earlier imgprep job; "
                    "run `imgprep jobs list` and `imgprep jobs recover JOB_UUID`"
                )
            if clone:
                continue  # a clone never snapshots the prototype
            snap_xml = dom.snapshotLookupByName(snap_name).getXMLDesc()
            if "snapshot='external'" in snap_xml or 'snapshot="external"' in snap_xml:
                problems.append(f"VM {name} has external snapshot {snap_name}; only internal snapshots can coexist")
        try:
            prepare_xml(xml, Path("/dev/null"))
        except NotSupported as exc:
            problems.append(exc.message)
        learned: dict[str, Any] = {"type": "zvol", "os": "linux"}
        if disks and not problems:
            first = next((d for d in disks if d["target"] == self.request.disk), disks[0])
            chain = backing_chain(Path(first["path"]))
            learned["image_size"] = int(chain[0]["virtual-size"]) // (1024 * 1024)
            if first["bus"]:
                learned["disk_driver"] = first["bus"]
            # flattened, the export holds at most what every layer has allocated (a
            # block device reports no allocation: its virtual size is the worst case)
            need = sum(int(layer.get("actual-size", 0)) for layer in chain) or int(chain[0]["virtual-size"])
            self.check_free_space(need, problems)
        root = ET.fromstring(xml)
        nic = root.find("./devices/interface/model")
        if nic is not None and nic.get("type"):
            learned["nic_driver"] = nic.get("type")
        memory = root.find("memory")
        if memory is not None and memory.text and memory.get("unit", "KiB") == "KiB":
            learned["requirements"] = {"min_ram": int(memory.text) // 1024}
        if problems:
            raise InvalidInput(problems)
        return VmFacts(dom.UUIDString(), name, state == libvirt.VIR_DOMAIN_RUNNING, learned)

    def _validate_clone(self, dom: Any, xml: str, running: bool, problems: list[str]) -> None:
        """Clone mode: every disk viewable, and the consistency asked for possible."""
        try:
            pit.SourceDisk.from_xml(xml)
        except NotSupported as exc:
            problems.append(exc.message)
        nvram, template = nvram_of(xml)
        if nvram is not None:
            try:  # the clone boots a copy of it (a never-started VM's: of its template)
                pit.nvram_source(nvram, template)
            except NotSupported as exc:
                problems.append(exc.message)
        if running:  # a backup job's scratch files grow in the view directory
            problem = view_room_problem(self.config.view_dir, self.config.scratch_reserve_mib * MiB)
            if problem:
                problems.append(problem)
        requested = None if self.request.consistency == "auto" else self.request.consistency
        if running and requested != "crash":
            # refused up front: a silent agent where one is expected (auto, freeze), freeze
            # without an agent, stop with one (docs/capture.md, *The guest agent*)
            agent = probe_agent(dom, self.config.timeouts.agent)
            try:
                choose_consistency(requested, running, agent)  # type: ignore[arg-type]
            except InvalidInput as exc:
                problems.extend(exc.problems)

    # --- the chain ------------------------------------------------------------------

    def _persistent_xml(self) -> str:
        dom = self._domain()
        xml: str = self._call("read the definition", lambda: dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        return xml

    @staticmethod
    def _disks(xml: str) -> list[dict[str, str]]:
        return [d for d in disks_of(xml) if d["device"] == "disk"]

    @_reports_view_end
    def inject(self) -> None:
        request = self.request
        persistent = self._persistent_xml()
        _, port = prepare_xml(persistent, self._channel_path())
        mode: artifacts.Mode = "legacy" if request.mode == "legacy" else "early"
        link = artifacts.wants_link(mode)
        wants_dir = str(Path(link).parent)
        disks = self.capture.disks()
        self.state.injected = [artifacts.UNIT_PATH, link, artifacts.PREFIX]
        self.persist()
        with open_guest(disks, readonly=False, force_tcg=self.config.libguestfs_tcg) as guest:
            if guest.inspect("type") != "linux":
                raise NotSupported(
                    f"the guest OS is {guest.inspect('type')}; the libvirt backend prepares Linux guests"
                )
            if not guest.is_dir("/etc/systemd/system") or not any(
                guest.exists(p) for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
            ):
                raise NotSupported("the guest does not use systemd; imgprep injects a systemd unit")
            self.state.guest_os = {
                "distro": guest.inspect("distro"),
                "version": f"{guest.inspect('major_version')}.{guest.inspect('minor_version')}",
                "product": guest.inspect("product_name"),
            }
            self._choose_root(guest)
            # the prototype's identities, before its cleanup runs (hashes only): the
            # verification boot checks that each one present in the image is new
            self.state.prototype_identities = identities.hash_guest(guest.g)
            wants_dir_exists = guest.is_dir(wants_dir)
            files = artifacts.linux_injection(
                mode=mode,
                script=request.script,
                script_timeout=int(self.config.timeouts.prepare),
                channel=f"/dev/ttyS{port}",
                wants_dir_exists=wants_dir_exists,
            )
            guest.write_linux_injection(files, wants_dir=None if wants_dir_exists else wants_dir)
            # an enforcing guest's policy may refuse unlabelled units and executables: label
            # what was written with the guest's own file contexts (None: SELinux is off)
            written = [artifacts.PREFIX, artifacts.UNIT_PATH, link] + ([] if wants_dir_exists else [wants_dir])
            self.state.selinux_file_contexts = selinux_label(guest, written)
        self.capture.check()

    def _choose_root(self, guest: Guest) -> None:
        """The disk exported: ``--disk``, else the one inspection found the root filesystem on."""
        if self.request.disk is not None:
            self.capture.set_root(self.request.disk)
            return
        targets = self.capture.targets()  # in the order of capture.disks(), as libguestfs added them
        self.capture.set_root(targets[guest.root_drive_index()])

    def _boot_active(self, dom: Any) -> bool:
        """Is the prepare boot's domain running? A transient domain that powered off is
        gone: one that vanishes between its lookup and this question is not running."""
        if dom is None:
            return False
        try:
            return bool(dom.isActive())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise self._libvirt_error("query state", exc) from None

    @_reports_view_end
    def boot_prepare(self) -> None:
        dom = self.capture.boot_domain()
        if self._boot_active(dom):
            if self._is_prepare_boot(dom):
                return  # retried after a dropped connection: already booted
            raise ImgprepError("the VM is running before the prepare boot", code="VmRunning")
        channel = self._channel_path()
        prepare_socket_dir()
        channel.unlink(missing_ok=True)
        element, _ = channel_element(self._persistent_xml(), channel)
        xml = self._call("define the prepare boot", lambda: self.capture.boot_xml(element))
        self.record["capture"] = self.capture.report()
        self.state.prepare_boot = True
        self.persist()
        conn = self._connect()
        self._call("start the prepare boot", lambda: conn.createXML(xml, 0))
        self._parser = ChannelParser()
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._guest_channel().connect()  # at once: QEMU drops what is written before we connect

    def _is_prepare_boot(self, dom: Any) -> bool:
        """Is the running domain our prepare boot (and not the user's restarted VM)?"""
        live = self._call("read the live definition", lambda: dom.XMLDesc(0))
        return str(self._channel_path()) in live

    def poll_guest(self) -> tuple[GuestStatus, bool]:
        self.capture.check()  # clone: a view that ended under the prepare boot fails the job now
        channel = self._guest_channel()
        status = channel.poll()
        powered_off = not self._boot_active(self.capture.boot_domain())
        if powered_off:  # what QEMU sent before it exited may still be in the socket: take it, then let go
            channel.drain()
            status = channel.poll()
            channel.close()
            self._channel_path().unlink(missing_ok=True)
        self.state.channel_bytes = channel.bytes_read  # what the guest wrote to us (saved with the step)
        return status, powered_off

    @_reports_view_end
    def export(self) -> ExportResult:
        self.capture.check()  # the view is still a point in time before it is read
        disks = self.capture.disks()
        # the guest's "success" is its own claim: look for imgprep's files before publishing
        check_clean(disks, self.state.injected, force_tcg=self.config.libguestfs_tcg)
        boot_path, boot_format = disks[0]  # the root disk (or --disk): capture.disks() puts it first
        # the guest may have filled its disk during the prepare boot: measure it again
        self.check_free_space_before_export(export_need(boot_path, self.request.compression))
        last = [-1]

        def progress(pct: float) -> None:
            if int(pct) != last[0]:
                last[0] = int(pct)
                self.emit({"event": "progress", "step": "export", "percent": round(pct, 1)})

        # gzip/xz: the raw file compressed and hashed in the same pass is what the
        # verification boots, so it is kept (in the verification directory)
        keep_raw = None
        if self.request.verify and self.request.compression in ("gzip", "xz"):
            keep_raw = self.verify_boot.kept_raw(self.request.image_uuid)
            keep_raw.unlink(missing_ok=True)  # a retried export writes it anew
        t0 = time.monotonic()
        result = export_disk(
            boot_path,
            boot_format,
            self.request.output_dir,
            self.request.image_uuid,
            self.request.compression,
            progress=progress,
            cancel=self.engine.cancel,
            keep_raw=keep_raw,
        )
        self.engine.cancel.check()
        self.state.export_seconds = round(time.monotonic() - t0, 3)
        self.capture.check()  # the view was a point in time for the whole export
        return result

    # --- verify ---------------------------------------------------------------------

    @property
    def verify_boot(self) -> VerifyBoot:
        if self._verify_boot is None:
            self._verify_boot = VerifyBoot(
                conn=self._connect,
                job_uuid=self.record["uuid"],
                vm_uuid=self.state.vm_uuid,
                view_root=self.config.view_dir,
                state=self.state.verify,
                persist=self.persist,
                force_tcg=self.config.libguestfs_tcg,
                cancel=self.engine.cancel,
            )
        return self._verify_boot

    def verify(self) -> dict[str, Any]:
        """Boot the exported image once (verifyboot.py) and judge its report (verify.py)."""
        if self.state.export is None:
            raise ImgprepError("verify: nothing was exported")
        boot = self.verify_boot
        path = Path(self.state.export["path"])
        if self.request.compression in ("gzip", "xz"):
            source, fmt = boot.kept_raw(self.request.image_uuid), "raw"
        else:
            source, fmt = path, "qcow2"
        if not source.exists():
            raise VerificationFailed(f"verify: the exported bytes {source} are gone")
        persistent = self._call(
            "read the definition",
            lambda: self._domain().XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE),
        )
        element, port = channel_element(persistent, boot.channel_path)
        timeout = self.config.timeouts.verify
        try:
            overlay = boot.overlay(source, fmt)
            boot.inject(overlay, port, settle_timeout=int(max(30.0, min(300.0, timeout / 2))))
            xml, removed = boot.domain_xml(persistent, self.capture.targets()[0], overlay, element)
            self.engine.cancel.check()
            boot.boot(xml)
            text = boot.wait_report(timeout)
        except libvirt.libvirtError as exc:
            raise ImgprepError(f"the verification boot: {exc}", code="VerificationFailed") from None
        report = parse_report(text)
        checks = decide(report, self.state.prototype_identities or {})
        result = {
            "status": "passed" if all(c.passed for c in checks) else "failed",
            "checks": [c.as_json() for c in checks],
            "report": report.as_json(),
            "booted": boot.state.booted,
            "domain": boot.state.domain,
            "removed": removed,
            "cloud_init_seed": boot.state.cloud_init_seed,
            "masked": list(boot.state.masked),
        }
        if result["status"] == "failed":
            result["console_tail"] = boot.console_tail()
            raise VerificationFailed(failure_message(checks), result=result)
        return result

    def discard_verify(self) -> None:
        """Always: the verification boot's domain, qemu-nbd, overlay and kept raw file go."""
        try:
            self.verify_boot.discard()
        except libvirt.libvirtError as exc:
            raise self._libvirt_error("discard the verification boot", exc) from None


class InPlaceCapture:
    """Today's capture: the prototype itself is stopped, checkpointed, prepared and exported.

    create: stop_vm, checkpoint (an internal snapshot of every disk); always:
    restore_disks (revert), delete_checkpoint, restart_vm (if it was running)."""

    name: ClassVar[str] = "in-place"

    def __init__(self, backend: LibvirtBackend) -> None:
        self.backend = backend

    def create_steps(self) -> list[Step]:
        return [Step("stop_vm", self.stop_vm), Step("checkpoint", self.checkpoint)]

    def always_steps(self) -> list[Step]:
        return [
            Step("restore_disks", self.restore_disks),
            Step("delete_checkpoint", self.delete_checkpoint),
            Step("restart_vm", self.restart_vm),
        ]

    def _ordered(self) -> list[dict[str, str]]:
        b = self.backend
        disks = b._disks(b._persistent_xml())
        disks.sort(key=lambda d: d["target"] != b.state.in_place.root_target)  # stable: the root first
        return disks

    def disks(self) -> list[tuple[Path, str]]:
        return [(Path(d["path"]), d["format"]) for d in self._ordered()]

    def targets(self) -> list[str]:
        return [d["target"] for d in self._ordered()]

    def set_root(self, target: str) -> None:
        self.backend.state.in_place.root_target = target
        self.backend.persist()

    def check(self) -> None:
        """The prototype is shut off and checkpointed: nothing to check."""

    def boot_xml(self, channel: ET.Element) -> str:
        b = self.backend
        dom = b._domain()
        persistent = b._call(
            "read the definition",
            lambda: dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE),
        )
        root = ET.fromstring(persistent)
        devices = root.find("devices")
        assert devices is not None  # validated
        devices.append(channel)
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            element = root.find(event)
            if element is None:
                element = ET.SubElement(root, event)
            element.text = "destroy"
        return ET.tostring(root, encoding="unicode")

    def boot_domain(self) -> Any:
        return self.backend._domain()

    def report(self) -> dict[str, Any]:
        st = self.backend.state.in_place
        return {"capture": self.name, "consistency": "shutdown", "downtime_s": st.downtime_s}

    @property
    def _shutdown_in_flight(self) -> bool:
        st = self.backend.state.in_place
        return st.shutdown_requested and not st.stop_timed_out and not st.checkpoint

    def stop_vm(self) -> None:
        b, st = self.backend, self.backend.state.in_place
        dom = b._domain()
        if b.state.was_running is None:
            b.state.was_running = bool(b._call("query state", dom.isActive))
        b.mark_touched()
        if not b._call("query state", dom.isActive):
            return
        log.info("shutting down VM %s", b.state.vm_name)
        st.shutdown_requested = True
        st.stopped_at = time.time()
        b.persist()
        b._call("shut down the VM", dom.shutdown)
        deadline = time.monotonic() + b.config.timeouts.stop
        next_request = time.monotonic() + SHUTDOWN_REPEAT
        while b._call("query state", dom.isActive):
            b.engine.cancel.check()
            if time.monotonic() >= next_request:
                # a guest still booting drops an ACPI request (no logind yet): ask again
                with contextlib.suppress(ImgprepError):
                    b._call("shut down the VM", dom.shutdown)
                next_request = time.monotonic() + SHUTDOWN_REPEAT
            if time.monotonic() >= deadline:
                if b.config.force_stop:
                    log.warning("VM did not shut down in %.0fs; forcing it off", b.config.timeouts.stop)
                    b._call("power off the VM", dom.destroy)
                    break
                st.stop_timed_out = True
                b.persist()
                raise StopTimeout(
                    f"VM {b.state.vm_name} did not shut down within {b.config.timeouts.stop:.0f}s "
                    "(does the guest handle ACPI shutdown?); rerun with --force-stop to power it off"
                )
            b.engine.cancel.sleep(1.0)

    def checkpoint(self) -> None:
        b, st = self.backend, self.backend.state.in_place
        dom = b._domain()
        name = CHECKPOINT_PREFIX + b.record["uuid"][:8]
        st.checkpoint = name
        b.persist()  # before creating it: recover must know the name
        if self._snapshot(dom) is not None:
            return
        if b._call("query state", dom.isActive):
            raise ImgprepError("the VM is running; refusing to checkpoint a live disk", code="VmRunning")
        description = f"imgprep job {b.record['uuid']}: state before the prepare boot"
        xml = f"<domainsnapshot><name>{name}</name><description>{description}</description></domainsnapshot>"
        b._call("create the checkpoint", lambda: dom.snapshotCreateXML(xml, 0))

    def _snapshot(self, dom: Any) -> Any:
        b, st = self.backend, self.backend.state.in_place
        name = st.checkpoint
        if not name:
            return None
        names = b._call("list snapshots", dom.snapshotListNames)
        if name not in names:
            return None
        return b._call("look up the checkpoint", lambda: dom.snapshotLookupByName(name))

    def restore_disks(self) -> None:
        b = self.backend
        dom = b._domain()
        if b._call("query state", dom.isActive) and b._is_prepare_boot(dom):
            log.info("powering off the prepare boot")
            b._call("power off the prepare boot", dom.destroy)
        snapshot = self._snapshot(dom)
        if snapshot is None:
            return  # never created (nothing injected) or already reverted and deleted
        if b._call("query state", dom.isActive):
            raise ImgprepError("the VM is running; cannot revert its disks", code="VmRunning")
        b._call("revert to the checkpoint", lambda: dom.revertToSnapshot(snapshot, 0))

    def delete_checkpoint(self) -> None:
        b = self.backend
        dom = b._domain()
        snapshot = self._snapshot(dom)
        if snapshot is not None:
            b._call("delete the checkpoint", lambda: snapshot.delete(0))

    def restart_vm(self) -> None:
        b = self.backend
        if not b.state.was_running:
            return
        dom = b._domain()
        if b._call("query state", dom.isActive) and self._shutdown_in_flight:
            # imgprep died while the guest was shutting down at its request: let the
            # shutdown finish, then start it again (it ends as it was: running).
            deadline = time.monotonic() + b.config.timeouts.stop
            while b._call("query state", dom.isActive) and time.monotonic() < deadline:
                b.engine.cancel.sleep(1.0)
        if not b._call("query state", dom.isActive):
            log.info("restarting VM %s", b.state.vm_name)
            b._call("restart the VM", dom.create)
            st = b.state.in_place
            if st.stopped_at is not None and st.downtime_s is None:
                st.downtime_s = round(time.time() - st.stopped_at, 3)
                b.record["capture"] = self.report()
                b.persist()


CAPTURES["in-place"] = InPlaceCapture


class CloneCapture:
    """Clone mode (docs/capture.md): the prototype is never stopped (unless ``stop``
    consistency was chosen) nor written. create: ``capture`` (a point-in-time view of
    every disk), ``overlays`` (a throwaway qcow2 over each); the prepare boot is a
    transient clone over the overlays. always: ``discard_clone`` (destroy the clone,
    end the backup job or qemu-nbd, delete the view directory). The mechanism is
    ``clonecapture.CloneCapture``; this adapts it to the backend's chain and errors."""

    name: ClassVar[str] = "clone"

    def __init__(self, backend: LibvirtBackend) -> None:
        self.backend = backend
        self._view: CloneView | None = None

    @property
    def view(self) -> CloneView:
        """Built on first use: the VM's UUID and name are known only after validate."""
        if self._view is None:
            b = self.backend
            requested = b.request.consistency
            self._view = CloneView(
                conn=b._connect,
                vm_uuid=b.state.vm_uuid,
                vm_name=b.state.vm_name,
                job_uuid=b.record["uuid"],
                view_root=b.config.view_dir,
                state=b.state.clone,
                persist=b.persist,
                consistency=None if requested == "auto" else requested,  # type: ignore[arg-type]
                agent_timeout=max(1, round(b.config.timeouts.agent)),
                stop_timeout=b.config.timeouts.stop,
                socket_root=pit.SOCKET_ROOT,
                scratch_reserve=b.config.scratch_reserve_mib * MiB,
                guard_connect=lambda: libvirt.open(b.config.libvirt_uri),
            )
        return self._view

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        """libvirt errors of the capture are final (a half-taken view is not retried: the
        always step cleans it up), except for a lost connection before anything exists."""
        try:
            return fn()
        except libvirt.libvirtError as exc:
            raise ImgprepError(f"{what}: {exc}", code="LibvirtError") from None

    def create_steps(self) -> list[Step]:
        return [Step("capture", self.capture), Step("overlays", self.overlays)]

    def always_steps(self) -> list[Step]:
        return [Step("discard_clone", self.discard_clone)]

    def capture(self) -> None:
        b = self.backend
        b.mark_touched()  # first: from here on, recovery may have something to clean up
        if b.state.was_running is None:
            b.state.was_running = bool(b._call("query state", b._domain().isActive))
        self._run("take the point-in-time view", self.view.capture)
        b.record["capture"] = self.report()
        attempts = b.record["capture"].get("thaw_attempts") or 1
        if attempts > 1:  # thawed in the end, but a frozen guest is an outage: say so
            message = (
                f"the prototype's filesystems thawed only at attempt {attempts} of {pit.THAW_ATTEMPTS} "
                f"(frozen for up to {b.record['capture']['freeze_window_ms']:.0f} ms)"
            )
            log.warning("%s", message)
            b.record.setdefault("warnings", []).append(message)
            b.emit({"event": "warning", "step": "capture", "message": message})
        b.persist()

    def overlays(self) -> None:
        self._run("create the overlays", self.view.overlays)

    def discard_clone(self) -> None:
        b = self.backend
        if b._channel is not None:
            b._channel.close()
            b._channel = None
        thaw_failed: pit.ThawFailed | None = None
        try:
            st = b.state.clone
            if st.consistency == "freeze" and st.view is None:
                try:
                    self._thaw()  # imgprep died (or failed) between the freeze and the thaw
                except pit.ThawFailed as exc:
                    thaw_failed = exc  # loud, but the view is discarded first
            self.view.discard()
        except libvirt.libvirtError as exc:
            raise b._libvirt_error("discard the clone", exc) from None
        b._channel_path().unlink(missing_ok=True)
        if thaw_failed is not None:
            raise thaw_failed

    def _thaw(self) -> None:
        """Thaw the prototype's filesystems (thawing a thawed guest does nothing)."""
        b = self.backend
        dom = b._domain()
        if b._call("query state", dom.isActive):
            attempts = pit.thaw(dom)
            b.state.clone.cleaned.append(f"thawed the prototype's filesystems ({attempts} attempt(s))")
            b.persist()

    def disks(self) -> list[tuple[Path, str]]:
        return self.view.disks()

    def targets(self) -> list[str]:
        overlays = {d.overlay: d.target for d in self.view.view().disks}
        return [overlays[path] for path, _ in self.view.disks()]

    def set_root(self, target: str) -> None:
        self.backend.state.clone.root_target = target
        self.backend.persist()

    def check(self) -> None:
        try:
            self.view.check_view()
        except libvirt.libvirtError as exc:
            # libvirtd restarting: the view may be intact, ask again
            raise self.backend._libvirt_error("check the prototype", exc) from None

    def boot_xml(self, channel: ET.Element) -> str:
        return self.view.boot_xml(channel)

    def boot_domain(self) -> Any:
        if not self.backend.state.clone.clone_name:
            return None
        conn = self.backend._connect()
        try:
            return conn.lookupByName(self.backend.state.clone.clone_name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # not started yet, or powered off (a transient domain is gone then)
            raise self.backend._libvirt_error("look up the clone", exc) from None

    def report(self) -> dict[str, Any]:
        st = self.backend.state.clone
        view = st.view or {}
        freeze = view.get("freeze") or {}
        return {
            "capture": self.name,
            "consistency": st.consistency,
            "clone": st.clone_name,
            "point_in_time": view.get("taken_at"),
            "freeze_window_ms": freeze.get("window_ms"),
            "thaw_attempts": freeze.get("thaw_attempts"),
            "downtime_s": view.get("downtime_s"),
            "removed": list(st.removed),
        }


CAPTURES["clone"] = CloneCapture
