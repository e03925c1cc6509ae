"""The compute-node simulator's SSH server: paramiko's server mode on 127.0.0.1.

A real SSH server (key exchange, host key, public-key authentication, one exec channel
per command, and an SFTP subsystem serving the simulated zvols' device nodes, which
QEMU's ``ssh`` block driver opens): imgprep's client cannot tell it from sshd. Each exec request's command
line is split with ``shlex`` (as the node's shell would parse it) and run by
:class:`tests.simulator.node.ComputeNode`. The host key can be swapped
(:meth:`SshSimulator.set_host_key`) to play a reinstalled or impostor node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import threading
import traceback
from pathlib import Path

import paramiko
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

from tests.simulator.node import ComputeNode, Dropped


class _ZvolHandle(paramiko.SFTPHandle):
    """An open simulated zvol: reads and writes at offsets of its backing file."""

    def __init__(self, path: Path, writable: bool) -> None:
        super().__init__()
        self.path = path
        f = path.open("r+b" if writable else "rb")
        self.readfile = f
        if writable:
            self.writefile = f

    def stat(self) -> paramiko.SFTPAttributes | int:
        return paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))


class _ZvolSftp(paramiko.SFTPServerInterface):
    """The node's SFTP subsystem, as far as QEMU's ``ssh`` block driver uses it: open, stat
    and read/write of a zvol's device node (``/dev/zvol/rdsk/<dataset>``, ``/dev/zvol/dsk/...``);
    every other path does not exist."""

    def __init__(self, server: paramiko.ServerInterface, sim: SshSimulator) -> None:
        super().__init__(server)
        self.sim = sim

    def open(self, path: str, flags: int, attr: paramiko.SFTPAttributes) -> paramiko.SFTPHandle | int:
        device = self.sim.node.zvol_device(path)
        if device is None:
            return paramiko.sftp.SFTP_NO_SUCH_FILE
        self.sim.sftp_opens.append(path)
        return _ZvolHandle(device, bool(flags & (os.O_WRONLY | os.O_RDWR)))

    def stat(self, path: str) -> paramiko.SFTPAttributes | int:
        device = self.sim.node.zvol_device(path)
        if device is None:
            return paramiko.sftp.SFTP_NO_SUCH_FILE
        return paramiko.SFTPAttributes.from_stat(device.stat())

    lstat = stat


log = logging.getLogger(__name__)


class _Interface(paramiko.ServerInterface):
    def __init__(self, sim: SshSimulator) -> None:
        self.sim = sim

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username == self.sim.user and any(key == k for k in self.sim.authorized_keys):
            return AUTH_SUCCESSFUL
        return AUTH_FAILED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=self.sim.handle, args=(channel, command), daemon=True).start()
        return True


class SshSimulator:
    """A loopback SSH server in front of a :class:`ComputeNode`."""

    def __init__(self, node: ComputeNode, host_key: paramiko.PKey, authorized_keys: list[paramiko.PKey]) -> None:
        self.node = node
        self.host_key = host_key
        self.authorized_keys = authorized_keys
        self.user = "root"
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port: int = self._sock.getsockname()[1]
        self._transports: list[paramiko.Transport] = []
        self.sftp_opens: list[str] = []  # the device paths opened over SFTP
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def set_host_key(self, key: paramiko.PKey) -> None:
        """New connections see this host key (a reinstalled node, or an impostor)."""
        self.host_key = key

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _ZvolSftp, self)
            self._transports.append(transport)
            try:
                transport.start_server(server=_Interface(self))
            except (paramiko.SSHException, EOFError, OSError) as exc:
                log.debug("simulator: handshake failed: %s", exc)
                transport.close()

    def handle(self, channel: paramiko.Channel, command: bytes) -> None:
        transport = channel.get_transport()

        # Read stdin to its EOF before answering. imgprep's client sends EOF right after
        # its exec request succeeded, so this also keeps our answer (exit status, close)
        # from overtaking paramiko's reply to the exec request, which the client would
        # see as "Channel closed" (sshd has no such race: it answers before running).
        data = bytearray()
        while chunk := channel.recv(65536):
            data += chunk

        def stdin() -> bytes:
            return bytes(data)

        def drop() -> None:
            if transport is not None:
                transport.close()

        try:
            argv = shlex.split(command.decode())
            code = self.node.execute(argv, stdin, channel.sendall, channel.sendall_stderr, drop)
        except Dropped:
            return
        except Exception:  # a simulator bug: show it to the client, do not hang it
            with contextlib.suppress(Exception):
                channel.sendall_stderr(traceback.format_exc().encode())
            code = 70
        with contextlib.suppress(Exception):
            channel.send_exit_status(code)
            channel.shutdown_write()
            channel.close()

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        with contextlib.suppress(OSError):
            self._sock.close()
        for transport in self._transports:
            transport.close()
        self._thread.join(5)


def write_known_hosts(path: Path, port: int, key: paramiko.PKey) -> None:
    path.write_text(f"[127.0.0.1]:{port} {key.get_name()} {key.get_base64()}\n")
