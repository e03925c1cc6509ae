"""The state directory holds job records (hypervisor URIs, SSH targets, paths) that
imgprep acts on as root: only its owner may be able to change it.

``secure`` creates it 0700, or checks an existing one: it must be a directory owned
by the effective user and writable by no one else (refused with a one-line error
otherwise); read and execute bits for others are removed, and imgprep's own files
in it are made 0600 whoever created them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from imgprep.errors import InvalidInput

DIR_MODE = 0o700
FILE_MODE = 0o600
UMASK = 0o077  # everything imgprep creates is private unless it says otherwise


def secure(path: Path, files: Iterable[str] = ()) -> None:
    """Make ``path`` a private state directory, or raise ``InvalidInput`` saying why it is not one."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        st = path.stat()
    except OSError as exc:
        raise InvalidInput(f"state directory {path}: cannot use it: {exc.strerror}") from None
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"state directory {path} is not a directory")
    if st.st_uid != uid:
        raise InvalidInput(f"state directory {path} is owned by uid {st.st_uid}, not by uid {uid} (who runs imgprep)")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InvalidInput(
            f"state directory {path} is writable by its group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"make it {DIR_MODE:04o}"
        )
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    for name in files:
        _secure_file(path / name, uid)


def _secure_file(path: Path, uid: int) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
        raise InvalidInput(f"{path} is not a regular file owned by uid {uid}: refusing to use it")
    if stat.S_IMODE(st.st_mode) != FILE_MODE:
        with contextlib.suppress(FileNotFoundError):  # -wal/-shm come and go
            os.chmod(path, FILE_MODE, follow_symlinks=False)
