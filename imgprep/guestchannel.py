"""The host end of a guest's serial channel: a UNIX socket QEMU listens on.

A file-backed serial port goes through virtlogd (libvirt's default
``stdio_handler = "logd"``), which rotates the file at 2 MiB: a reader at a fixed
offset then never sees the guest's last messages, and the file costs host disk in
proportion to what the guest writes. A ``<serial type='unix'>`` with
``<source mode='bind'/>`` costs no disk and is never rotated; imgprep connects
right after the domain starts and reads with bounded non-blocking reads, so the
guest gets back-pressure (its writes block) instead of the host growing a buffer.

QEMU drops what the guest writes while no client is connected; the runner's first
message comes tens of seconds after boot, long after imgprep connects. After a
restart of imgprep, ``poll`` reconnects; messages written in between are lost (the
job then times out and is restored, it never succeeds by mistake).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

from imgprep.channel import ChannelParser

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/run/imgprep/channels")  # short: a UNIX socket path has at most 107 bytes
READ_CHUNK = 64 * 1024
MAX_READ_PER_POLL = 4 * 1024 * 1024  # bytes taken from the guest per poll; the rest waits in the guest


def socket_path(job_uuid: str) -> Path:
    """Where QEMU listens for the job's prepare boot (created by libvirt on start)."""
    return SOCKET_DIR / f"{job_uuid}.sock"


def prepare_socket_dir() -> None:
    """Create ``SOCKET_DIR`` owned by us and private, or refuse one others could tamper with."""
    SOCKET_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = SOCKET_DIR.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"{SOCKET_DIR} is not a directory owned by uid {os.geteuid()}")
    if st.st_mode & 0o077:
        os.chmod(SOCKET_DIR, 0o700)


class SocketChannel:
    """Bounded, non-blocking reads from the guest's channel socket into a parser."""

    def __init__(self, path: Path, parser: ChannelParser, *, max_per_poll: int = MAX_READ_PER_POLL) -> None:
        self.path = path
        self.parser = parser
        self.max_per_poll = max_per_poll
        self.bytes_read = 0
        self._sock: socket.socket | None = None

    def connect(self) -> bool:
        """Connect if not connected; False while QEMU is not (yet, or any more) listening."""
        return self._connected() is not None

    def _connected(self) -> socket.socket | None:
        if self._sock is not None:
            return self._sock
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return None
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EINVAL, f"{self.path} is not a socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            log.debug("guest channel %s: %s", self.path, exc)
            return None
        sock.setblocking(False)
        self._sock = sock
        return sock

    def poll(self) -> int:
        """Read what is waiting (at most ``max_per_poll`` bytes) into the parser; bytes read."""
        sock = self._connected()
        if sock is None:
            return 0
        total = 0
        while total < self.max_per_poll:
            try:
                data = sock.recv(min(READ_CHUNK, self.max_per_poll - total))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("guest channel %s: %s", self.path, exc)
                self.close()
                break
            if not data:  # QEMU closed the connection (the domain stopped)
                self.close()
                break
            total += len(data)
            self.parser.feed(data)
        self.bytes_read += total
        return total

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
