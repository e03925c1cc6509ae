"""The API token ``imgprep serve`` uses when the config sets none.

On first start a random token (256 bits) is written to ``<state dir>/serve.token``,
created 0600 with ``O_EXCL|O_NOFOLLOW``; later starts read it back. A token file that
is not a regular file owned by the user running imgprep, or that others can read, is
refused: whoever reads it can drive every VM imgprep can reach.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from imgprep.errors import InvalidInput

TOKEN_FILE = "serve.token"  # noqa: S105 (a file name, not a secret)
MIN_LENGTH = 32


def token_path(state_dir: Path) -> Path:
    return state_dir / TOKEN_FILE


def load_or_create(state_dir: Path) -> tuple[str, bool]:
    """(token, whether it was generated now)."""
    path = token_path(state_dir)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return _read(path), False
    except OSError as exc:
        raise InvalidInput(f"API token {path}: cannot create it: {exc.strerror}") from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


def _read(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(f"API token {path}: cannot read it: {exc.strerror}") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise InvalidInput(f"API token {path}: not a regular file owned by uid {os.geteuid()}")
        if st.st_mode & 0o077:
            raise InvalidInput(f"API token {path}: readable or writable by others (mode {st.st_mode & 0o777:04o})")
        token = f.read(4096).strip()
    if len(token) < MIN_LENGTH:
        raise InvalidInput(f"API token {path}: shorter than {MIN_LENGTH} characters")
    return token
