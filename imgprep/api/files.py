"""Image files as the API serves them: confined to the image directory, with a Content-MD5.

File paths come from the job store, never from the URL; even so, a path is served only
if, symlinks resolved, it lies inside the image directory.

IMGAPI's GetImageFile sends ``Content-MD5`` and its node client fails the download when
the header does not match the body, so the server needs the MD5 of every file it
serves. The export computes sha1/sha256, not MD5: the server computes it once per file
(right after a job succeeds, or on the first download after a restart) and caches it
in memory, keyed by path, size and mtime.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)
CHUNK = 4 * 1024 * 1024


def confined(image_dir: Path, file_path: str | None) -> Path | None:
    """The resolved file if it is a regular file inside ``image_dir``, else None."""
    if not file_path:
        return None
    root = image_dir.resolve()
    try:
        path = Path(file_path).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not path.is_relative_to(root) or path == root or not path.is_file():
        log.warning("refusing to serve %s: not a file inside the image directory %s", file_path, root)
        return None
    return path


def _md5_base64(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


class ContentMd5Cache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, int, int], str] = {}
        self._computing: dict[str, threading.Lock] = {}

    def get(self, path: Path) -> str:
        """Base64 MD5 of the file, as the Content-MD5 header carries it."""
        with self._lock:
            path_lock = self._computing.setdefault(str(path), threading.Lock())
        with path_lock:  # one computation per file, even with concurrent downloads
            st = os.stat(path)
            key = (str(path), st.st_size, st.st_mtime_ns)
            with self._lock:
                cached = self._values.get(key)
            if cached is not None:
                return cached
            value = _md5_base64(path)
            with self._lock:
                self._values = {k: v for k, v in self._values.items() if k[0] != key[0]}
                self._values[key] = value
            return value

    def forget(self, path: Path) -> None:
        with self._lock:
            self._values = {k: v for k, v in self._values.items() if k[0] != str(path)}
            self._computing.pop(str(path), None)
