"""imgprep.libguestfs without an appliance: a fake ``guestfs`` module records the calls.

What is checked: the bindings are imported only when a guest is opened (and their
absence is a typed, one-line error), and a mountpoint that does not mount is an error
before anything is written, not a warning followed by writes onto the root filesystem.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from imgprep.errors import MissingDependency
from imgprep.libguestfs import MISSING_BINDINGS, GuestfsError, open_guest

DISKS = [(Path("/var/lib/libvirt/images/proto.qcow2"), "qcow2")]
MOUNTS = {"/": "/dev/sda1", "/var": "/dev/sda2"}


class FakeHandle:
    """The libguestfs calls open_guest makes, over a guest with / and /var."""

    def __init__(self, fail_mount: str | None) -> None:
        self.fail_mount = fail_mount
        self.calls: list[tuple[str, ...]] = []

    def set_backend_settings(self, settings: list[str]) -> None:
        self.calls.append(("set_backend_settings", *settings))

    def add_drive_opts(self, path: str, format: str, readonly: bool) -> None:
        self.calls.append(("add_drive_opts", path, format, str(readonly)))

    def launch(self) -> None:
        self.calls.append(("launch",))

    def inspect_os(self) -> list[str]:
        return ["/dev/sda1"]

    def inspect_get_mountpoints(self, root: str) -> dict[str, str]:
        return dict(MOUNTS)

    def _mount(self, verb: str, device: str, mountpoint: str) -> None:
        self.calls.append((verb, device, mountpoint))
        if mountpoint == self.fail_mount:
            raise RuntimeError(f"mount: {device}: wrong fs type")

    def mount(self, device: str, mountpoint: str) -> None:
        self._mount("mount", device, mountpoint)

    def mount_ro(self, device: str, mountpoint: str) -> None:
        self._mount("mount_ro", device, mountpoint)

    def write(self, path: str, data: bytes) -> None:
        self.calls.append(("write", path))

    def chmod(self, mode: int, path: str) -> None:
        self.calls.append(("chmod", path))

    def chown(self, uid: int, gid: int, path: str) -> None:
        self.calls.append(("chown", path))

    def sync(self) -> None:
        self.calls.append(("sync",))

    def umount_all(self) -> None:
        self.calls.append(("umount_all",))

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))

    def close(self) -> None:
        self.calls.append(("close",))


def _fake_guestfs(monkeypatch: pytest.MonkeyPatch, fail_mount: str | None) -> FakeHandle:
    handle = FakeHandle(fail_mount)

    def make(python_return_dict: bool) -> FakeHandle:
        assert python_return_dict is True
        return handle

    module: Any = types.ModuleType("guestfs")
    module.GuestFS = make
    monkeypatch.setitem(sys.modules, "guestfs", module)
    return handle


def test_all_mountpoints_mounted_then_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: both filesystems mount, the write happens, the guest is synced."""
    handle = _fake_guestfs(monkeypatch, fail_mount=None)
    _write_runner(readonly=False)
    assert ("mount", "/dev/sda1", "/") in handle.calls
    assert ("mount", "/dev/sda2", "/var") in handle.calls
    assert ("write", "/var/lib/imgprep-prepare/runner") in handle.calls
    assert handle.calls[-4:] == [("sync",), ("umount_all",), ("shutdown",), ("close",)]


def _write_runner(readonly: bool) -> None:
    with open_guest(DISKS, readonly=readonly, force_tcg=True) as guest:
        guest.write("/var/lib/imgprep-prepare/runner", b"#!/bin/sh\n", 0o755)


@pytest.mark.parametrize("readonly", [False, True])
def test_a_mountpoint_that_does_not_mount_is_an_error_before_any_write(
    monkeypatch: pytest.MonkeyPatch, readonly: bool
) -> None:
    handle = _fake_guestfs(monkeypatch, fail_mount="/var")
    with pytest.raises(GuestfsError, match=r"cannot mount /dev/sda2 on /var: mount: /dev/sda2: wrong fs type"):
        _write_runner(readonly)
    assert ("launch",) in handle.calls  # the control: it got as far as mounting
    assert not [c for c in handle.calls if c[0] in ("write", "chmod", "chown", "sync")]
    assert handle.calls[-1] == ("close",)  # the appliance is closed all the same


def test_missing_bindings_are_a_typed_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "guestfs", None)  # "import guestfs" raises ImportError
    with pytest.raises(MissingDependency) as info, open_guest(DISKS, readonly=True, force_tcg=True):
        pass
    assert info.value.message == MISSING_BINDINGS
    assert "\n" not in MISSING_BINDINGS
    assert "python3-guestfs" in MISSING_BINDINGS
    assert "--system-site-packages" in MISSING_BINDINGS


@pytest.mark.allow_subprocess(Path(sys.executable).name)
def test_the_cli_and_the_backends_import_without_the_bindings(tmp_path: Path) -> None:
    """In a fresh interpreter where ``import guestfs`` fails, every imgprep module imports."""
    blocker = tmp_path / "guestfs.py"
    blocker.write_text("raise ImportError('No module named guestfs (blocked by the test)')\n")
    code = (
        "import importlib, pkgutil, imgprep\n"
        "names = [m.name for m in pkgutil.walk_packages(imgprep.__path__, 'imgprep.')]\n"
        "for n in names:\n    if not n.endswith('__main__'): importlib.import_module(n)\n"
        "import sys; assert 'guestfs' not in sys.modules; print(len(names))\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[2]}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 10  # the walk found the package's modules


class DriveHandle:
    """What ``Guest.root_drive_index`` asks: two drives, sda (a partition table) and sdb."""

    def is_lv(self, mountable: str) -> bool:
        if mountable.startswith("btrfsvol:"):
            return False
        return mountable.startswith("/dev/vg")

    def part_to_dev(self, device: str) -> str:
        if not device[-1].isdigit():
            raise RuntimeError(f"part_to_dev: {device}: not a partition")
        return device.rstrip("0123456789")

    def device_index(self, device: str) -> int:
        if device not in ("/dev/sda", "/dev/sdb"):
            raise RuntimeError(f"device_index: {device}: not a device")  # what libguestfs says of a mountable
        return ["/dev/sda", "/dev/sdb"].index(device)

    def mountable_device(self, mountable: str) -> str:
        assert mountable == "btrfsvol:/dev/sdb2/@"
        return "/dev/sdb2"


@pytest.mark.parametrize(
    ("root", "index"),
    [("/dev/sda1", 0), ("/dev/sdb", 1), ("btrfsvol:/dev/sdb2/@", 1)],
)
def test_the_root_drive_of_a_partition_a_whole_disk_and_a_btrfs_subvolume(root: str, index: int) -> None:
    from imgprep.libguestfs import Guest

    assert Guest(DriveHandle(), root).root_drive_index() == index
