"""bhyve and kvm VMs on a compute node: the parts of the SmartOS chain that differ from zones.

* validate: ``vmadm get``'s ``disks`` (each a zvol, ``zfs_filesystem``), ``bootrom``
  (bhyve), the origin image; ``disks[0]`` is the one imaged (as imgadm). Every disk's
  snapshots are checked for an earlier job's leftovers;
* checkpoint (in the backend): the zone dataset (its ``config/`` holds the metadata)
  and every disk's zvol, so that the rollback restores all of them;
* inject (early): the global zone never mounts the guest's filesystem. imgprep opens
  ``disks[0]``'s device node (``/dev/zvol/rdsk/<zvol>``) from the imgprep host over SSH
  with QEMU's ``ssh`` block driver, host key pinned (:mod:`imgprep.nbdssh`), and
  libguestfs writes, inside its own appliance VM, the systemd unit, its wants link,
  the runner, the operator script and the armed file of the Linux guest side. The
  runner reports through the guest's ``/usr/sbin/mdata-put`` if it has one (Triton's
  images do), else through imgprep's own Metadata V2 client (``units/imgprep-mdata-v2``,
  injected too) on the metadata serial port ``/dev/ttyS1``. A guest whose root cannot be
  opened (an encrypted root, an unknown filesystem, not systemd) is refused, naming
  ``--mode legacy``;
* inject (``--mode legacy``): nothing is written into the guest: the operator script
  (``--script``, a classic prepare-image script that reports ``prepare-image:state``
  itself through ``mdata-put`` and powers the guest off) goes into the VM's internal
  metadata as ``operator-script``, as ``imgadm create`` does, for the guest tools (or
  cloud-init) to run late, after the daemons started; the job record carries a warning
  saying so;
* export: before the image snapshot, ``disks[0]`` is opened read-only the same way and
  every path imgprep injected is looked for (a guest reporting success without the
  cleanup is not imaged); then ``<disk0>@final`` and its ``zfs send``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgprep import artifacts, nbdssh
from imgprep.backends.base import VmFacts
from imgprep.backends.smartos import imgadm, zfs
from imgprep.backends.smartos.node import Node
from imgprep.errors import ImgprepError, InvalidInput, NotSupported, VmBusy
from imgprep.export import STREAM_COMPRESSIONS
from imgprep.libguestfs import GuestfsError, open_guest
from imgprep.sanitize import clean

if TYPE_CHECKING:
    from imgprep.backends.smartos.backend import SmartosBackend

log = logging.getLogger(__name__)

HVM_BRANDS = ("bhyve", "kvm")
GUEST_MDATA_PUT = "/usr/sbin/mdata-put"  # what Triton's Linux images ship
METADATA_TTY = "/dev/ttyS1"  # an HVM guest's metadata serial port
OPERATOR_SCRIPT_KEY = "operator-script"  # imgadm create's internal metadata key
LEGACY_WARNING = (
    "--mode legacy: the operator script runs late, from the VM's internal metadata (operator-script), "
    "after the guest's daemons have started (the classic imgadm create path)"
)
_ZVOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,250}$")


def legacy_hint(why: str) -> str:
    return (
        f"{why}; imgprep cannot place its early unit in this guest. Run with --mode legacy --script "
        "PREPARE_IMAGE for the classic late operator-script (it runs after the guest's daemons start)"
    )


def disks(vm: dict[str, Any], name: str, problems: list[str]) -> list[str]:
    """The zvols of the VM's disks, in ``vmadm get`` order (disks[0] is imaged)."""
    found: list[str] = []
    raw = vm.get("disks")
    if not isinstance(raw, list) or not raw:
        problems.append(f"VM {name}: vmadm reports no disks")
        return found
    for index, disk in enumerate(raw):
        zvol = disk.get("zfs_filesystem") if isinstance(disk, dict) else None
        if not isinstance(zvol, str) or not _ZVOL_RE.match(zvol) or ".." in zvol or "@" in zvol:
            problems.append(f"VM {name}: disk {index} has no usable zfs_filesystem (a zvol)")
            continue
        found.append(zvol)
    return found


def learn(vm: dict[str, Any], brand: str, learned: dict[str, Any]) -> dict[str, Any]:
    """imgadm's manifest for an HVM image: type zvol, requirements.brand, bootrom (bhyve),
    image_size (MiB) of disks[0]; the origin's inherited fields are in ``learned``."""
    learned = dict(learned)
    learned["type"] = "zvol"
    if learned.get("os") == "smartos":
        learned["os"] = "linux"
    requirements = dict(learned.get("requirements") or {})
    requirements.pop("min_platform", None)  # a guest OS image, not a platform binary
    requirements["brand"] = brand
    if brand == "bhyve" and vm.get("bootrom"):
        requirements["bootrom"] = str(vm["bootrom"])
    learned["requirements"] = requirements
    first = (vm.get("disks") or [{}])[0]
    if isinstance(first, dict) and isinstance(first.get("size"), int):
        learned["image_size"] = first["size"]
    return learned


def validate(backend: SmartosBackend, node: Node, uuid: str, vm: dict[str, Any]) -> VmFacts:
    """``vmadm get`` of a bhyve/kvm VM -> its facts; records the zone and its disks."""
    name = str(vm.get("alias") or uuid)
    brand = str(vm.get("brand"))
    problems: list[str] = []
    state = vm.get("state")
    if state not in ("running", "stopped"):
        problems.append(f"VM {name} is {state!r}; it must be running or stopped")
    dataset, zonepath = vm.get("zfs_filesystem"), vm.get("zonepath")
    if not dataset or not zonepath:
        problems.append(f"VM {name}: vmadm reports no zfs_filesystem/zonepath")
    zvols = disks(vm, name, problems)
    if brand == "bhyve" and vm.get("bootrom") not in (None, "uefi", "bios") and not problems:
        problems.append(f"VM {name}: unknown bootrom {clean(str(vm.get('bootrom')), limit=40)!r}")
    if backend.request.mode == "legacy" and backend.request.script_is_default:
        problems.append(
            f"--mode legacy for {brand} VMs runs your classic prepare-image script from the VM's metadata (it "
            "reports prepare-image:state itself through mdata-put and powers the guest off): pass --script"
        )
    if backend.request.compression not in STREAM_COMPRESSIONS:
        problems.append(
            f"compression {backend.request.compression} is not available for SmartOS images: IMGAPI and imgadm "
            f"import read {', '.join(STREAM_COMPRESSIONS)} (and bzip2); pass --compression gzip"
        )
    datasets = [str(dataset), *zvols] if dataset else list(zvols)
    if not problems:
        for ds in datasets:
            snaps = zfs.snapshots(node, ds)
            for snap, job in snaps.items():
                if snap.startswith(zfs.CHECKPOINT_PREFIX) or (job not in ("-", "") and job != backend.record["uuid"]):
                    raise VmBusy(
                        f"VM {name} still has snapshot {ds}@{clean(snap)} from imgprep job {clean(job)}; "
                        "run `imgprep jobs list` and `imgprep jobs recover JOB_UUID`"
                    )
            if ds == zvols[0] and zfs.FINAL_SNAPNAME in snaps and snaps[zfs.FINAL_SNAPNAME] != backend.record["uuid"]:
                problems.append(
                    f"{ds}@{zfs.FINAL_SNAPNAME} already exists (left by imgadm create?); imgprep names the image "
                    "snapshot @final and will not rename or destroy yours: remove or rename it first"
                )
    if not problems:
        out = node.run(["zfs", "list", "-H", "-p", "-o", "referenced", zvols[0]]).stdout.strip()
        backend.check_free_space(int(out) if out.isdigit() else 0, problems)
    if problems:
        raise InvalidInput(problems)
    from imgprep.backends.smartos.backend import Zone

    learned = learn(vm, brand, imgadm.learn(node, vm, brand))
    backend.state.ssh = {**node.target.to_dict(), "accept_new_host_key": False}
    backend.state.zone = Zone(brand, str(zonepath), str(dataset), datasets, disks=zvols)
    return VmFacts(str(vm.get("uuid") or uuid), name, state == "running", learned)


def device_path(zvol: str) -> str:
    return f"/dev/zvol/rdsk/{zvol}"


def _open_disk0(backend: SmartosBackend, *, readonly: bool = False) -> Any:
    """The context manager serving disks[0] over SSH on a local NBD socket."""
    node = backend._node()
    route = node.target.route()
    hop = route[-1]
    transport = node.client.connect()  # the host key verified here, as for every command
    host_key = transport.get_remote_server_key()
    if not hop.key_files:
        raise NotSupported("an HVM guest's disk is opened with the node's IdentityFile: configure key_file")
    return nbdssh.open_remote_disk(
        host=hop.host,
        port=hop.port,
        user=hop.user,
        key_file=Path(hop.key_files[0]).expanduser(),
        host_key=host_key,
        path=device_path(backend._zone.disks[0]),
        via=node.client.jump_transport() if len(route) > 1 else None,
        readonly=readonly,
    )


def inject(backend: SmartosBackend) -> None:
    if backend.request.mode == "legacy":
        _inject_legacy(backend)
        return
    request = backend.request
    script = request.script
    if request.script_is_default:
        default = artifacts.artifact("operator_scripts/linux-prepare-image")
        script = default.read_bytes()
        backend.record["params"]["script_name"] = default.name
    link = artifacts.wants_link("early")
    wants_dir = str(Path(link).parent)
    backend.state.injected = [artifacts.UNIT_PATH, link, artifacts.PREFIX]
    backend.persist()
    try:
        with (
            _open_disk0(backend) as sock,
            open_guest([], readonly=False, force_tcg=backend.config.libguestfs_tcg, nbd_socket=sock) as guest,
        ):
            if guest.inspect("type") != "linux":
                raise NotSupported(legacy_hint(f"the guest OS is {guest.inspect('type')}, not Linux"))
            if not guest.is_dir("/etc/systemd/system") or not any(
                guest.exists(p) for p in ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
            ):
                raise NotSupported(legacy_hint("the guest does not use systemd"))
            backend.state.guest_os = {
                "distro": guest.inspect("distro"),
                "version": f"{guest.inspect('major_version')}.{guest.inspect('minor_version')}",
                "product": guest.inspect("product_name"),
            }
            has_mdata = guest.exists(GUEST_MDATA_PUT)
            channel = f"mdata:{GUEST_MDATA_PUT}" if has_mdata else f"mdata-v2:{METADATA_TTY}"
            wants_dir_exists = guest.is_dir(wants_dir)
            files = artifacts.linux_injection(
                mode="early",
                script=script,
                script_timeout=int(backend.config.timeouts.prepare),
                channel=channel,
                wants_dir_exists=wants_dir_exists,
            )
            if not has_mdata:  # imgprep's V2 client, before the armed file (the last)
                client = artifacts.GuestFile(
                    f"{artifacts.PREFIX}/mdata-v2", artifacts.artifact("units/imgprep-mdata-v2").read_bytes(), 0o755
                )
                files.insert(len(files) - 1, client)
            guest.write_linux_injection(files, wants_dir=None if wants_dir_exists else wants_dir)
            log.info("injected the early unit into disk0 (reporting through %s)", channel)
    except NotSupported as exc:
        if "--mode legacy" in exc.message:
            raise
        raise NotSupported(legacy_hint(exc.message)) from None
    except GuestfsError as exc:
        raise NotSupported(legacy_hint(f"the guest's root filesystem cannot be opened ({exc.message})")) from None


def _inject_legacy(backend: SmartosBackend) -> None:
    try:
        text = backend.request.script.decode()
    except UnicodeDecodeError:
        raise InvalidInput("the operator script is not UTF-8 text: it cannot go into the VM's metadata") from None
    backend.record.setdefault("warnings", []).append(LEGACY_WARNING)
    backend.emit({"event": "warning", "step": "inject", "message": LEGACY_WARNING})
    log.warning("%s", LEGACY_WARNING)
    backend.state.injected = [f"internal_metadata:{OPERATOR_SCRIPT_KEY}"]
    backend.persist()
    update = {"set_internal_metadata": {OPERATOR_SCRIPT_KEY: text}}
    backend._run(["vmadm", "update", backend._uuid], input=json.dumps(update).encode())


def check_clean(backend: SmartosBackend) -> None:
    """Nothing imgprep injected is left on disks[0] (opened read-only over SSH)."""
    if backend.request.mode == "legacy":
        return
    paths = [artifacts.UNIT_PATH, artifacts.wants_link("early"), artifacts.PREFIX]
    with (
        _open_disk0(backend, readonly=True) as sock,
        open_guest([], readonly=True, force_tcg=backend.config.libguestfs_tcg, nbd_socket=sock) as guest,
    ):
        found = [p for p in paths if guest.exists(p)]
    if found:
        raise ImgprepError(
            f"the prepare boot left imgprep files in the guest: {', '.join(found)}; not imaging it",
            code="PrepareImageError",
        )
