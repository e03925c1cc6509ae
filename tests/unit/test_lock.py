"""One job per VM: the flock, and that a dead holder does not hold it forever."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imgprep.errors import VmBusy
from imgprep.lock import VmLock, is_locked, locked


def test_second_acquire_is_vm_busy_and_release_frees_it(tmp_path: Path) -> None:
    first = VmLock(tmp_path, "libvirt-vm1")
    first.acquire()
    try:
        assert is_locked(tmp_path, "libvirt-vm1")
        with pytest.raises(VmBusy, match="libvirt-vm1") as info:
            VmLock(tmp_path, "libvirt-vm1").acquire()
        assert info.value.code == "VmBusy"
        # another VM is independent
        with locked(tmp_path, "libvirt-vm2"):
            assert is_locked(tmp_path, "libvirt-vm2")
        assert not is_locked(tmp_path, "libvirt-vm2")
    finally:
        first.release()
    assert not is_locked(tmp_path, "libvirt-vm1")
    with locked(tmp_path, "libvirt-vm1") as again:
        assert again.path.read_text() == f"{os.getpid()}\n"


def test_never_locked_vm_is_not_locked(tmp_path: Path) -> None:
    assert not is_locked(tmp_path, "libvirt-unknown")
    assert not (tmp_path / "locks").exists()  # asking does not create anything


def test_key_is_made_filename_safe(tmp_path: Path) -> None:
    with locked(tmp_path, "smartos-root@cn1:22/../x") as lock:
        assert lock.path.parent == tmp_path / "locks"
        assert lock.path.name == "smartos-root_cn1_22_.._x.lock"
        assert is_locked(tmp_path, "smartos-root@cn1:22/../x")


def test_release_is_idempotent(tmp_path: Path) -> None:
    lock = VmLock(tmp_path, "k")
    lock.acquire()
    lock.release()
    lock.release()
    assert not is_locked(tmp_path, "k")


def test_a_crashed_holder_does_not_hold_the_lock_forever(tmp_path: Path) -> None:
    """A child takes the lock and dies without releasing it; the kernel drops the flock."""
    locked_r, locked_w = os.pipe()
    die_r, die_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: take the lock, say so, wait for the word, then die without release
        code = 1
        try:
            os.close(locked_r)
            os.close(die_w)
            VmLock(tmp_path, "libvirt-vm1").acquire()
            os.write(locked_w, b"L")
            os.read(die_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(locked_w)
    os.close(die_r)
    try:
        assert os.read(locked_r, 1) == b"L"
        assert is_locked(tmp_path, "libvirt-vm1")
        with pytest.raises(VmBusy):
            VmLock(tmp_path, "libvirt-vm1").acquire()
        assert (tmp_path / "locks" / "libvirt-vm1.lock").read_text() == f"{pid}\n"
    finally:
        os.write(die_w, b"x")
        os.close(die_w)
        os.close(locked_r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not is_locked(tmp_path, "libvirt-vm1")
    with locked(tmp_path, "libvirt-vm1"):
        assert is_locked(tmp_path, "libvirt-vm1")
