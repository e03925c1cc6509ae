"""Offline guest disk editing through libguestfs.

The guest filesystem is mounted inside libguestfs' own appliance VM, never on the
host: a hostile filesystem cannot reach the host kernel. One appliance launch per
use (they take ~30 s under software emulation), so callers batch their work.

The libguestfs Python bindings are not on PyPI: they come with the system's libguestfs
(Debian's ``python3-guestfs``) and are imported only when a guest is opened, so that
everything else (``--help``, a bad VM name, ``jobs``, ``serve``) works without them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from imgprep.artifacts import PREFIX, GuestFile
from imgprep.errors import ImgprepError, MissingDependency, NotSupported

log = logging.getLogger(__name__)


class GuestfsError(ImgprepError):
    code = "GuestfsError"


MISSING_BINDINGS = (
    "the libguestfs Python bindings (module guestfs) are missing: install Debian's python3-guestfs "
    "and run imgprep with the system python3 or from a venv made with --system-site-packages"
)


def _guestfs() -> Any:
    try:
        import guestfs
    except ImportError:
        raise MissingDependency(MISSING_BINDINGS) from None
    return guestfs


class Guest:
    """An inspected, mounted guest. Paths are guest paths."""

    def __init__(self, handle: Any, root: str) -> None:
        self.g = handle
        self.root = root

    def inspect(self, what: str) -> str:
        return str(getattr(self.g, f"inspect_get_{what}")(self.root))

    def exists(self, path: str) -> bool:
        return bool(self.g.exists(path)) or self.is_symlink(path)

    def is_dir(self, path: str) -> bool:
        return bool(self.g.is_dir(path, followsymlinks=True))

    def is_symlink(self, path: str) -> bool:
        try:
            return bool(self.g.is_symlink(path))
        except RuntimeError:
            return False

    def read(self, path: str) -> bytes:
        data: bytes = self.g.read_file(path)
        return data

    def readlink(self, path: str) -> str:
        return str(self.g.readlink(path))

    def ls(self, path: str) -> list[str]:
        return [str(x) for x in self.g.ls(path)]

    def find(self, path: str) -> list[str]:
        return [str(x) for x in self.g.find(path)]

    def stat_mode(self, path: str) -> int:
        return int(self.g.lstatns(path)["st_mode"])

    def write(self, path: str, data: bytes, mode: int) -> None:
        self.g.write(path, data)
        self.g.chmod(mode, path)
        self.g.chown(0, 0, path)

    def mkdir_p(self, path: str, mode: int = 0o755) -> None:
        self.g.mkdir_p(path)
        self.g.chmod(mode, path)

    def write_linux_injection(self, files: Sequence[GuestFile], *, wants_dir: str | None) -> None:
        """Write imgprep's Linux injection plan (:func:`imgprep.artifacts.linux_injection`):
        ``wants_dir`` created first when the guest lacks it, imgprep's directory made
        afresh (0700), then the files and links in order -- the armed file is last, so a
        partial injection is never armed."""
        if wants_dir is not None:
            self.mkdir_p(wants_dir)
        self.rm_rf(PREFIX)
        self.mkdir_p(PREFIX, 0o700)
        self.write_files(files)

    def write_files(self, files: Sequence[GuestFile]) -> None:
        """Write files and links in order (their directories exist)."""
        for f in files:
            if f.link:
                self.symlink(f.link, f.path)
            else:
                self.write(f.path, f.data, f.mode)

    def symlink(self, target: str, link: str) -> None:
        self.g.ln_sf(target, link)

    def rm_rf(self, path: str) -> None:
        self.g.rm_rf(path)

    def root_drive_index(self) -> int:
        """Which drive (in the order they were added) holds the root filesystem, found by
        inspection (a partition, a whole disk, an LVM volume's first physical volume, or
        the device of a btrfs subvolume)."""
        return self._drive_of(self.root)

    def _drive_of(self, device: str) -> int:
        if device.startswith("btrfsvol:"):  # a subvolume root: "btrfsvol:/dev/sda2/@"
            device = str(self.g.mountable_device(device))
        if self.g.is_lv(device):
            vg = str(self.g.lvm_canonical_lv_name(device)).split("/")[2]
            uuids = {str(u).replace("-", "") for u in self.g.vgpvuuids(vg)}
            pvs = [str(pv["pv_name"]) for pv in self.g.pvs_full() if str(pv["pv_uuid"]).replace("-", "") in uuids]
            if not pvs:
                raise GuestfsError(f"no physical volume found for the root volume group {vg}")
            return min(self._drive_of(pv) for pv in pvs)
        with contextlib.suppress(RuntimeError):
            device = str(self.g.part_to_dev(device))  # a partition: its whole disk
        return int(self.g.device_index(device))


SELINUX_CONFIG = "/etc/selinux/config"
SELINUX_CONFIG_MAX = 64 * 1024
_SELINUX_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
GUEST_SETFILES = ("/usr/sbin/setfiles", "/sbin/setfiles")


def selinux_file_contexts(guest: Guest) -> str | None:
    """The guest's own ``file_contexts`` when its SELinux is not disabled, else None.

    Reads ``/etc/selinux/config`` (bounded, a regular file only); the policy name it
    gives is checked against a strict pattern before it becomes part of a guest path."""
    config = SELINUX_CONFIG
    if not guest.exists(config) or guest.is_symlink(config) or guest.is_dir(config):
        return None
    if int(guest.g.filesize(config)) > SELINUX_CONFIG_MAX:
        raise GuestfsError(f"the guest's {config} is larger than {SELINUX_CONFIG_MAX} bytes")
    settings: dict[str, str] = {}
    for raw in guest.read(config).decode("utf-8", errors="replace").splitlines():
        key, sep, value = raw.strip().partition("=")
        if sep and key in ("SELINUX", "SELINUXTYPE"):
            settings[key] = value.strip().strip("\"'")
    if settings.get("SELINUX", "disabled").lower() not in ("enforcing", "permissive"):
        return None
    policy = settings.get("SELINUXTYPE", "")
    if not _SELINUX_TYPE.fullmatch(policy):
        raise GuestfsError(f"the guest's {config} names an invalid SELinux policy: {policy[:64]!r}")
    spec = f"/etc/selinux/{policy}/contexts/files/file_contexts"
    if not guest.exists(spec) or guest.is_symlink(spec) or guest.is_dir(spec):
        raise GuestfsError(f"the guest enables SELinux but has no {spec}")
    return spec


def selinux_label(guest: Guest, paths: Sequence[str]) -> str | None:
    """Label ``paths`` (recursively) as the guest's own policy says, after they are
    written: files written through libguestfs carry no label (the appliance runs no
    policy), and an enforcing guest refuses unlabelled unit files and executables.

    Uses the appliance's ``setfiles`` when it has one, else the guest's own (run by
    libguestfs inside its appliance, chrooted into the guest). Returns the
    ``file_contexts`` used, or None when the guest has no SELinux enabled."""
    spec = selinux_file_contexts(guest)
    if spec is None:
        return None
    for path in paths:
        if not path.startswith("/") or "\n" in path or "\0" in path:
            raise ValueError(f"not an absolute guest path: {path!r}")
    try:
        if guest.g.feature_available(["selinuxrelabel"]):
            for path in paths:
                guest.g.selinux_relabel(spec, path, force=True)
            return spec
        setfiles = next((p for p in GUEST_SETFILES if guest.exists(p) and not guest.is_dir(p)), None)
        if setfiles is None:
            raise GuestfsError("the guest enables SELinux but has no setfiles to label imgprep's files")
        # -F: set the whole context (user, role, type), not only the type
        guest.g.command([setfiles, "-F", spec, *paths])
    except RuntimeError as exc:
        raise GuestfsError(f"labelling {', '.join(paths)} for SELinux failed: {str(exc)[:500]}") from None
    log.info("labelled %s with %s", " ".join(paths), spec)
    return spec


@contextlib.contextmanager
def open_guest(
    disks: Sequence[tuple[Path, str]],
    *,
    readonly: bool,
    force_tcg: bool,
    partial: bool = False,
    nbd_socket: Path | None = None,
) -> Iterator[Guest]:
    """Launch the appliance over ``disks`` (path, format), or over the raw NBD export on
    the unix socket ``nbd_socket`` (:mod:`imgprep.nbdssh`), inspect, mount the OS.

    Every filesystem the guest's fstab names must mount: a guest with ``/var`` on its own
    filesystem that did not mount would get its files written under the root filesystem's
    empty ``/var``, where the booted guest never sees them. ``partial`` (a read-only look
    at some of a guest's disks, e.g. the one exported) mounts only what is there.
    """
    g = _guestfs().GuestFS(python_return_dict=True)
    if force_tcg or os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "") == "force_tcg":
        g.set_backend_settings(["force_tcg"])
    try:
        for path, fmt in disks:
            g.add_drive_opts(str(path), format=fmt, readonly=readonly)
        if nbd_socket is not None:
            try:  # a read-only drive gets its overlay now: a first connection to the server
                g.add_drive_opts("", format="raw", readonly=readonly, protocol="nbd", server=[f"unix:{nbd_socket}"])
            except RuntimeError as exc:
                raise GuestfsError(f"libguestfs could not attach the disk served on {nbd_socket}: {exc}") from None
        try:
            g.launch()
        except RuntimeError as exc:
            raise GuestfsError(f"libguestfs could not launch its appliance: {exc}") from None
        roots = g.inspect_os()
        if not roots:
            raise NotSupported("no operating system found on the VM's disks")
        root = roots[0]
        mounts = g.inspect_get_mountpoints(root)
        for mountpoint in sorted(mounts, key=len):
            try:
                if readonly:
                    g.mount_ro(mounts[mountpoint], mountpoint)
                else:
                    g.mount(mounts[mountpoint], mountpoint)
            except RuntimeError as exc:
                if partial and mountpoint != "/":
                    log.info("not mounting %s: its filesystem is not on these disks (%s)", mountpoint, exc)
                    continue
                raise GuestfsError(f"cannot mount {mounts[mountpoint]} on {mountpoint}: {exc}") from None
        guest = Guest(g, root)
        yield guest
        if not readonly:
            g.sync()
            g.umount_all()
        g.shutdown()
    finally:
        g.close()
