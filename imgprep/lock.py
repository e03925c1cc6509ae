"""One job per VM: an flock on a per-VM file. The kernel drops it if the holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from imgprep.errors import VmBusy


def lock_key(backend: str, vm_uuid: str) -> str:
    return f"{backend}-{vm_uuid}"


def _lock_path(state_dir: Path, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)
    return state_dir / "locks" / f"{safe}.lock"


class VmLock:
    """Exclusive, non-blocking lock on one VM for the life of a job."""

    def __init__(self, state_dir: Path, key: str) -> None:
        self.path = _lock_path(state_dir, key)
        self.key = key
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VmBusy(f"VM {self.key} is locked by another running imgprep job") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> VmLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(state_dir: Path, key: str) -> bool:
    """True while a live process holds the VM's lock."""
    path = _lock_path(state_dir, key)
    if not path.exists():
        return False
    with contextlib.ExitStack() as stack:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        stack.callback(os.close, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def locked(state_dir: Path, key: str) -> Iterator[VmLock]:
    lock = VmLock(state_dir, key)
    with lock:
        yield lock
