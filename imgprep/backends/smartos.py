"""SmartOS backend: a zone on a compute node reached over SSH, prepared by an early SMF service.

The same chain as every backend (``Backend.chain``), with these hooks:

* validate: ``vmadm get`` (brand, state, datasets, origin image), the node's
  snapshots (an earlier job's leftovers make the VM busy), ``imgadm get`` of the
  origin image for the fields imgadm inherits, ``sysinfo`` for ``min_platform``;
* stop: ``vmadm stop`` (``-F`` only with ``--force-stop``);
* checkpoint: ``zfs snapshot -o imgprep:job=<job> <ds>@imgprep-pre-prepare-<job8>`` of
  the zone dataset and each delegated dataset. The user property marks the snapshot
  as this job's, so cleanup never destroys a snapshot it did not make;
* inject: written under the zone root (``<zonepath>/root``) by a constant remote
  ``sh`` script that refuses to follow symlinks (the zone root is the guest's: a
  planted symlink must not redirect a write as global-zone root):

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

bhyve and kvm VMs are refused: their disks are zvols holding a guest filesystem the
global zone must not mount, so the early service cannot be placed safely from here
(docs/smartos-backend.md). lx zones must boot systemd (the unit is a systemd unit).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgprep import artifacts, safejson
from imgprep.backends.base import Backend, CreateRequest, StopTimeout, VmFacts
from imgprep.channel import STATES, GuestStatus, cap_field, parse_report
from imgprep.errors import CommandError, ImgprepError, InvalidInput, TransientError, VmBusy
from imgprep.export import STREAM_COMPRESSIONS, CompressingWriter, ExportResult
from imgprep.outputfiles import create_private, publish, workdir
from imgprep.sanitize import clean
from imgprep.ssh import SshClient, SshTarget

log = logging.getLogger(__name__)

ZONE_BRANDS = ("joyent", "joyent-minimal", "lx")
REFUSED_BRANDS = {
    "bhyve": "bhyve VMs are not supported by the SmartOS backend: the early-boot service would have to be "
    "written into the guest filesystem inside a zvol, which the global zone must not mount",
    "kvm": "kvm VMs are not supported by the SmartOS backend: the early-boot service would have to be "
    "written into the guest filesystem inside a zvol, which the global zone must not mount",
}
CHECKPOINT_PREFIX = "imgprep-pre-prepare-"
FINAL_SNAPNAME = "final"  # what imgadm names the image snapshot (origins of incremental images need it)
JOB_PROPERTY = "imgprep:job"  # ZFS user property marking the snapshots a job made
STATE_KEY = "prepare-image:state"
ERROR_KEY = "prepare-image:error"
REPORT_KEY = "imgprep:report"  # the boot report: the lx runner's, or the SMF method's (clock=zone)
LOG_KEY = "imgprep:log"  # the tail of the operator script's output (lx zones)
FILE_SUFFIX = {"none": ".zfs", "gzip": ".zfs.gz", "xz": ".zfs.xz"}

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

# What imgadm copies from the origin image's manifest (imgadm.js createImage).
INHERITED_FIELDS = (
    "type",
    "os",
    "requirements",
    "users",
    "billing_tags",
    "traits",
    "generate_passwords",
    "inherited_directories",
    "nic_driver",
    "disk_driver",
    "cpu_type",
    "image_size",
)

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SEND_SIZE_RE = re.compile(r"^size\s+(\d+)\s*$", re.MULTILINE)

# Remote scripts are constants; only their positional arguments vary, and those are
# quoted like every other argument. POSIX sh (illumos /bin/sh is ksh93).
#
# write: $1 zone root, $2 path relative to it, $3 octal mode, $4 octal mode of the
# directories it creates, $5 (optional) a symlink target: make a symlink instead of
# a file. A file's content comes on stdin. Refuses any existing component that is a
# symlink or not a directory, and a target that is a symlink or not a regular file.
_WRITE_SCRIPT = r"""set -eu
root=$1 rel=$2 mode=$3 dirmode=$4 link=${5-}
fail() { printf 'imgprep: %s\n' "$*" >&2; exit 3; }
[ -d "$root" ] && [ ! -L "$root" ] || fail "zone root $root is not a directory"
case /$rel/ in */../* | */./* | //*) fail "bad path $rel" ;; esac
cur=$root
dir=${rel%/*}
[ "$dir" = "$rel" ] && dir=
set -f
oldifs=$IFS
IFS=/
for part in $dir; do
    IFS=$oldifs
    [ -n "$part" ] || continue
    cur=$cur/$part
    [ -L "$cur" ] && fail "refusing to write through the symlink $cur"
    [ -e "$cur" ] || mkdir -m "$dirmode" "$cur"
    [ -d "$cur" ] || fail "$cur is not a directory"
done
IFS=$oldifs
target=$cur/${rel##*/}
if [ -L "$target" ] || { [ -e "$target" ] && [ ! -f "$target" ]; }; then
    fail "refusing to replace $target: not a regular file"
fi
rm -f "$target"
if [ -n "$link" ]; then
    ln -s "$link" "$target"
else
    (umask 077 && set -C && cat >"$target")
    chmod "$mode" "$target"
fi
"""
# readlink: `ls -ld` of $1 if it is a symlink ("... $1 -> target"; illumos has no
# readlink(1)); never follows it.
_READLINK_SCRIPT = r"""if [ -L "$1" ]; then ls -ld -- "$1"; fi
"""
# present: prints each argument that exists (a dangling symlink counts).
_PRESENT_SCRIPT = r"""for p; do
    if [ -e "$p" ] || [ -L "$p" ]; then printf '%s\n' "$p"; fi
done
"""


@dataclass(frozen=True)
class ZoneFile:
    """One file (or symlink, if ``link``) inject writes, relative to the zone root."""

    rel: str
    data: bytes = b""
    mode: str = "0644"
    dirmode: str = "0755"  # of the directories it has to create
    link: str = ""


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


class SmartosBackend(Backend):
    name = "smartos"
    default_script = "operator_scripts/smartos-prepare-image"
    default_compression = "gzip"  # what imgadm and IMGAPI read

    accept_new_host_key: bool = False  # set by the CLI's --accept-new-host-key
    _ssh: SshClient | None = None

    # --- plumbing ---------------------------------------------------------------------

    def _target(self) -> SshTarget:
        saved = self.state.get("ssh")
        if saved:  # recover: the node the job used, never a new host key
            return SshTarget(**{**saved, "accept_new_host_key": False})
        host = self.params.get("host")
        if not host:
            raise InvalidInput("--host is required with --backend smartos")
        return SshTarget.resolve(host, self.config.hosts)

    def _client(self) -> SshClient:
        if self._ssh is None:
            self._ssh = SshClient(self._target(), accept_new_host_key=self.accept_new_host_key)
        return self._ssh

    def close(self) -> None:
        """Close the SSH connection, if any (a long-running ``imgprep serve`` must not keep one per job)."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None

    def _run(
        self, argv: Sequence[str], *, input: bytes | None = None, allowed: Sequence[int] = (0,)
    ) -> subprocess.CompletedProcess[str]:
        return self._client().run(argv, input=input, allowed=allowed)

    def _json(self, argv: Sequence[str]) -> Any:
        out = self._run(argv).stdout
        try:
            return safejson.loads(out, max_bytes=64 * 1024 * 1024, max_depth=64)
        except ValueError:
            raise ImgprepError(f"{' '.join(argv)}: the node answered non-JSON output", code="BadNodeOutput") from None

    @property
    def _uuid(self) -> str:
        return str(self.state["vm_uuid"])

    @property
    def _zone(self) -> dict[str, Any]:
        zone: dict[str, Any] = self.state["zone"]
        return zone

    def _vm(self) -> dict[str, Any]:
        vm: dict[str, Any] = self._json(["vmadm", "get", self._uuid])
        return vm

    def _snapshots(self, dataset: str) -> dict[str, str]:
        """Snapshots of ``dataset``: short name -> value of imgprep:job (``-`` if unset)."""
        out = self._run(["zfs", "list", "-H", "-t", "snapshot", "-o", f"name,{JOB_PROPERTY}", "-d", "1", dataset])
        snaps: dict[str, str] = {}
        for line in out.stdout.splitlines():
            name, _, job = line.partition("\t")
            if "@" in name:
                snaps[name.split("@", 1)[1]] = job.strip() or "-"
        return snaps

    def _snapshot(self, full_name: str) -> None:
        self._run(["zfs", "snapshot", "-o", f"{JOB_PROPERTY}={self.record['uuid']}", full_name])

    def _ours(self, snaps: dict[str, str], name: str) -> bool:
        """Whether snapshot ``name`` exists and this job made it; refuses a foreign one."""
        if name not in snaps:
            return False
        if snaps[name] != self.record["uuid"]:
            raise ImgprepError(
                f"snapshot @{name} exists but was not made by this job ({JOB_PROPERTY}={snaps[name]}); "
                "leaving it alone",
                code="SnapshotConflict",
            )
        return True

    def _wait_state(self, wanted: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._vm().get("state") == wanted:
                return True
            if time.monotonic() >= deadline:
                return False
            self.engine.cancel.sleep(min(self.poll_interval, 1.0))

    def _zone_root(self) -> str:
        return f"{self._zone['zonepath']}/root"

    def _write_zone_file(self, f: ZoneFile) -> None:
        argv = ["/bin/sh", "-c", _WRITE_SCRIPT, "imgprep-write", self._zone_root(), f.rel, f.mode, f.dirmode]
        self._run([*argv, f.link] if f.link else argv, input=f.data)

    def _present_in_zone(self, rels: Sequence[str], root: str | None = None) -> list[str]:
        """The paths (under the zone root) that exist; ``root`` before validate has stored it."""
        paths = [f"{root or self._zone_root()}/{rel}" for rel in rels]
        out = self._run(["/bin/sh", "-c", _PRESENT_SCRIPT, "imgprep-present", *paths]).stdout
        return [line for line in out.splitlines() if line]

    # --- validate -----------------------------------------------------------------------

    def validate(self) -> VmFacts:
        target = self._target()
        if self._ssh is not None:  # the chain validates again: one connection at a time
            self._ssh.close()
        self._ssh = SshClient(target, accept_new_host_key=self.accept_new_host_key)
        try:
            return self._validate(target)
        except TransientError as exc:
            raise InvalidInput(f"cannot use compute node {target}: {exc.message}", code="NodeUnreachable") from None

    def _validate(self, target: SshTarget) -> VmFacts:
        self._client().connect()  # the host key is checked here, before any command
        vm_arg = self.params["vm"]
        uuid = vm_arg
        if not _is_uuid(vm_arg):
            try:
                uuid = self._run(["vmadm", "lookup", "-1", f"alias={vm_arg}"]).stdout.strip()
            except CommandError:
                raise InvalidInput(f"no VM with alias {vm_arg!r} on {target.host}", code="VmNotFound") from None
        try:
            vm: dict[str, Any] = self._json(["vmadm", "get", uuid])
        except CommandError:
            raise InvalidInput(f"no VM {vm_arg!r} on {target.host}", code="VmNotFound") from None
        name = str(vm.get("alias") or uuid)
        brand = str(vm.get("brand"))
        if brand in REFUSED_BRANDS:
            raise InvalidInput(f"VM {name} (brand {brand}): {REFUSED_BRANDS[brand]}", code="NotSupported")
        problems: list[str] = []
        if brand not in ZONE_BRANDS:
            problems.append(f"VM {name} has brand {brand!r}; the SmartOS backend prepares {', '.join(ZONE_BRANDS)}")
        if self.params.get("mode") == "legacy" and brand != "lx":
            problems.append(f"--mode legacy (the classic late placement) exists for systemd guests; {name} is {brand}")
        state = vm.get("state")
        if state not in ("running", "stopped"):
            problems.append(f"VM {name} is {state!r}; it must be running or stopped")
        dataset = vm.get("zfs_filesystem")
        zonepath = vm.get("zonepath")
        if not dataset or not zonepath:
            problems.append(f"VM {name}: vmadm reports no zfs_filesystem/zonepath")
        compression = self.params["compression"]
        if compression not in STREAM_COMPRESSIONS:
            problems.append(
                f"compression {compression} is not available for SmartOS images: IMGAPI and imgadm import read "
                f"{', '.join(STREAM_COMPRESSIONS)} (and bzip2); pass --compression gzip"
            )
        datasets = [str(dataset), *[str(d) for d in vm.get("datasets") or []]] if dataset else []
        for ds in datasets:
            snaps = self._snapshots(ds)
            for snap, job in snaps.items():
                if snap.startswith(CHECKPOINT_PREFIX) or (job not in ("-", "") and job != self.record["uuid"]):
                    raise VmBusy(
                        f"VM {name} still has snapshot {ds}@{clean(snap)} from imgprep job {clean(job)}; "
                        "run `imgprep jobs list` and `imgprep jobs recover JOB_UUID`"
                    )
            if ds == dataset and FINAL_SNAPNAME in snaps and snaps[FINAL_SNAPNAME] != self.record["uuid"]:
                problems.append(
                    f"{ds}@{FINAL_SNAPNAME} already exists (left by imgadm create?); imgprep names the image "
                    "snapshot @final and will not rename or destroy yours: remove or rename it first"
                )
        if brand == "lx" and zonepath and not problems:
            root = f"{zonepath}/root"
            listing = self._run(["/bin/sh", "-c", _READLINK_SCRIPT, "imgprep-readlink", f"{root}/{LX_INIT}"]).stdout
            init = listing.rpartition(" -> ")[2].strip() if " -> " in listing else ""
            if not init.endswith("/systemd") or not self._present_in_zone(["etc/systemd/system"], root):
                problems.append(
                    f"lx zone {name} does not boot systemd (/{LX_INIT} is not a link to systemd); "
                    "imgprep's early service for lx zones is a systemd unit"
                )
        if dataset and not problems:
            out = self._run(["zfs", "list", "-H", "-p", "-o", "referenced", str(dataset)]).stdout.strip()
            self.check_free_space(int(out) if out.isdigit() else 0, problems)
        if problems:
            raise InvalidInput(problems)
        learned = self._learn(vm, brand)
        self.state["ssh"] = {**target.to_dict(), "accept_new_host_key": False}
        self.state["zone"] = {
            "brand": brand,
            "zonepath": str(zonepath),
            "zfs_filesystem": str(dataset),
            "datasets": datasets,
        }
        return VmFacts(str(vm.get("uuid") or uuid), name, state == "running", learned)

    def _learn(self, vm: dict[str, Any], brand: str) -> dict[str, Any]:
        """Manifest fields: the origin image's inherited ones (as imgadm), type, min_platform."""
        learned: dict[str, Any] = {"type": "zone-dataset", "os": "smartos"}
        origin = vm.get("image_uuid")
        if origin:
            try:
                info = self._json(["imgadm", "get", str(origin)])
            except CommandError as exc:
                log.warning("origin image %s is not installed on the node (%s): nothing inherited", origin, exc)
            else:
                manifest = info.get("manifest", {}) if isinstance(info, dict) else {}
                for field in INHERITED_FIELDS:
                    value = manifest.get(field)
                    if value is not None and value != []:
                        learned[field] = value
        requirements = dict(learned.get("requirements") or {})
        if brand == "lx":  # imgadm: an lx image says so, and needs the lx brand
            learned["type"] = "lx-dataset"
            if learned["os"] == "smartos":
                learned["os"] = "linux"
            requirements["brand"] = "lx"
        # imgadm: a SmartOS image's binaries need at least the platform they were built on
        try:
            sysinfo = self._json(["sysinfo"])
        except CommandError as exc:
            log.warning("sysinfo failed (%s): no requirements.min_platform", exc)
        else:
            if isinstance(sysinfo, dict) and sysinfo.get("SDC Version") and sysinfo.get("Live Image"):
                requirements["min_platform"] = {str(sysinfo["SDC Version"]): str(sysinfo["Live Image"])}
        if requirements:
            learned["requirements"] = requirements
        return learned

    # --- the chain ------------------------------------------------------------------------

    def stop_vm(self) -> None:
        vm = self._vm()
        self.state.setdefault("was_running", vm.get("state") == "running")
        self.mark_touched()
        if vm.get("state") == "stopped":
            return
        log.info("stopping zone %s", self.state["vm_name"])
        try:
            self._run(["vmadm", "stop", self._uuid])
        except CommandError as exc:
            log.warning("vmadm stop: %s", exc.message)
        if self._wait_state("stopped", self.config.timeouts.stop):
            return
        if not self.config.force_stop:
            raise StopTimeout(
                f"zone {self.state['vm_name']} did not stop within {self.config.timeouts.stop:.0f}s; "
                "rerun with --force-stop to halt it"
            )
        log.warning("zone did not stop in %.0fs; halting it (vmadm stop -F)", self.config.timeouts.stop)
        self._run(["vmadm", "stop", "-F", self._uuid])
        if not self._wait_state("stopped", 60):
            raise StopTimeout(f"zone {self.state['vm_name']} did not halt")

    def checkpoint(self) -> None:
        name = CHECKPOINT_PREFIX + self.record["uuid"][:8]
        datasets = list(self._zone["datasets"])
        self.state["checkpoint"] = {"name": name, "datasets": datasets}
        self.persist()  # before creating them: recover must know the names
        if self._vm().get("state") != "stopped":
            raise ImgprepError("the zone is running; refusing to checkpoint it", code="VmRunning")
        for ds in datasets:
            if not self._ours(self._snapshots(ds), name):
                self._snapshot(f"{ds}@{name}")

    def inject(self, request: CreateRequest) -> None:
        if self._vm().get("state") != "stopped":
            raise ImgprepError("the zone is running; refusing to write into its root", code="VmRunning")
        files = self._lx_files(request) if self._zone["brand"] == "lx" else self._smf_files(request)
        self.state["injected"] = [f.rel for f in files]
        self.persist()
        for f in files:  # the armed file is last: a partial injection never runs
            self._write_zone_file(f)
        # The contract's keys must start empty (imgadm does the same before its boot).
        update = {"remove_customer_metadata": [STATE_KEY, ERROR_KEY, REPORT_KEY, LOG_KEY]}
        self._run(["vmadm", "update", self._uuid], input=json.dumps(update).encode())

    def _smf_files(self, request: CreateRequest) -> list[ZoneFile]:
        """joyent zones: the early SMF service (docs/smartos-guest.md)."""
        armed = f"IMGPREP_SCRIPT_TIMEOUT={int(self.config.timeouts.prepare)}\n"
        return [
            ZoneFile(SCRIPT_IN_ZONE, request.script, "0700"),
            ZoneFile(METHOD_IN_ZONE, artifacts.artifact("smf/imgprep-operator-script").read_bytes(), "0755"),
            ZoneFile(MANIFEST_IN_ZONE, artifacts.artifact("smf/imgprep-operator-script.xml").read_bytes(), "0444"),
            ZoneFile(ARMED_IN_ZONE, armed.encode(), "0600"),
        ]

    def _lx_files(self, request: CreateRequest) -> list[ZoneFile]:
        """lx zones: the early systemd unit and runner of the Linux guest side, reporting via mdata."""
        script = request.script
        if request.script_is_default:  # the zone runs Linux: the Linux cleanup
            default = artifacts.artifact(LX_DEFAULT_SCRIPT)
            script = default.read_bytes()
            self.params["script_name"] = default.name  # the job record says which script ran
        mode: artifacts.Mode = "legacy" if request.mode == "legacy" else "early"
        wants_dir = artifacts.wants_link(mode).rsplit("/", 1)[0].lstrip("/")
        files = artifacts.linux_injection(
            mode=mode,
            script=script,
            script_timeout=int(self.config.timeouts.prepare),
            channel=f"mdata:{LX_MDATA_PUT}",
            wants_dir_exists=bool(self._present_in_zone([wants_dir])),
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
        if self.state.get("prepare_boot"):
            # a retry after a dropped connection: did the first attempt boot it?
            metadata = vm.get("customer_metadata") or {}
            if vm.get("state") == "running" or metadata.get(STATE_KEY):
                return
        elif vm.get("state") != "stopped":
            raise ImgprepError("the zone is running before the prepare boot", code="VmRunning")
        self.state["prepare_boot"] = True
        self.persist()
        log.info("starting the prepare boot of zone %s", self.state["vm_name"])
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
        dataset = self._zone["zfs_filesystem"]
        if self._vm().get("state") != "stopped":
            raise ImgprepError("the zone is not stopped; refusing to snapshot it", code="VmRunning")
        if self._zone["brand"] == "lx":
            ours = [LX_UNIT_IN_ZONE, artifacts.wants_link("early").lstrip("/"), LX_PREFIX_IN_ZONE]
            ours.append(artifacts.wants_link("legacy").lstrip("/"))
        else:
            ours = [MANIFEST_IN_ZONE, METHOD_IN_ZONE, STATE_DIR_IN_ZONE]
        leftovers = self._present_in_zone(ours)
        if leftovers:
            raise ImgprepError(
                f"the prepare boot left imgprep files in the zone: {', '.join(leftovers)}; not imaging it",
                code="PrepareImageError",
            )
        snap = f"{dataset}@{FINAL_SNAPNAME}"
        self.state["final_snapshot"] = snap
        self.persist()  # before creating it: the rollback must destroy it
        if not self._ours(self._snapshots(dataset), FINAL_SNAPNAME):
            self._snapshot(snap)
        estimate = self._send_size(snap)
        compression = self.params["compression"]
        out_dir = Path(self.params["output_dir"])
        dest = out_dir / f"{self.params['image_uuid']}{FILE_SUFFIX[compression]}"
        t0 = time.monotonic()
        with workdir(out_dir, self.params["image_uuid"]) as tmp:
            partial = tmp / dest.name
            size, sha1, sha256, received = self._receive(snap, partial, compression, estimate)
            publish(partial, dest)
        self.emit({"event": "progress", "step": "export", "percent": 100.0})
        self.state["export_seconds"] = round(time.monotonic() - t0, 3)
        self.state["stream_bytes"] = received
        return ExportResult(dest, size, sha1, sha256, compression, "zfs")

    def _receive(self, snap: str, partial: Path, compression: str, estimate: int) -> tuple[int, str, str, int]:
        """``zfs send`` of ``snap`` into ``partial`` (a new 0600 file), compressed and hashed."""
        received = 0
        last = -1
        with os.fdopen(create_private(partial), "wb") as f:
            writer = CompressingWriter(f, compression)

            def sink(data: bytes) -> None:
                nonlocal received, last
                self.engine.cancel.check()
                writer.write(data)
                received += len(data)
                pct = min(99.0, 100.0 * received / estimate) if estimate else 0.0
                if int(pct) != last:
                    last = int(pct)
                    self.emit({"event": "progress", "step": "export", "percent": round(pct, 1)})

            self._client().run_stream(["zfs", "send", snap], sink)
            size, sha1, sha256 = writer.finish()
            f.flush()
            os.fsync(f.fileno())
        return size, sha1, sha256, received

    def _send_size(self, snap: str) -> int:
        """``zfs send -nP``'s estimate of the stream size (for the progress bar only)."""
        try:
            out = self._run(["zfs", "send", "-nP", snap]).stdout
        except CommandError as exc:
            log.debug("no send size estimate: %s", exc)
            return 0
        match = _SEND_SIZE_RE.search(out)
        return int(match.group(1)) if match else 0

    def restore_disks(self) -> None:
        if self.state.get("disks_restored") or "zone" not in self.state:
            return
        vm = self._vm()
        checkpoint = self.state.get("checkpoint")
        if vm.get("state") != "stopped":
            if self.state.get("prepare_boot"):
                log.info("halting the prepare boot")
                self._run(["vmadm", "stop", "-F", self._uuid])
                if not self._wait_state("stopped", 120):
                    raise ImgprepError("the zone did not halt; cannot roll it back", code="VmRunning")
            elif checkpoint and any(checkpoint["name"] in self._snapshots(ds) for ds in checkpoint["datasets"]):
                raise ImgprepError(
                    "the zone was started by someone else after its checkpoint; cannot roll it back while it runs",
                    code="VmRunning",
                )
            else:
                return  # no checkpoint was taken: nothing of the zone was changed
        final = self.state.get("final_snapshot")
        if final:
            dataset, _, snapname = final.partition("@")
            if self._ours(self._snapshots(dataset), snapname):
                self._run(["zfs", "destroy", final])
        if checkpoint:
            for ds in checkpoint["datasets"]:
                if self._ours(self._snapshots(ds), checkpoint["name"]):
                    # no -r: a newer snapshot that is not ours stops us instead of being destroyed
                    self._run(["zfs", "rollback", f"{ds}@{checkpoint['name']}"])
        self.state["disks_restored"] = True
        self.persist()

    def delete_checkpoint(self) -> None:
        checkpoint = self.state.get("checkpoint")
        if not checkpoint:
            return
        for ds in checkpoint["datasets"]:
            if self._ours(self._snapshots(ds), checkpoint["name"]):
                self._run(["zfs", "destroy", f"{ds}@{checkpoint['name']}"])

    def restart_vm(self) -> None:
        if not self.state.get("was_running"):
            return
        if self._vm().get("state") != "running":
            log.info("restarting zone %s", self.state["vm_name"])
            self._run(["vmadm", "start", self._uuid])
