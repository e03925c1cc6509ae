"""The host end of a guest's serial channel: a UNIX socket QEMU listens on.

A file-backed serial port goes through virtlogd (libvirt's default
``stdio_handler = "logd"``), which rotates the file at 2 MiB: a reader at a fixed
offset then never sees the guest's last messages, and the file costs host disk in
proportion to what the guest writes. A ``<serial type='unix'>`` with
``<source mode='bind'/>`` costs no disk and is never rotated; imgprep connects
right after the domain starts and a reader thread drains it in bounded reads into
the bounded parser (channel.py), so memory does not grow with what the guest
writes, and the guest gets back-pressure (its writes wait) if imgprep falls behind.

QEMU drops what the guest writes while no client is connected; the runner's first
message comes tens of seconds after boot, long after imgprep connects. After a
restart of imgprep, ``poll`` reconnects; messages written in between are lost (the
job then times out and is restored, it never succeeds by mistake).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import socket
import stat
import threading
from pathlib import Path

from imgprep.channel import ChannelParser, GuestStatus

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/run/imgprep/channels")  # short: a UNIX socket path has at most 107 bytes
READ_CHUNK = 64 * 1024  # bytes taken from the socket per read
STOP_CHECK = 0.5  # seconds a blocked read waits before looking at the stop flag
DRAIN_TIMEOUT = 5.0  # seconds to wait for the last bytes once the domain is off


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
    """The guest's channel socket, drained by a reader thread into a bounded parser.

    QEMU writes the emulated UART's bytes to the socket one at a time, and a UNIX
    socket holds only a few hundred such writes in flight: a reader that polled once
    a second would cap the guest at a few hundred bytes per second. The thread reads
    continuously (blocking reads of at most ``READ_CHUNK``) and feeds the parser
    under a lock; memory stays that of one read plus the parser's bounds.
    """

    def __init__(self, path: Path, parser: ChannelParser) -> None:
        self.path = path
        self.parser = parser
        self.bytes_read = 0
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> bool:
        """Connect (and start reading) if not yet; False while QEMU is not (yet, or any more) listening."""
        if self._sock is not None:
            return True
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return False
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EINVAL, f"{self.path} is not a socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            log.debug("guest channel %s: %s", self.path, exc)
            return False
        sock.settimeout(STOP_CHECK)
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._read, args=(sock,), name="guest-channel", daemon=True)
        self._thread.start()
        return True

    @property
    def reading(self) -> bool:
        """Is the reader thread still receiving (the connection not closed by QEMU)?"""
        return self._thread is not None and self._thread.is_alive()

    def _read(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data = sock.recv(READ_CHUNK)
            except TimeoutError:
                continue
            except OSError as exc:
                log.debug("guest channel %s: %s", self.path, exc)
                return
            if not data:  # QEMU closed the connection (the domain stopped)
                return
            with self._lock:
                self.parser.feed(data)
                self.bytes_read += len(data)

    def poll(self) -> GuestStatus:
        """Connect if needed (after a restart of imgprep); a snapshot of what the guest reported."""
        if self._sock is not None and not self.reading:
            self._close_socket()  # QEMU went away: reconnect if it listens again
        self.connect()
        with self._lock:
            status = self.parser.status
            return dataclasses.replace(status, seen_states=list(status.seen_states))

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Wait (bounded) for the reader to take what QEMU sent before it closed the socket."""
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_CHECK * 4)
            self._thread = None
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
