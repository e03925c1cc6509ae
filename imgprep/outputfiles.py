"""Files imgprep writes into the output directory, safe against other local users.

Every file is created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600 inside a
private directory (``mkdtemp``: 0700, unpredictable name) next to its final
place, and renamed into place only when complete (``rename`` replaces a planted
name, it never follows it). The output directory itself must not be writable by
others: a group- or other-writable directory (even with the sticky bit, as /tmp)
is refused at validation, so nobody but its owner can plant or swap names in it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

PRIVATE = 0o600
PUBLISHED = 0o644  # images and manifests are meant to be read and served
WORKDIR_TAG = ".work-"


def output_dir_problem(path: Path) -> str | None:
    """Why ``path`` is not a safe output directory, or None."""
    try:
        st = path.stat()
    except OSError as exc:
        return f"output directory {path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"output directory {path} is not a directory"
    if st.st_uid not in (os.geteuid(), 0):
        return f"output directory {path} is owned by uid {st.st_uid}, not by root or uid {os.geteuid()}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"output directory {path} is writable by its group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "use a directory only its owner can write"
        )
    return None


def create_private(path: Path) -> int:
    """A new file at ``path``, mode 0600: never an existing file, never through a symlink."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE)


@contextlib.contextmanager
def workdir(output_dir: Path, image_uuid: str) -> Iterator[Path]:
    """A private directory in ``output_dir`` for one export; removed with what is left in it."""
    path = Path(tempfile.mkdtemp(prefix=f".{image_uuid}{WORKDIR_TAG}", dir=output_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(partial: Path, dest: Path) -> None:
    """Make the complete ``partial`` readable and rename it to ``dest`` (same filesystem)."""
    os.chmod(partial, PUBLISHED, follow_symlinks=False)
    os.rename(partial, dest)


def write_file(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically through a private temporary name."""
    with workdir(dest.parent, dest.name) as tmp:
        partial = tmp / dest.name
        with os.fdopen(create_private(partial), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(partial, dest)


def remove_workdirs(output_dir: Path, image_uuid: str) -> None:
    """Remove the job's leftover private directories (a crash mid-export)."""
    for leftover in output_dir.glob(f".{image_uuid}*{WORKDIR_TAG}*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
