"""SmartOS backend: a zone on a compute node reached over SSH, prepared by an early SMF service.

The same chain as every backend (``Backend.chain``), with these hooks. The package
is split by concern: ``node`` (SSH plumbing and the zone-root writes, by the remote
scripts in ``remote/``), ``zfs`` (marked snapshots, the streamed export), ``imgadm``
(the manifest fields imgadm inherits), this module (the chain's hooks and the state).

* locate: the VM on ``--host``; without one (the API), on each configured compute node
  in order, the first that has it (a node that cannot be asked is skipped);

* validate: ``vmadm get`` (brand, state, datasets, origin image), the node's
  snapshots (an earlier job's leftovers make the VM busy), ``imgadm get`` of the
  origin image for the fields imgadm inherits, ``sysinfo`` for ``min_platform``;
* stop: ``vmadm stop`` (``-F`` only with ``--force-stop``);
* checkpoint: ``zfs snapshot -o imgprep:job=<job> <ds>@imgprep-pre-prepare-<job8>`` of
  the zone dataset and each delegated dataset. The user property marks the snapshot
  as this job's, so cleanup never destroys a snapshot it did not make;
* inject: written under the zone root (``<zonepath>/root``) by a constant remote
  script (``remote/zone.js``, on the platform's node) that walks it one directory entry
  at a time and never follows a symlink (the zone root is the guest's: a planted or
  swapped-in symlink must not redirect a write as global-zone root); the zone must be
  stopped before and still stopped after the writes:

  - joyent/joyent-minimal: the SMF manifest, its method, the operator script;
  - lx: the systemd unit, its ``sysinit.target.wants`` link, the runner and the
    operator script of the libvirt backend's Linux guest side, the runner set to
    report through ``/native/usr/sbin/mdata-put`` (an lx zone has no serial port);

  and last the ``armed`` file. Then ``vmadm update`` removes
  ``prepare-image:state``/``prepare-image:error`` (and imgprep's report keys) from
  the customer metadata, as imgadm does;
* boot: ``vmadm start``. In a joyent zone svc.startd imports the manifest and runs
  the method right after ``filesystem/minimal``, before ``filesystem/local`` and
  every application (docs/smartos-guest.md); in an lx zone systemd runs the unit
  before ``sysinit.target``, so before every unit with default dependencies. Either
  reports through ``mdata-put`` and powers the zone off;
* poll: ``vmadm get`` -> ``customer_metadata`` and ``state``;
* export: ``zfs snapshot <ds>@final`` (also marked), then ``zfs send`` of it streamed
  back over SSH, compressed and hashed on the fly (gzip, xz or none: what IMGAPI and
  ``imgadm import`` read; zstd is refused at validation);
* restore: force-stop the prepare boot if it still runs, destroy our ``@final``,
  ``zfs rollback`` every checkpoint (never ``-r``: a newer snapshot that is not ours
  stops the rollback rather than being destroyed), destroy the checkpoints, restart.

Customer metadata lives in ``<zonepath>/config`` on the zone dataset, so the rollback
restores it too.

bhyve and kvm VMs (Linux guests) differ in validate, inject and export (``hvm``): their
disks are zvols holding a guest filesystem the global zone must not mount, so imgprep
opens disks[0] from its own host over SSH and libguestfs writes the early unit inside
its appliance; the checkpoint covers the zone dataset and every disk's zvol, and the
image is ``zfs send`` of ``<disk0>@final`` (docs/smartos-backend.md). lx zones must
boot systemd (the unit is a systemd unit).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any, Self

from imgprep import artifacts, safejson
from imgprep.backends.base import Backend, JobState, StopTimeout, VmFacts
from imgprep.backends.smartos import hvm, imgadm, zfs
from imgprep.backends.smartos.node import Node, ZoneFile
from imgprep.channel import STATES, GuestStatus, cap_field, parse_report
from imgprep.errors import CommandError, ImgprepError, InvalidInput, TransientError, VmBusy
from imgprep.export import STREAM_COMPRESSIONS, ExportResult
from imgprep.sanitize import clean
from imgprep.ssh import SshTarget
from imgprep.workflow import Engine

log = logging.getLogger(__name__)

ZONE_BRANDS = ("joyent", "joyent-minimal", "lx")
REFUSED_BRANDS: dict[str, str] = {}
STATE_KEY = "prepare-image:state"
ERROR_KEY = "prepare-image:error"
REPORT_KEY = "imgprep:report"  # the boot report: the lx runner's, or the SMF method's (clock=zone)
LOG_KEY = "imgprep:log"  # the tail of the operator script's output (lx zones)
# A compute node that could not be asked at all (not a problem of the VM): the search tries the next.
NODE_ERRORS = frozenset({"NodeUnreachable", "HostKeyUnknown", "HostKeyChanged", "HostKeyRefused", "SshAuthFailed"})

# Paths relative to the zone root (docs/smartos-guest.md).
MANIFEST_IN_ZONE = "var/svc/manifest/site/imgprep-operator-script.xml"
METHOD_IN_ZONE = "var/svc/method/imgprep-operator-script"
STATE_DIR_IN_ZONE = "var/imgprep"
ARMED_IN_ZONE = "var/imgprep/armed"
SCRIPT_IN_ZONE = "var/imgprep/operator-script"
# lx zones: the libvirt backend's Linux guest side, at the same paths.
LX_PREFIX_IN_ZONE = artifacts.PREFIX.lstrip("/")
LX_UNIT_IN_ZONE = artifacts.UNIT_PATH.lstrip("/")
LX_INIT = "sbin/init"  # what the lx brand starts; systemd distributions link it to systemd
# The platform's mdata-put, seen from inside an lx zone (/native is the platform's /usr, lofs).
LX_MDATA_PUT = "/native/usr/sbin/mdata-put"
LX_DEFAULT_SCRIPT = "operator_scripts/linux-prepare-image"

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclasses.dataclass
class Zone:
    brand: str
    zonepath: str
    zfs_filesystem: str
    datasets: list[str]  # what the checkpoint snapshots: the zone dataset, delegated datasets, disk zvols
    disks: list[str] = dataclasses.field(default_factory=list)  # bhyve/kvm: the disks' zvols, disks[0] imaged


@dataclasses.dataclass
class Checkpoint:
    name: str
    datasets: list[str]


@dataclasses.dataclass
class SmartosState(JobState):
    """The SmartOS job state: the node, the zone, the snapshots made (saved before they are)."""

    node: str | None = None  # the configured host name (or [USER@]HOST[:PORT]) the VM was found on
    ssh: dict[str, Any] | None = None  # the target used, to compare at recovery (never connected to from here)
    zone: Zone | None = None
    checkpoint: Checkpoint | None = None
    final_snapshot: str | None = None
    injected: list[str] = dataclasses.field(default_factory=list)
    disks_restored: bool = False
    stream_bytes: int | None = None
    guest_os: dict[str, str] | None = None  # bhyve/kvm: what libguestfs inspected on disks[0]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        data = dict(data)
        zone, checkpoint = data.pop("zone", None), data.pop("checkpoint", None)
        state = super().from_json(data)
        state.zone = Zone(**zone) if zone else None
        state.checkpoint = Checkpoint(**checkpoint) if checkpoint else None
        return state


def _is_uuid(text: str) -> bool:
    return bool(_UUID_RE.match(text))


def parse_guest_error(raw: str | None) -> tuple[str | None, str | None]:
    """``prepare-image:error`` -> (one-line detail, output tail).

    imgprep's SMF method writes a JSON object (docs/smartos-guest.md). The lx runner
    writes the message on the first line and the output tail after it; classic
    prepare-image scripts write a line of free text.
    """
    if raw is None:
        return None, None
    raw = cap_field(str(raw))
    try:
        data = safejson.loads(raw)
    except ValueError:  # not JSON, too deep, too large: read as text
        data = None
    if isinstance(data, dict):
        message = cap_field(str(data.get("message") or "no message"))
        tail = data.get("output_tail")
        tail_text = cap_field(str(tail)) if tail else None
    else:
        first, _, rest = raw.strip().partition("\n")
        message, tail_text = first.strip(), rest.strip() or None
    if tail_text:
        last = [line for line in tail_text.splitlines() if line.strip()][-3:]
        message += "; last output: " + " | ".join(last)
    return message, tail_text


class SmartosBackend(Backend[SmartosState]):
    name = "smartos"
    default_script = "operator_scripts/smartos-prepare-image"
    default_compression = "gzip"  # what imgadm and IMGAPI read
    needs_host = True  # the CLI names the node; the API searches its configured nodes
    state_type = SmartosState

    def __init__(self, config: Any, engine: Engine, request: Any) -> None:
        super().__init__(config, engine, request)
        self._nodes: dict[str, Node] = {}
        self._located: tuple[str, dict[str, Any]] | None = None  # (uuid, vmadm get) from locate

    # --- lifecycle ----------------------------------------------------------------

    def _candidates(self) -> list[str]:
        """The nodes to look on: the job's, else ``--host``, else the configured ones in order."""
        if self.state.node:
            return [self.state.node]
        if self.request.host:
            return [self.request.host]
        names = list(self.config.serve.hosts or self.config.hosts)
        if not names:
            raise InvalidInput("--host is required with --backend smartos")
        return names

    def _node(self, name: str | None = None) -> Node:
        name = name or self.state.node or self._candidates()[0]
        if name not in self._nodes:
            target = SshTarget.resolve(name, self.config.hosts)
            # a host key is only ever accepted while creating, never while recovering
            self._nodes[name] = Node(target, accept_new_host_key=self.request.accept_new_host_key)
        return self._nodes[name]

    def close(self) -> None:
        """Close every SSH connection (a long-running ``imgprep serve`` must not keep one per job)."""
        for node in self._nodes.values():
            node.close()
        self._nodes.clear()

    def check_recovery_target(self) -> None:
        if not self.state.ssh:
            return  # the job never reached a node: nothing to connect to
        name = self.state.node or self.request.host  # version-1 records name the node in the request only
        if not name:
            raise InvalidInput(f"job {self.record['uuid']} names no compute node to recover on")
        target = SshTarget.resolve(name, self.config.hosts)
        configured = (target.host, target.port, target.user)
        stored = (self.state.ssh.get("host"), self.state.ssh.get("port"), self.state.ssh.get("user"))
        if configured != stored:
            raise InvalidInput(
                f"job {self.record['uuid']} ran on {stored[2]}@{stored[0]}:{stored[1]} ({name}), but the "
                f"configuration resolves {name} to {target.user}@{target.host}:{target.port}; recovery connects "
                "only as configured: fix the hosts: entry, then run the recovery again",
                code="RecoveryTargetMismatch",
            )
        self.state.node = name
        self._nodes[name] = Node(target, accept_new_host_key=False)

    def locate(self) -> str:
        """The VM's UUID: on the job's node, or the first configured node that has it."""
        unasked: list[str] = []
        candidates = self._candidates()
        for name in candidates:
            try:
                uuid, vm = self._lookup(self._node(name))
            except InvalidInput as exc:
                if len(candidates) == 1:
                    raise
                if exc.code == "VmNotFound":
                    continue
                if exc.code in NODE_ERRORS:
                    log.warning("compute node %s: %s", name, exc.message)
                    unasked.append(name)
                    continue
                raise
            if len(candidates) > 1:
                log.info("VM %s is on compute node %s", self.request.vm, name)
            self.state.node = name
            self.record["params"]["host"] = name  # the listing shows the node that has the job
            self._located = (uuid, vm)
            return uuid
        if unasked:
            raise InvalidInput(
                f"VM {self.request.vm} is not on the reachable compute nodes; could not ask {', '.join(unasked)} "
                "(see the server log)",
                code="NodesUnreachable",
            )
        raise InvalidInput(f"no VM {self.request.vm} on the compute nodes {', '.join(candidates)}", code="VmNotFound")

    def _lookup(self, node: Node) -> tuple[str, dict[str, Any]]:
        try:
            node.connect()  # the host key is checked here, before any command
            vm_arg = self.request.vm
            uuid = vm_arg
            if not _is_uuid(vm_arg):
                try:
                    uuid = node.run(["vmadm", "lookup", "-1", f"alias={vm_arg}"]).stdout.strip()
                except CommandError:
                    raise InvalidInput(
                        f"no VM with alias {vm_arg!r} on {node.target.host}", code="VmNotFound"
                    ) from None
            try:
                vm: dict[str, Any] = node.json(["vmadm", "get", uuid])
            except CommandError:
                raise InvalidInput(f"no VM {vm_arg!r} on {node.target.host}", code="VmNotFound") from None
        except TransientError as exc:
            node.close()
            raise InvalidInput(
                f"cannot use compute node {node.target}: {exc.message}", code="NodeUnreachable"
            ) from None
        return str(vm.get("uuid") or uuid), vm

    # --- plumbing ---------------------------------------------------------------------

    @property
    def _uuid(self) -> str:
        return self.state.vm_uuid

    @property
    def _zone(self) -> Zone:
        if self.state.zone is None:
            raise ImgprepError("the job has no zone (it was never validated)")
        return self.state.zone

    def _run(self, argv: list[str], *, input: bytes | None = None) -> Any:
        return self._node().run(argv, input=input)

    def _vm(self) -> dict[str, Any]:
        vm: dict[str, Any] = self._node().json(["vmadm", "get", self._uuid])
        return vm

    def _ours(self, dataset: str, name: str) -> bool:
        return zfs.ours(zfs.snapshots(self._node(), dataset), name, self.record["uuid"])

    def _wait_state(self, wanted: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._vm().get("state") == wanted:
                return True
            if time.monotonic() >= deadline:
                return False
            self.engine.cancel.sleep(min(self.poll_interval, 1.0))

    def _zone_root(self) -> str:
        return f"{self._zone.zonepath}/root"

    # --- validate -----------------------------------------------------------------------

    def validate(self) -> VmFacts:
        if self._located is None:
            self.locate()
        assert self._located is not None
        uuid, vm = self._located
        self._located = None  # a second validation asks the node again
        node = self._node()
        try:
            return self._validate(node, uuid, vm)
        except TransientError as exc:
            raise InvalidInput(
                f"cannot use compute node {node.target}: {exc.message}", code="NodeUnreachable"
            ) from None

    def _validate(self, node: Node, uuid: str, vm: dict[str, Any]) -> VmFacts:
        name = str(vm.get("alias") or uuid)
        brand = str(vm.get("brand"))
        if brand in hvm.HVM_BRANDS:
            return hvm.validate(self, node, uuid, vm)
        if brand in REFUSED_BRANDS:
            raise InvalidInput(f"VM {name} (brand {brand}): {REFUSED_BRANDS[brand]}", code="NotSupported")
        problems: list[str] = []
        if brand not in ZONE_BRANDS:
            problems.append(
                f"VM {name} has brand {brand!r}; the SmartOS backend prepares "
                f"{', '.join((*ZONE_BRANDS, *hvm.HVM_BRANDS))}"
            )
        if self.request.mode == "legacy" and brand != "lx":
            problems.append(
                f"--mode legacy (the classic late placement) exists for Linux guests (lx, bhyve, kvm); "
                f"{name} is {brand}"
            )
        state = vm.get("state")
        if state not in ("running", "stopped"):
            problems.append(f"VM {name} is {state!r}; it must be running or stopped")
        dataset = vm.get("zfs_filesystem")
        zonepath = vm.get("zonepath")
        if not dataset or not zonepath:
            problems.append(f"VM {name}: vmadm reports no zfs_filesystem/zonepath")
        compression = self.request.compression
        if compression not in STREAM_COMPRESSIONS:
            problems.append(
                f"compression {compression} is not available for SmartOS images: IMGAPI and imgadm import read "
                f"{', '.join(STREAM_COMPRESSIONS)} (and bzip2); pass --compression gzip"
            )
        datasets = [str(dataset), *[str(d) for d in vm.get("datasets") or []]] if dataset else []
        for ds in datasets:
            snaps = zfs.snapshots(node, ds)
            for snap, job in snaps.items():
                if snap.startswith(zfs.CHECKPOINT_PREFIX) or (job not in ("-", "") and job != self.record["uuid"]):
                    raise VmBusy(
                        f"VM {name} still has snapshot {ds}@{clean(snap)} from imgprep job {clean(job)}; "
                        "run `imgprep jobs list` and `imgprep jobs recover JOB_UUID`"
                    )
            if ds == dataset and zfs.FINAL_SNAPNAME in snaps and snaps[zfs.FINAL_SNAPNAME] != self.record["uuid"]:
                problems.append(
                    f"{ds}@{zfs.FINAL_SNAPNAME} already exists (left by imgadm create?); imgprep names the image "
                    "snapshot @final and will not rename or destroy yours: remove or rename it first"
                )
        if brand == "lx" and zonepath and not problems:
            root = f"{zonepath}/root"
            init = node.readlink(root, LX_INIT)
            if not init.endswith("/systemd") or not node.present(root, ["etc/systemd/system"]):
                problems.append(
                    f"lx zone {name} does not boot systemd (/{LX_INIT} is not a link to systemd); "
                    "imgprep's early service for lx zones is a systemd unit"
                )
        if dataset and not problems:
            out = node.run(["zfs", "list", "-H", "-p", "-o", "referenced", str(dataset)]).stdout.strip()
            self.check_free_space(int(out) if out.isdigit() else 0, problems)
        if problems:
            raise InvalidInput(problems)
        learned = imgadm.learn(node, vm, brand)
        self.state.ssh = {**node.target.to_dict(), "accept_new_host_key": False}
        self.state.zone = Zone(brand, str(zonepath), str(dataset), datasets)
        return VmFacts(str(vm.get("uuid") or uuid), name, state == "running", learned)

    # --- the chain ------------------------------------------------------------------------

    def stop_vm(self) -> None:
        vm = self._vm()
        if self.state.was_running is None:
            self.state.was_running = vm.get("state") == "running"
        self.mark_touched()
        if vm.get("state") == "stopped":
            return
        log.info("stopping zone %s", self.state.vm_name)
        try:
            self._run(["vmadm", "stop", self._uuid])
        except CommandError as exc:
            log.warning("vmadm stop: %s", exc.message)
        if self._wait_state("stopped", self.config.timeouts.stop):
            return
        if not self.config.force_stop:
            raise StopTimeout(
                f"zone {self.state.vm_name} did not stop within {self.config.timeouts.stop:.0f}s; "
                "rerun with --force-stop to halt it"
            )
        log.warning("zone did not stop in %.0fs; halting it (vmadm stop -F)", self.config.timeouts.stop)
        self._run(["vmadm", "stop", "-F", self._uuid])
        if not self._wait_state("stopped", 60):
            raise StopTimeout(f"zone {self.state.vm_name} did not halt")

    def checkpoint(self) -> None:
        name = zfs.CHECKPOINT_PREFIX + self.record["uuid"][:8]
        datasets = list(self._zone.datasets)
        self.state.checkpoint = Checkpoint(name, datasets)
        self.persist()  # before creating them: recover must know the names
        if self._vm().get("state") != "stopped":
            raise ImgprepError("the zone is running; refusing to checkpoint it", code="VmRunning")
        for ds in datasets:
            if not self._ours(ds, name):
                zfs.snapshot(self._node(), f"{ds}@{name}", self.record["uuid"])

    def inject(self) -> None:
        if self._vm().get("state") != "stopped":
            raise ImgprepError("the zone is running; refusing to write into its root", code="VmRunning")
        if self._zone.disks:
            hvm.inject(self)
            self._run(["vmadm", "update", self._uuid], input=json.dumps(self._contract_reset()).encode())
            return
        files = self._lx_files() if self._zone.brand == "lx" else self._smf_files()
        self.state.injected = [f.rel for f in files]
        self.persist()
        node, root = self._node(), self._zone_root()
        for f in files:  # the armed file is last: a partial injection never runs
            node.write_zone_file(root, f)
        if self._vm().get("state") != "stopped":  # nothing stops a `vmadm start` meanwhile: look again
            log.warning("zone %s was started while imgprep wrote into its root; halting it", self.state.vm_name)
            self._run(["vmadm", "stop", "-F", self._uuid])  # it would run the armed service outside the job
            self._wait_state("stopped", 60)
            raise ImgprepError(
                "the zone was started while imgprep wrote into its root; halted, to be rolled back", code="VmRunning"
            )
        # The contract's keys must start empty (imgadm does the same before its boot).
        self._run(["vmadm", "update", self._uuid], input=json.dumps(self._contract_reset()).encode())

    @staticmethod
    def _contract_reset() -> dict[str, list[str]]:
        return {"remove_customer_metadata": [STATE_KEY, ERROR_KEY, REPORT_KEY, LOG_KEY]}

    def _smf_files(self) -> list[ZoneFile]:
        """joyent zones: the early SMF service (docs/smartos-guest.md)."""
        request = self.request
        armed = f"IMGPREP_SCRIPT_TIMEOUT={int(self.config.timeouts.prepare)}\n"
        return [
            ZoneFile(SCRIPT_IN_ZONE, request.script, "0700"),
            ZoneFile(METHOD_IN_ZONE, artifacts.artifact("smf/imgprep-operator-script").read_bytes(), "0755"),
            ZoneFile(MANIFEST_IN_ZONE, artifacts.artifact("smf/imgprep-operator-script.xml").read_bytes(), "0444"),
            ZoneFile(ARMED_IN_ZONE, armed.encode(), "0600"),
        ]

    def _lx_files(self) -> list[ZoneFile]:
        """lx zones: the early systemd unit and runner of the Linux guest side, reporting via mdata."""
        request = self.request
        script = request.script
        if request.script_is_default:  # the zone runs Linux: the Linux cleanup
            default = artifacts.artifact(LX_DEFAULT_SCRIPT)
            script = default.read_bytes()
            self.record["params"]["script_name"] = default.name  # the job record says which script ran
        mode: artifacts.Mode = "legacy" if request.mode == "legacy" else "early"
        wants_dir = artifacts.wants_link(mode).rsplit("/", 1)[0].lstrip("/")
        files = artifacts.linux_injection(
            mode=mode,
            script=script,
            script_timeout=int(self.config.timeouts.prepare),
            channel=f"mdata:{LX_MDATA_PUT}",
            wants_dir_exists=bool(self._node().present(self._zone_root(), [wants_dir])),
        )
        return [  # the prefix directory is created 0700, as the libvirt backend does
            ZoneFile(
                f.path.lstrip("/"),
                f.data,
                f"{f.mode:04o}",
                dirmode="0700" if f.path.startswith(artifacts.PREFIX + "/") else "0755",
                link=f.link,
            )
            for f in files
        ]

    def boot_prepare(self) -> None:
        vm = self._vm()
        if self.state.prepare_boot:
            # a retry after a dropped connection: did the first attempt boot it?
            metadata = vm.get("customer_metadata") or {}
            if vm.get("state") == "running" or metadata.get(STATE_KEY):
                return
        elif vm.get("state") != "stopped":
            raise ImgprepError("the zone is running before the prepare boot", code="VmRunning")
        self.state.prepare_boot = True
        self.persist()
        log.info("starting the prepare boot of zone %s", self.state.vm_name)
        self._run(["vmadm", "start", self._uuid])

    def poll_guest(self) -> tuple[GuestStatus, bool]:
        vm = self._vm()
        metadata = vm.get("customer_metadata") or {}
        state = metadata.get(STATE_KEY)
        if state is not None and state not in STATES:
            log.warning("ignoring unknown %s value %s", STATE_KEY, clean(state, limit=100))
            state = None
        seen = list(self.status.seen_states)
        if state is not None and (not seen or seen[-1] != state):
            seen.append(state)
        error, tail = parse_guest_error(metadata.get(ERROR_KEY))
        raw_report = metadata.get(REPORT_KEY)
        status = GuestStatus(
            state=state,
            error=error,
            log=cap_field(str(metadata.get(LOG_KEY) or tail)) if (metadata.get(LOG_KEY) or tail) else None,
            report=parse_report(cap_field(raw_report)) if isinstance(raw_report, str) else None,
            seen_states=seen,
        )
        return status, vm.get("state") == "stopped"

    def export(self) -> ExportResult:
        dataset = self._zone.zfs_filesystem
        if self._vm().get("state") != "stopped":
            raise ImgprepError("the zone is not stopped; refusing to snapshot it", code="VmRunning")
        if self._zone.disks:  # bhyve/kvm: the image is disks[0]
            hvm.check_clean(self)
            dataset = self._zone.disks[0]
            leftovers_of = []
        elif self._zone.brand == "lx":
            leftovers_of = [LX_UNIT_IN_ZONE, artifacts.wants_link("early").lstrip("/"), LX_PREFIX_IN_ZONE]
            leftovers_of.append(artifacts.wants_link("legacy").lstrip("/"))
        else:
            leftovers_of = [MANIFEST_IN_ZONE, METHOD_IN_ZONE, STATE_DIR_IN_ZONE]
        leftovers = self._node().present(self._zone_root(), leftovers_of) if leftovers_of else []
        if leftovers:
            raise ImgprepError(
                f"the prepare boot left imgprep files in the zone: {', '.join(leftovers)}; not imaging it",
                code="PrepareImageError",
            )
        snap = f"{dataset}@{zfs.FINAL_SNAPNAME}"
        self.state.final_snapshot = snap
        self.persist()  # before creating it: the rollback must destroy it
        if not self._ours(dataset, zfs.FINAL_SNAPNAME):
            zfs.snapshot(self._node(), snap, self.record["uuid"])
        # the zone may have filled its dataset during the prepare boot: the stream's size, now
        estimate = zfs.send_size(self._node(), snap)
        self.check_free_space_before_export(estimate)
        compression = self.request.compression
        dest = self.request.output_dir / f"{self.request.image_uuid}{zfs.FILE_SUFFIX[compression]}"
        t0 = time.monotonic()
        result, received = zfs.receive(
            self._node(),
            snap,
            dest,
            compression,
            image_uuid=self.request.image_uuid,
            estimate=estimate,
            check_cancel=self.engine.cancel.check,
            progress=lambda pct: self.emit({"event": "progress", "step": "export", "percent": pct}),
        )
        self.state.export_seconds = round(time.monotonic() - t0, 3)
        self.state.stream_bytes = received
        return result

    def restore_disks(self) -> None:
        if self.state.disks_restored or self.state.zone is None:
            return
        vm = self._vm()
        checkpoint = self.state.checkpoint
        node = self._node()
        if vm.get("state") != "stopped":
            if self.state.prepare_boot:
                log.info("halting the prepare boot")
                self._run(["vmadm", "stop", "-F", self._uuid])
                if not self._wait_state("stopped", 120):
                    raise ImgprepError("the zone did not halt; cannot roll it back", code="VmRunning")
            elif checkpoint and any(checkpoint.name in zfs.snapshots(node, ds) for ds in checkpoint.datasets):
                raise ImgprepError(
                    "the zone was started by someone else after its checkpoint; cannot roll it back while it runs",
                    code="VmRunning",
                )
            else:
                return  # no checkpoint was taken: nothing of the zone was changed
        final = self.state.final_snapshot
        if final:
            dataset, _, snapname = final.partition("@")
            if self._ours(dataset, snapname):
                self._run(["zfs", "destroy", final])
        if checkpoint:
            for ds in checkpoint.datasets:
                if self._ours(ds, checkpoint.name):
                    # no -r: a newer snapshot that is not ours stops us instead of being destroyed
                    self._run(["zfs", "rollback", f"{ds}@{checkpoint.name}"])
        self.state.disks_restored = True
        self.persist()

    def delete_checkpoint(self) -> None:
        checkpoint = self.state.checkpoint
        if not checkpoint:
            return
        for ds in checkpoint.datasets:
            if self._ours(ds, checkpoint.name):
                self._run(["zfs", "destroy", f"{ds}@{checkpoint.name}"])

    def restart_vm(self) -> None:
        if not self.state.was_running:
            return
        if self._vm().get("state") != "running":
            log.info("restarting zone %s", self.state.vm_name)
            self._run(["vmadm", "start", self._uuid])
