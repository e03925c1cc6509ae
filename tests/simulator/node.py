"""The compute-node simulator's global zone: ``vmadm``, ``zfs``, ``imgadm``, ``sysinfo``, ``sh``.

A SIMULATION of a SmartOS compute node, for tests: no illumos, no ZFS, no zones.
What is modelled, after the manual pages (vmadm(8), zfs(8), imgadm(8)):

* ``vmadm get UUID`` prints the VM's JSON (uuid, alias, brand, state, zone_state,
  zonename, zonepath, zfs_filesystem, zpool, image_uuid, customer_metadata,
  internal_metadata, tags, datasets, disks for bhyve/kvm...); ``vmadm lookup -1
  alias=NAME``; ``vmadm start``/``stop [-F]``; ``vmadm update UUID`` with a JSON payload
  on stdin (``set_/remove_customer_metadata``, ``set_/remove_internal_metadata``).
  States are ``running`` and ``stopped``. Metadata lives in ``<zonepath>/config/metadata.json``
  on the zone dataset, as on SmartOS, so a rollback restores it.
* ZFS: a dataset is a directory (its mountpoint, under the simulator's root, so
  ``zonepath`` is a real local path); a snapshot is an exact copy of it (modes,
  symlinks, contents; child datasets' mountpoints excluded). ``zfs list`` (-H -p -t -o
  -d -r), ``zfs snapshot [-o prop=value]``, ``zfs rollback`` (refused while newer
  snapshots exist unless ``-r``, and while the zone using the dataset runs: "Device
  busy"), ``zfs destroy`` of a snapshot, ``zfs send [-nP]``. User properties
  (``imgprep:job``) are stored per snapshot.
* ``zfs send`` produces a byte stream that is NOT a ZFS stream: a header line, a JSON
  line, then a tar of the snapshot (see :func:`read_send_stream`).
* ``vmadm start`` boots the zone: a simulated svc.startd imports the manifests found in
  the zone root (``/lib/svc/manifest``, ``/var/svc/manifest``,
  ``/opt/local/lib/svc/manifest``), orders the instances with ``tests.smf_model``
  (illumos's dependency semantics), brings them online in that order and really runs
  every start method whose file exists in the zone (in practice imgprep's), under
  ``/bin/sh`` with ``IMGPREP_ROOT`` set to the zone root and the fake in-zone commands
  of :mod:`tests.simulator.fakebin` first on PATH. Services that its dependencies hold
  do not start while a method runs; if the method halts the zone, they never start.
  Each boot is recorded (:class:`BootRecord`).
* An lx zone (brand ``lx``) holds a Linux tree given by the test and boots its real
  systemd in ``systemd-nspawn`` (no network, no registration), with the simulator's
  ``mdata-put`` bind-mounted at ``/native/usr/sbin`` where the lx brand mounts the
  platform's. That ``mdata-put`` (a shell script, :data:`LX_MDATA_PUT`) leaves each
  put in a spool directory mounted at ``/native/.zonecontrol``; the simulator applies
  the spool to the zone's metadata before every ``vmadm get`` and when the zone
  ends. The zone halting itself (systemd powering off) ends the nspawn process and
  makes the zone ``stopped``; ``vmadm stop`` asks systemd to power off (nspawn's
  SIGTERM), ``vmadm stop -F`` kills the container's init at once.
* A bhyve or kvm VM (:meth:`ComputeNode.create_hvm`) has its zone dataset (``config/``
  with the metadata) and one zvol per disk, ``zones/<uuid>-disk<N>``. A zvol is a
  dataset whose directory holds one sparse file, ``volume``: its block device's bytes,
  served as ``/dev/zvol/rdsk/<dataset>`` (and ``dsk``) by the SSH server's SFTP
  subsystem, which QEMU's ``ssh`` block driver opens. ``zfs send`` of a zvol snapshot
  is a simulated stream too (:func:`read_volume_stream`). ``vmadm start`` boots the
  VM for real: ``qemu-system-x86_64`` under TCG, its disks the zvols' files, its first
  serial port a console log, its second a unix socket served by the Metadata V2 service
  (:mod:`tests.simulator.mdata_v2`) over the VM's customer metadata. The simulated
  "bootrom" is a direct kernel boot of the kernel and initrd the test gives (a real
  bhyve runs UEFI or a BIOS from the disk). The guest powering off ends QEMU and makes
  the VM ``stopped``; ``vmadm stop`` (with or without ``-F``) kills QEMU.
* ``/bin/sh`` runs locally, and ``/usr/node/bin/node`` runs the host's ``node`` (for
  the backend's constant zone script; the platform's node is older, the script is ES5).

Every command received is logged (:attr:`ComputeNode.commands`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import IO, Any, cast

from tests.simulator.fakebin import FAKE_COMMANDS, SCRIPT
from tests.smf_model import ServiceGraph, load_manifests

REPO = Path(__file__).resolve().parents[2]
SMF_DATA = REPO / "tests" / "data" / "smf"
POOL = "zones"
STREAM_MAGIC = b"IMGPREP-SIMULATED-ZFS-SEND v1\n"
MANIFEST_DIRS = ("lib/svc/manifest", "var/svc/manifest", "opt/local/lib/svc/manifest")
NODE = shutil.which("node") or "node"  # runs the backend's remote/zone.js as /usr/node/bin/node
READ_ONLY_ZONE_COMMANDS = {"present", "readlink"}
MUTATING = {
    ("vmadm", "start"),
    ("vmadm", "stop"),
    ("vmadm", "update"),
    ("zfs", "snapshot"),
    ("zfs", "rollback"),
    ("zfs", "destroy"),
    ("/bin/sh", "-c"),
    ("/usr/node/bin/node", "-e"),
}


# The lx zone's /native/usr/sbin/mdata-put (runs inside the container, POSIX sh).
LX_MDATA_PUT = r"""#!/bin/sh
# compute-node SIMULATOR: mdata-put for lx zones, not the platform's
[ $# -eq 1 ] || [ $# -eq 2 ] || { echo "Usage: mdata-put <keyname> [ <value> ]" >&2; exit 3; }
spool=/native/.zonecontrol
tmp=$(mktemp "$spool/.put.XXXXXX") || exit 2
if [ $# -eq 2 ]; then printf '%s' "$2" >"$tmp"; else cat >"$tmp"; fi
mv "$tmp" "$spool/$(date +%s%N).$1"
"""
LX_MOUNTPOINTS = ("native/usr/sbin", "native/.zonecontrol")  # present in an lx zone's tree


class Dropped(Exception):
    """The simulator cut the connection (fault injection)."""


class CommandFailed(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Faults:
    """Fault injection. ``send_drops``: how many ``zfs send`` streams to cut (a large
    number = every one); each is cut after ``send_drop_after`` bytes."""

    send_drops: int = 0
    send_drop_after: int = 256 * 1024


@dataclasses.dataclass
class BootRecord:
    """One boot of a zone as the simulated svc.startd ran it. An lx zone's boot is run by
    its own systemd, which the simulator does not trace: only ``halted`` and ``ended``."""

    started: list[str] = dataclasses.field(default_factory=list)  # instances, in the order they started
    methods: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # start methods really run
    held: list[str] = dataclasses.field(default_factory=list)  # enabled, not started while a method ran
    halted: bool = False  # the zone halted itself
    ended: str = ""  # "halted", "running", "stopped by vmadm stop ..."
    booted_at: int = dataclasses.field(default_factory=lambda: int(time.time()))  # kstat zones:::boot_time


@dataclasses.dataclass
class _Zone:
    uuid: str
    alias: str
    brand: str
    state: str
    image_uuid: str | None
    datasets: list[str]
    disks: list[dict[str, Any]]
    boots: list[BootRecord] = dataclasses.field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    generation: int = 0
    boot_files: tuple[Path, Path] | None = None  # bhyve/kvm: the simulated bootrom's kernel, initrd
    bootrom: str | None = None
    mdata_port: Any = None  # bhyve/kvm: the UnixSocketPort of the running VM


@dataclasses.dataclass
class _Snapshot:
    path: Path
    props: dict[str, str]
    order: int


VOLUME_CHUNK = 1024 * 1024


def _copy(src: str, dst: str) -> str:
    """copytree's copy function: sparse files stay sparse (a zvol's 2 GiB of mostly holes)."""
    if os.path.getsize(src) > VOLUME_CHUNK:
        subprocess.run(["cp", "--sparse=always", "--preserve=mode,timestamps", src, dst], check=True)
    else:
        shutil.copy2(src, dst)
    return dst


def _extents(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the data of a sparse file, in chunks of at most VOLUME_CHUNK."""
    out: list[tuple[int, int]] = []
    size = path.stat().st_size
    with path.open("rb") as f:
        fd = f.fileno()
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for o in range(start, end, VOLUME_CHUNK):
                out.append((o, min(VOLUME_CHUNK, end - o)))
            offset = end
    return out


def read_volume_stream(stream: IO[bytes], dest: Path) -> dict[str, Any]:
    """Write the volume of a simulated ``zfs send`` stream of a zvol snapshot into ``dest``
    (a sparse raw file); returns the header. The stream: the magic line, a JSON header
    line (``"type": "volume"``, ``"size"``), then records ``"<offset> <length>\n"`` and
    that many bytes, for every block that holds data."""
    if stream.readline() != STREAM_MAGIC:
        raise ValueError("not a simulated zfs send stream")
    header: dict[str, Any] = json.loads(stream.readline())
    if header.get("type") != "volume":
        raise ValueError("not the stream of a volume")
    with dest.open("wb") as out:
        out.truncate(int(header["size"]))
        while line := stream.readline():
            offset, length = (int(x) for x in line.split())
            out.seek(offset)
            out.write(stream.read(length))
    return header


def read_send_stream(data: bytes) -> tuple[dict[str, Any], tarfile.TarFile]:
    """Parse a simulated ``zfs send`` stream: (header, tar of the snapshot)."""
    if not data.startswith(STREAM_MAGIC):
        raise ValueError("not a simulated zfs send stream")
    rest = data[len(STREAM_MAGIC) :]
    line, _, tar = rest.partition(b"\n")
    return json.loads(line), tarfile.open(fileobj=io.BytesIO(tar), mode="r:")


def tree_digest(path: Path) -> str:
    """Digest of a directory tree: names, types, modes, symlink targets, contents."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            st = full.lstat()
            h.update(f"{full.relative_to(path)}\0{st.st_mode:o}\0".encode())
            if full.is_symlink():
                h.update(os.readlink(full).encode())
            elif full.is_file():
                h.update(full.read_bytes())
    return h.hexdigest()


class ComputeNode:
    """State and commands of one simulated compute node (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pool_dir = root / POOL
        self.snap_dir = root / ".snapshots"
        self.run_dir = root / "run"
        self.fakebin = root / "fakebin"
        self.lxbin = root / "lxbin"
        for d in (self.pool_dir, self.snap_dir, self.run_dir, self.fakebin, self.lxbin):
            d.mkdir(parents=True, exist_ok=True)
        (self.lxbin / "mdata-put").write_text(LX_MDATA_PUT)
        (self.lxbin / "mdata-put").chmod(0o755)
        script = SCRIPT.format(python=sys.executable)
        for name in FAKE_COMMANDS:
            path = self.fakebin / name
            path.write_text(script)
            path.chmod(0o755)
        self.zones: dict[str, _Zone] = {}
        self.datasets: dict[str, Path] = {POOL: self.pool_dir}
        self.snapshots: dict[str, _Snapshot] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self.commands: list[list[str]] = []
        self.faults = Faults()
        self.sysinfo = {"SDC Version": "7.0", "Live Image": "20250101T000000Z", "Hostname": "simulated-cn"}
        self._lock = threading.RLock()
        self._order = 0

    # --- test-side API ------------------------------------------------------------------

    def add_image(self, manifest: dict[str, Any]) -> None:
        self.images[manifest["uuid"]] = manifest

    def create_zone(
        self,
        *,
        alias: str,
        brand: str = "joyent",
        image_uuid: str | None = None,
        files: dict[str, bytes] | None = None,
        running: bool = False,
        delegated: bool = False,
        tree: Path | None = None,
    ) -> str:
        """A zone whose root holds the base system's SMF manifests plus ``files``; with
        ``tree`` (an lx zone's Linux tree), a copy of that tree plus ``files``."""
        uuid = str(uuidlib.uuid4())
        dataset = f"{POOL}/{uuid}"
        zonepath = self.pool_dir / uuid
        (zonepath / "config").mkdir(parents=True)
        (zonepath / "config" / "metadata.json").write_text(
            json.dumps({"customer_metadata": {}, "internal_metadata": {}}, indent=2, sort_keys=True)
        )
        root = zonepath / "root"
        if tree is not None:
            shutil.copytree(tree, root, symlinks=True)
            for rel in LX_MOUNTPOINTS:
                (root / rel).mkdir(parents=True, exist_ok=True)
        else:
            for rel in ("var/run", "var/svc/log", "tmp", "var/tmp", "etc", "root"):
                (root / rel).mkdir(parents=True, exist_ok=True)
            for manifest in sorted(SMF_DATA.glob("*.xml")):
                where = "opt/local/lib/svc/manifest" if manifest.name.startswith("application-") else "lib/svc/manifest"
                (root / where).mkdir(parents=True, exist_ok=True)
                shutil.copy2(manifest, root / where / manifest.name)
        for rel, content in (files or {}).items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        self.datasets[dataset] = zonepath
        datasets = []
        if delegated:
            data = f"{dataset}/data"
            (zonepath / "data").mkdir()
            (zonepath / "data" / "app.db").write_text("delegated dataset content\n")
            self.datasets[data] = zonepath / "data"
            datasets.append(data)
        disks = [{"zfs_filesystem": f"{dataset}-disk0", "size": 10240}] if brand in ("bhyve", "kvm") else []
        self.zones[uuid] = _Zone(uuid, alias, brand, "stopped", image_uuid, datasets, disks)
        if running:
            self._start(self.zones[uuid])
            self.wait_boot(uuid, timeout=120)
        return uuid

    def create_hvm(
        self,
        *,
        alias: str,
        disk_image: Path,
        kernel: Path,
        initrd: Path,
        brand: str = "bhyve",
        image_uuid: str | None = None,
        data_disk_mib: int = 64,
        bootrom: str | None = "uefi",
    ) -> str:
        """A stopped bhyve/kvm VM: disk0 a copy of the raw ``disk_image`` (the guest's root),
        disk1 a small data disk (a marker string at its start); booted by ``kernel``/``initrd``."""
        uuid = str(uuidlib.uuid4())
        dataset = f"{POOL}/{uuid}"
        zonepath = self.pool_dir / uuid
        (zonepath / "config").mkdir(parents=True)
        (zonepath / "config" / "metadata.json").write_text(
            json.dumps({"customer_metadata": {}, "internal_metadata": {}}, indent=2, sort_keys=True)
        )
        self.datasets[dataset] = zonepath
        disks = []
        for index in range(2):
            name = f"{dataset}-disk{index}"
            directory = self.pool_dir / f"{uuid}-disk{index}"
            directory.mkdir()
            volume = directory / "volume"
            if index == 0:
                _copy(str(disk_image), str(volume))
            else:
                with volume.open("wb") as f:
                    f.write(b"IMGPREP-SIMULATED-DATA-DISK\n")
                    f.truncate(data_disk_mib * 2**20)
            self.datasets[name] = directory
            disks.append(
                {
                    "path": f"/dev/zvol/rdsk/{name}",
                    "zfs_filesystem": name,
                    "size": volume.stat().st_size // 2**20,
                    "boot": index == 0,
                    "model": "virtio",
                    "media": "disk",
                    "image_uuid": image_uuid if index == 0 else None,
                }
            )
            if index or not image_uuid:
                disks[-1].pop("image_uuid")
        zone = _Zone(uuid, alias, brand, "stopped", image_uuid, [], disks)
        zone.boot_files = (kernel, initrd)
        zone.bootrom = bootrom if brand == "bhyve" else None
        self.zones[uuid] = zone
        return uuid

    def zvol_device(self, path: str) -> Path | None:
        """The backing file of a zvol device node (``/dev/zvol/[r]dsk/<dataset>``), else None."""
        for prefix in ("/dev/zvol/rdsk/", "/dev/zvol/dsk/"):
            if path.startswith(prefix):
                directory = self.datasets.get(path[len(prefix) :])
                if directory is not None and (directory / "volume").is_file():
                    return directory / "volume"
        return None

    def volume(self, dataset: str) -> Path:
        return self.datasets[dataset] / "volume"

    def zonepath(self, uuid: str) -> Path:
        return self.pool_dir / uuid

    def zone_root(self, uuid: str) -> Path:
        return self.zonepath(uuid) / "root"

    def state(self, uuid: str) -> str:
        return self.zones[uuid].state

    def boots(self, uuid: str) -> list[BootRecord]:
        return list(self.zones[uuid].boots)

    def metadata(self, uuid: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.zonepath(uuid) / "config" / "metadata.json").read_text())
        return data

    def snapshot_names(self, dataset: str) -> list[str]:
        with self._lock:
            return sorted(
                (n for n in self.snapshots if n.split("@")[0] == dataset), key=lambda n: self.snapshots[n].order
            )

    def smf_calls(self, uuid: str) -> list[dict[str, Any]]:
        path = self.run_dir / uuid / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def mutating_commands(self) -> list[list[str]]:
        """Commands that may change the node. A ``sh -c`` or ``node -e`` script counts,
        except imgprep's read-only zone commands (``present``, ``readlink``: they only
        look up names and read links)."""
        return [
            c
            for c in self.commands
            if (tuple(c[:2]) in MUTATING and not (c[3:4] == ["imgprep-zone"] and set(c[4:5]) & READ_ONLY_ZONE_COMMANDS))
            or (c[:1] == ["vmadm"] and "stop" in c)
        ]

    def wait_boot(self, uuid: str, timeout: float = 30) -> None:
        """Wait until the zone's current boot has finished starting (tests only)."""
        zone = self.zones[uuid]
        if zone.brand == "lx":
            self._wait_lx_booted(zone, timeout)
            return
        thread = zone.thread
        if thread is not None:
            thread.join(timeout)

    def lx_systemctl(self, uuid: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``systemctl ARGS`` inside a running lx zone (tests only)."""
        proc = self.zones[uuid].proc
        leader = _lx_leader(proc) if proc is not None else None
        if leader is None:
            raise RuntimeError(f"lx zone {uuid} is not running")
        return subprocess.run(
            ["nsenter", f"--target={leader}", "--mount", "--pid", "--", "systemctl", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def _wait_lx_booted(self, zone: _Zone, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if zone.state != "running":
                return
            with contextlib.suppress(RuntimeError):
                state = self.lx_systemctl(zone.uuid, "is-system-running").stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.5)
        raise TimeoutError(f"lx zone {zone.uuid} did not finish booting in {timeout}s")

    def shutdown(self) -> None:
        for zone in list(self.zones.values()):
            with self._lock:
                self._kill(zone)
            if zone.thread is not None:
                zone.thread.join(10)

    # --- command dispatch -----------------------------------------------------------------

    def execute(
        self,
        argv: list[str],
        stdin: Callable[[], bytes],
        stdout: Callable[[bytes], None],
        stderr: Callable[[bytes], None],
        drop: Callable[[], None],
    ) -> int:
        """Run one command line received over SSH; returns its exit status."""
        with self._lock:
            self.commands.append(list(argv))
        if not argv:
            stderr(b"sh: empty command\n")
            return 127
        prog = argv[0]
        try:
            if prog == "vmadm":
                out = self._vmadm(argv[1:], stdin)
            elif prog == "zfs":
                if argv[1:2] == ["send"] and "-nP" not in argv and "-n" not in argv:
                    self._zfs_send(argv[2:], stdout, drop)
                    return 0
                out = self._zfs(argv[1:])
            elif prog == "imgadm":
                out = self._imgadm(argv[1:])
            elif prog == "sysinfo":
                out = json.dumps(self.sysinfo, indent=2) + "\n"
            elif prog == "/usr/node/bin/node":  # the platform's node: the host's
                proc = subprocess.run([NODE, *argv[1:]], input=stdin(), capture_output=True, check=False)
                stdout(proc.stdout)
                stderr(proc.stderr)
                return proc.returncode
            elif prog in ("sh", "/bin/sh", "/usr/bin/sh"):
                proc = subprocess.run(["/bin/sh", *argv[1:]], input=stdin(), capture_output=True, check=False)
                stdout(proc.stdout)
                stderr(proc.stderr)
                return proc.returncode
            else:
                stderr(f"sh: {prog}: not found\n".encode())
                return 127
        except CommandFailed as exc:
            stderr(f"{exc}\n".encode())
            return exc.code
        stdout(out.encode())
        return 0

    # --- vmadm ------------------------------------------------------------------------------

    def _zone(self, uuid: str) -> _Zone:
        zone = self.zones.get(uuid)
        if zone is None:
            raise CommandFailed(f"Command failed: No such zone configured: {uuid}")
        return zone

    def _vm_json(self, zone: _Zone) -> dict[str, Any]:
        zonepath = self.zonepath(zone.uuid)
        md = json.loads((zonepath / "config" / "metadata.json").read_text())
        vm: dict[str, Any] = {
            "uuid": zone.uuid,
            "alias": zone.alias,
            "autoboot": zone.state == "running",
            "brand": zone.brand,
            "state": zone.state,
            "zone_state": "running" if zone.state == "running" else "installed",
            "zonename": zone.uuid,
            "zonepath": str(zonepath),
            "zfs_filesystem": f"{POOL}/{zone.uuid}",
            "zpool": POOL,
            "customer_metadata": md.get("customer_metadata", {}),
            "internal_metadata": md.get("internal_metadata", {}),
            "tags": {},
            "nics": [],
            "max_physical_memory": 1024,
            "quota": 10,
            "create_timestamp": "2025-01-01T00:00:00.000Z",
        }
        if zone.image_uuid:
            vm["image_uuid"] = zone.image_uuid
        if zone.datasets:
            vm["datasets"] = list(zone.datasets)
        if zone.disks:
            vm["disks"] = list(zone.disks)
        if zone.bootrom:
            vm["bootrom"] = zone.bootrom
        if zone.brand in ("bhyve", "kvm"):
            vm["ram"] = 1024
        return vm

    def _vmadm(self, args: list[str], stdin: Callable[[], bytes]) -> str:
        if not args:
            raise CommandFailed("usage: vmadm <command> ...", 2)
        cmd, rest = args[0], args[1:]
        with self._lock:
            if cmd == "get" and len(rest) == 1:
                zone = self._zone(rest[0])
                self._drain_lx_metadata(zone)
                return json.dumps(self._vm_json(zone), indent=2, sort_keys=True) + "\n"
            if cmd == "lookup":
                unique = "-1" in rest
                filters = [a.split("=", 1) for a in rest if "=" in a]
                found = [
                    z.uuid for z in self.zones.values() if all(str(self._vm_json(z).get(k)) == v for k, v in filters)
                ]
                if unique and len(found) != 1:
                    raise CommandFailed(f"Requested unique lookup but found {len(found)} results.")
                return "".join(f"{u}\n" for u in found)
            if cmd == "start" and len(rest) == 1:
                zone = self._zone(rest[0])
                if zone.state == "running":
                    raise CommandFailed(f"Command failed: VM {zone.uuid} is already running")
                self._start(zone)
                return ""
            if cmd == "stop" and rest:
                zone = self._zone(rest[-1])
                if zone.state != "running":
                    raise CommandFailed(
                        f"Command failed: VM {zone.uuid} is already not 'running' (currently: {zone.state})"
                    )
                why = "stopped by vmadm stop" + (" -F" if "-F" in rest else "")
                if zone.brand == "lx" and "-F" not in rest:
                    self._shutdown_lx(zone, why)
                else:
                    self._kill(zone, why)
                return ""
            if cmd == "update" and len(rest) == 1:
                zone = self._zone(rest[0])
                payload = json.loads(stdin() or b"{}")
                self._update_metadata(zone, payload)
                return ""
        raise CommandFailed(f"vmadm: unsupported in the simulator: {shlex.join(args)}", 2)

    def _update_metadata(self, zone: _Zone, payload: dict[str, Any]) -> None:
        path = self.zonepath(zone.uuid) / "config" / "metadata.json"
        md = json.loads(path.read_text())
        for kind in ("customer_metadata", "internal_metadata"):
            md.setdefault(kind, {}).update(payload.get(f"set_{kind}", {}))
            for key in payload.get(f"remove_{kind}", []):
                md[kind].pop(key, None)
        if "alias" in payload:
            zone.alias = payload["alias"]
        path.write_text(json.dumps(md, indent=2, sort_keys=True))

    # --- the zone boot (a simulated svc.startd) ---------------------------------------------

    def _start(self, zone: _Zone) -> None:
        zone.state = "running"
        zone.generation += 1
        record = BootRecord()
        zone.boots.append(record)
        (self.run_dir / zone.uuid).mkdir(parents=True, exist_ok=True)
        (self.run_dir / zone.uuid / "halted").unlink(missing_ok=True)
        hvm = zone.brand in ("bhyve", "kvm")
        boot = self._boot_lx if zone.brand == "lx" else self._boot_hvm if hvm else self._boot
        if zone.brand == "lx":  # nspawn must be running before vmadm start returns
            self._spawn_lx(zone)
        if hvm:
            self._spawn_hvm(zone)
        zone.thread = threading.Thread(target=boot, args=(zone, record, zone.generation), daemon=True)
        zone.thread.start()

    def _kill(self, zone: _Zone, why: str = "stopped") -> None:
        """Halt the zone now: every process of it dies (vmadm stop, zone halt)."""
        if zone.state == "running":
            zone.state = "stopped"
            zone.generation += 1
            if zone.boots and not zone.boots[-1].ended:
                zone.boots[-1].ended = why
        proc = zone.proc
        if proc is not None and proc.poll() is None:
            if zone.brand == "lx":  # the container's init: killing it ends the container
                leader = _lx_leader(proc)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leader if leader is not None else proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
                self._drain_lx_metadata(zone)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                if zone.brand in ("bhyve", "kvm"):
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(30)

    # --- bhyve/kvm: a real QEMU boot, metadata over the second serial port --------------

    def _spawn_hvm(self, zone: _Zone) -> None:
        from tests.simulator.mdata_v2 import MetadataV2, UnixSocketPort

        assert zone.boot_files is not None
        run = self.run_dir / zone.uuid
        # a unix socket path has at most 107 bytes: not under the test's deep tmp_path
        sock = Path(tempfile.mkdtemp(prefix="imgprep-sim-md-")) / "mdata.sock"
        service = MetadataV2(
            _MetadataFile(self.zonepath(zone.uuid) / "config" / "metadata.json", self._lock),
            fields={"uuid": zone.uuid, "alias": zone.alias},
        )
        zone.mdata_port = UnixSocketPort(service, sock)
        kernel, initrd = zone.boot_files
        argv = [
            "qemu-system-x86_64",
            "-machine",
            "pc,accel=tcg",
            "-m",
            "768",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1",
            "-serial",
            f"file:{run / 'console.log'}",
            "-chardev",
            f"socket,id=mdata,path={sock}",
            "-serial",
            "chardev:mdata",
        ]
        for disk in zone.disks:
            volume = self.volume(disk["zfs_filesystem"])
            argv += ["-drive", f"file={volume},format=raw,if=virtio,cache=writeback"]
        with (run / "qemu.log").open("ab") as log:
            zone.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _boot_hvm(self, zone: _Zone, record: BootRecord, generation: int) -> None:
        proc = zone.proc
        assert proc is not None
        rc = proc.wait()
        with self._lock:
            if zone.mdata_port is not None:
                zone.mdata_port.close()
                with contextlib.suppress(OSError):
                    zone.mdata_port.path.parent.rmdir()
                zone.mdata_port = None
            if zone.generation == generation:  # nobody stopped it: the guest powered itself off
                record.halted = rc == 0
                self._kill(zone, "halted" if rc == 0 else f"qemu exited with status {rc}")

    # --- lx zones: a real systemd in systemd-nspawn -----------------------------------------

    def _spawn_lx(self, zone: _Zone) -> None:
        run = self.run_dir / zone.uuid
        spool = run / "zonecontrol"
        spool.mkdir(parents=True, exist_ok=True)
        argv = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.zone_root(zone.uuid)}",
            f"--machine=sim-{zone.uuid[:8]}",
            "--register=no",
            "--keep-unit",
            "--private-network",
            f"--bind-ro={self.lxbin}:/native/usr/sbin",
            f"--bind={spool}:/native/.zonecontrol",
            "--console=pipe",
            "--boot",
        ]
        with (run / "console.log").open("ab") as log:
            zone.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _boot_lx(self, zone: _Zone, record: BootRecord, generation: int) -> None:
        proc = zone.proc
        assert proc is not None
        rc = proc.wait()
        with self._lock:
            self._drain_lx_metadata(zone)
            if zone.generation == generation:  # nobody stopped it: the zone powered itself off
                record.halted = rc == 0
                self._kill(zone, "halted" if rc == 0 else f"container exited with status {rc}")

    def _shutdown_lx(self, zone: _Zone, why: str, timeout: float = 60) -> None:
        """``vmadm stop``: systemd powers the zone off (nspawn turns SIGTERM into that)."""
        proc = zone.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self._kill(zone, why)

    def _drain_lx_metadata(self, zone: _Zone) -> None:
        """Apply the puts the lx zone's mdata-put spooled, in the order they were made."""
        spool = self.run_dir / zone.uuid / "zonecontrol"
        if zone.brand != "lx" or not spool.is_dir():
            return
        for entry in sorted(spool.iterdir()):
            if entry.name.startswith("."):
                continue
            _, _, key = entry.name.partition(".")
            self._update_metadata(zone, {"set_customer_metadata": {key: entry.read_text()}})
            entry.unlink()

    def _boot(self, zone: _Zone, record: BootRecord, generation: int) -> None:
        root = self.zone_root(zone.uuid)
        manifests = [p for d in MANIFEST_DIRS for p in sorted((root / d).rglob("*.xml")) if p.is_file()]
        graph = load_manifests(manifests)
        methods = _start_methods(manifests)
        normal = graph.boot()
        for wave in normal.waves:
            for fmri in wave:
                if fmri in record.started:
                    continue
                with self._lock:
                    if zone.generation != generation:
                        return
                    record.started.append(fmri)
                method = methods.get(fmri)
                if method is None or not (root / method[0].lstrip("/")).is_file():
                    continue  # no method file in the zone: online at once
                # While the method runs, what can start is what does not need it.
                parallel = graph.boot(pending=[fmri])
                with self._lock:
                    for other in parallel.order:
                        if other not in record.started:
                            record.started.append(other)
                    record.held = sorted(normal.online - parallel.online - {fmri})
                self._write_svcs(zone, graph, record, fmri)
                rc, halted = self._run_method(zone, fmri, method, generation)
                record.methods.append({"fmri": fmri, "exit_status": rc, "halted": halted})
                if halted:
                    with self._lock:
                        if zone.generation == generation:
                            record.halted = True
                            self._kill(zone, "halted")
                    return
        with self._lock:
            if zone.generation == generation and not record.ended:
                record.ended = "running"

    def _write_svcs(self, zone: _Zone, graph: ServiceGraph, record: BootRecord, running: str) -> None:
        """What the fake ``svcs`` shows while ``running``'s start method runs: what started
        online, that method ``offline*`` (starting), disabled ones disabled, the rest offline."""
        with self._lock:
            started = set(record.started)
        states = {}
        for fmri, instance in graph.instances.items():
            if fmri == running:
                states[fmri] = "offline*"
            elif not instance.enabled:
                states[fmri] = "disabled"
            else:
                states[fmri] = "online" if fmri in started else "offline"
        (self.run_dir / zone.uuid / "svcs.json").write_text(json.dumps(states))

    def _run_method(self, zone: _Zone, fmri: str, method: list[str], generation: int) -> tuple[int | None, bool]:
        root = self.zone_root(zone.uuid)
        run = self.run_dir / zone.uuid
        env = {
            "PATH": f"{self.fakebin}:/usr/bin:/bin",
            "IMGPREP_ROOT": str(root),
            "HOME": str(root / "root"),
            "LC_ALL": "C",
            "SMF_FMRI": fmri,
            "SIM_METADATA": str(self.zonepath(zone.uuid) / "config" / "metadata.json"),
            "SIM_CALLS": str(run / "calls.jsonl"),
            "SIM_HALTED": str(run / "halted"),
            "SIM_ZONENAME": zone.uuid,
            "SIM_SVCS": str(run / "svcs.json"),
            "SIM_BOOT_TIME": str(zone.boots[-1].booted_at),
        }
        # svc.startd sends a method's output to the instance's log in the zone
        log_path = root / "var/svc/log" / (fmri[len("svc:/") :].replace("/", "-") + ".log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [str(root / method[0].lstrip("/")), *method[1:]]
        with self._lock:
            if zone.generation != generation:
                return None, False
            with log_path.open("ab") as log:
                zone.proc = subprocess.Popen(
                    ["/bin/sh", *argv],
                    env=env,
                    cwd=root,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        proc = zone.proc
        rc = proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the zone's other processes die with it
        return rc, (run / "halted").exists()

    # --- zfs -----------------------------------------------------------------------------

    def _ds_path(self, name: str) -> Path:
        path = self.datasets.get(name)
        if path is None:
            raise CommandFailed(f"cannot open '{name}': dataset does not exist")
        return path

    def _zone_of(self, dataset: str) -> _Zone | None:
        if dataset.count("/") < 1:
            return None
        name = dataset.split("/")[1]
        return self.zones.get(name) or self.zones.get(name.rsplit("-disk", 1)[0])

    def _children(self, dataset: str) -> list[Path]:
        return [p for n, p in self.datasets.items() if n.startswith(dataset + "/")]

    def _zfs(self, args: list[str]) -> str:
        if not args:
            raise CommandFailed("usage: zfs <command>", 2)
        cmd, rest = args[0], args[1:]
        with self._lock:
            if cmd == "list":
                return self._zfs_list(rest)
            if cmd == "snapshot":
                props: dict[str, str] = {}
                names: list[str] = []
                it = iter(rest)
                for a in it:
                    if a == "-o":
                        key, _, value = next(it).partition("=")
                        props[key] = value
                    else:
                        names.append(a)
                for name in names:
                    ds, _, short = name.partition("@")
                    src = self._ds_path(ds)
                    if not short:
                        raise CommandFailed(f"cannot create snapshot '{name}': invalid name")
                    if name in self.snapshots:
                        raise CommandFailed(f"cannot create snapshot '{name}': dataset already exists")
                    dest = self.snap_dir / uuidlib.uuid4().hex
                    skip = {c.resolve() for c in self._children(ds)}
                    shutil.copytree(
                        src,
                        dest,
                        symlinks=True,
                        copy_function=_copy,
                        ignore=lambda d, names, skip=skip: [n for n in names if (Path(d) / n).resolve() in skip],
                    )
                    self._order += 1
                    self.snapshots[name] = _Snapshot(dest, props, self._order)
                return ""
            if cmd == "rollback":
                name = rest[-1] if rest else ""
                snap = self.snapshots.get(name)
                if snap is None:
                    raise CommandFailed(f"cannot open '{name}': dataset does not exist")
                ds = name.split("@")[0]
                newer = [n for n in self.snapshot_names(ds) if self.snapshots[n].order > snap.order]
                if newer and "-r" not in rest:
                    raise CommandFailed(
                        f"cannot rollback to '{name}': more recent snapshots or bookmarks exist\n"
                        "use '-r' to force deletion of the following snapshots and bookmarks:\n" + "\n".join(newer)
                    )
                zone = self._zone_of(ds)
                target = self._ds_path(ds)
                if zone is not None and zone.state == "running":
                    raise CommandFailed(f"cannot unmount '{target}': Device busy")
                for n in newer:
                    shutil.rmtree(self.snapshots.pop(n).path)
                keep = {c.resolve() for c in self._children(ds)}
                for entry in list(target.iterdir()):
                    if entry.resolve() in keep:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                shutil.copytree(snap.path, target, symlinks=True, dirs_exist_ok=True, copy_function=_copy)
                shutil.copystat(snap.path, target)
                return ""
            if cmd == "destroy":
                name = rest[-1] if rest else ""
                if "@" not in name:
                    raise CommandFailed("the simulator only destroys snapshots", 2)
                snap = self.snapshots.pop(name, None)
                if snap is None:
                    raise CommandFailed("could not find any snapshots to destroy; check snapshot names.")
                shutil.rmtree(snap.path)
                return ""
            if cmd == "send":  # -nP: the estimate only
                name = rest[-1]
                snap = self.snapshots.get(name)
                if snap is not None and (snap.path / "volume").is_file():
                    size = sum(length for _, length in _extents(snap.path / "volume"))
                else:
                    size = len(self._send_bytes(name))
                return f"full\t{name}\t{size}\nsize\t{size}\n"
        raise CommandFailed(f"zfs: unsupported in the simulator: {shlex.join(args)}", 2)

    def _zfs_list(self, args: list[str]) -> str:
        header = "-H" not in args
        columns = ["name", "used", "avail", "refer", "mountpoint"]
        types = "filesystem"
        depth: int | None = None
        names: list[str] = []
        it = iter(args)
        for a in it:
            if a == "-o":
                columns = next(it).split(",")
            elif a == "-t":
                types = next(it)
            elif a == "-d":
                depth = int(next(it))
            elif a == "-r":
                depth = 99
            elif a in ("-H", "-p"):
                pass
            else:
                names.append(a)
        rows: list[dict[str, str]] = []
        for name in names or [POOL]:
            path = self._ds_path(name)
            if "filesystem" in types or "all" in types:
                rows.append({"name": name, "mountpoint": str(path), "type": "filesystem"})
            if "snapshot" in types or "all" in types:
                if depth is None and names:
                    continue
                for snap in self.snapshot_names(name):
                    rows.append({"name": snap, "mountpoint": "-", "type": "snapshot", **self.snapshots[snap].props})
        lines = []
        if header:
            lines.append("\t".join(c.upper() for c in columns))
        for row in rows:
            path = self.snapshots[row["name"]].path if row["type"] == "snapshot" else self.datasets[row["name"]]
            size = sum(_allocated(f) for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            values = {"used": str(size), "referenced": str(size), "refer": str(size), "avail": str(10 * 2**30)}
            lines.append("\t".join(row.get(c) or values.get(c) or "-" for c in columns))
        return "".join(line + "\n" for line in lines)

    def _send_bytes(self, name: str) -> bytes:
        snap = self.snapshots.get(name)
        if snap is None:
            raise CommandFailed(f"cannot open '{name}': dataset does not exist")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
            for dirpath, dirnames, filenames in os.walk(snap.path):
                dirnames.sort()
                for entry in sorted(dirnames + filenames):
                    full = Path(dirpath) / entry
                    info = tar.gettarinfo(str(full), arcname=str(full.relative_to(snap.path)))
                    info.uid = info.gid = 0
                    info.uname = info.gname = "root"
                    if info.isfile():
                        with full.open("rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
        header = json.dumps({"snapshot": name, "simulated": True}).encode() + b"\n"
        return STREAM_MAGIC + header + buf.getvalue()

    def _volume_stream(self, name: str, snap: _Snapshot) -> Iterator[bytes]:
        volume = snap.path / "volume"
        size = volume.stat().st_size
        yield (
            STREAM_MAGIC
            + json.dumps({"snapshot": name, "simulated": True, "type": "volume", "size": size}).encode()
            + b"\n"
        )
        with volume.open("rb") as f:
            for offset, length in _extents(volume):
                f.seek(offset)
                data = f.read(length)
                if data.count(0) == len(data):
                    continue  # a block of zeros: ZFS stores none
                yield b"%d %d\n" % (offset, len(data)) + data

    def _zfs_send(self, args: list[str], stdout: Callable[[bytes], None], drop: Callable[[], None]) -> None:
        with self._lock:
            snap = self.snapshots.get(args[-1])
            if snap is not None and (snap.path / "volume").is_file():
                chunks: Iterator[bytes] = self._volume_stream(args[-1], snap)
            else:
                data = self._send_bytes(args[-1])
                chunks = (data[o : o + 64 * 1024] for o in range(0, len(data), 64 * 1024))
            cut = self.faults.send_drops > 0
            if cut:
                self.faults.send_drops -= 1
        sent = 0
        for chunk in chunks:
            if cut and sent >= self.faults.send_drop_after:
                drop()
                raise Dropped(f"zfs send cut after {sent} bytes")
            stdout(chunk)
            sent += len(chunk)

    # --- imgadm ----------------------------------------------------------------------------

    def _imgadm(self, args: list[str]) -> str:
        if args[:1] == ["get"] and len(args) == 2:
            manifest = self.images.get(args[1])
            if manifest is None:
                raise CommandFailed(
                    f'imgadm get: error (ImageNotInstalled): image "{args[1]}" was not found on zpool "{POOL}"'
                )
            return json.dumps({"manifest": manifest, "zpool": POOL, "source": "https://images.example"}) + "\n"
        raise CommandFailed(f"imgadm: unsupported in the simulator: {shlex.join(args)}", 2)


def _allocated(path: Path) -> int:
    """Bytes a file uses (a sparse zvol's holes take none, as ZFS's ``referenced``)."""
    st = path.stat()
    return min(st.st_size, st.st_blocks * 512)


class _MetadataFile(MutableMapping[str, str]):
    """A VM's customer metadata as a live mapping over its ``config/metadata.json``: what
    the metadata service reads and writes is what ``vmadm get`` shows."""

    def __init__(self, path: Path, lock: threading.RLock) -> None:
        self.path = path
        self.lock = lock

    def _load(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path.read_text())
        return data

    def _customer(self) -> dict[str, str]:
        customer: dict[str, str] = self._load().get("customer_metadata", {})
        return customer

    def __getitem__(self, key: str) -> str:
        with self.lock:
            return self._customer()[key]

    def __setitem__(self, key: str, value: str) -> None:
        with self.lock:
            data = self._load()
            data.setdefault("customer_metadata", {})[key] = value
            self.path.write_text(json.dumps(data, indent=2, sort_keys=True))

    def __delitem__(self, key: str) -> None:
        with self.lock:
            data = self._load()
            del data.setdefault("customer_metadata", {})[key]
            self.path.write_text(json.dumps(data, indent=2, sort_keys=True))

    def __iter__(self) -> Iterator[str]:
        with self.lock:
            return iter(list(self._customer()))

    def __len__(self) -> int:
        with self.lock:
            return len(self._customer())


def _lx_leader(proc: subprocess.Popen[bytes]) -> int | None:
    """The host pid of an nspawn container's init: the nspawn process's child."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _start_methods(manifests: list[Path]) -> dict[str, list[str]]:
    """Instance FMRI -> start method argv (``%m`` expanded), from the manifests' exec_method."""
    methods: dict[str, list[str]] = {}
    for path in manifests:
        root = ET.parse(path).getroot()
        for service in root.iter("service"):
            name = service.get("name", "")
            start = _exec_start(service)
            instances = [i.get("name", "") for i in service.findall("instance")]
            if service.find("create_default_instance") is not None:
                instances.append("default")
            for inst in instances:
                inst_elem = next((i for i in service.findall("instance") if i.get("name") == inst), None)
                exec_line = (_exec_start(inst_elem) if inst_elem is not None else None) or start
                if exec_line and not exec_line.startswith(":"):
                    methods[f"svc:/{name}:{inst}"] = [w.replace("%m", "start") for w in shlex.split(exec_line)]
    return methods


def _exec_start(elem: ET.Element) -> str | None:
    for method in elem.findall("exec_method"):
        if method.get("name") == "start":
            return method.get("exec")
    return None


def open_stream(path: Path) -> IO[bytes]:
    """Open an exported image file whatever its compression (.zfs, .zfs.gz, .zfs.xz)."""
    import gzip
    import lzma

    if path.name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    if path.name.endswith(".xz"):
        return cast(IO[bytes], lzma.open(path, "rb"))
    return path.open("rb")


__all__ = [
    "BootRecord",
    "ComputeNode",
    "Dropped",
    "Faults",
    "ServiceGraph",
    "open_stream",
    "read_send_stream",
    "read_volume_stream",
    "tree_digest",
]
