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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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

    def symlink(self, target: str, link: str) -> None:
        self.g.ln_sf(target, link)

    def rm_rf(self, path: str) -> None:
        self.g.rm_rf(path)

    def root_drive_index(self) -> int:
        """Which drive (in the order they were added) holds the root filesystem, found by
        inspection (a partition, a whole disk, or an LVM volume's first physical volume)."""
        return self._drive_of(self.root)

    def _drive_of(self, device: str) -> int:
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


@contextlib.contextmanager
def open_guest(disks: Sequence[tuple[Path, str]], *, readonly: bool, force_tcg: bool) -> Iterator[Guest]:
    """Launch the appliance over ``disks`` (path, format), inspect, mount the OS.

    Every filesystem the guest's fstab names must mount: a guest with ``/var`` on its own
    filesystem that did not mount would get its files written under the root filesystem's
    empty ``/var``, where the booted guest never sees them.
    """
    g = _guestfs().GuestFS(python_return_dict=True)
    if force_tcg or os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "") == "force_tcg":
        g.set_backend_settings(["force_tcg"])
    try:
        for path, fmt in disks:
            g.add_drive_opts(str(path), format=fmt, readonly=readonly)
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
                raise GuestfsError(f"cannot mount {mounts[mountpoint]} on {mountpoint}: {exc}") from None
        guest = Guest(g, root)
        yield guest
        if not readonly:
            g.sync()
            g.umount_all()
        g.shutdown()
    finally:
        g.close()
