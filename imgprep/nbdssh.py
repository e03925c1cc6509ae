"""A remote block device (an HVM guest's zvol on a compute node) opened on the imgprep
host over SSH, for libguestfs: never mounted by the node, never mounted by this host.

    qemu-nbd --socket S 'json:{"driver": "raw", "file": {"driver": "ssh", ...}}'

QEMU's ``ssh`` block driver reads and writes the device over SFTP. Its host key is
pinned: imgprep has verified the node's key with paramiko (known_hosts, like every
other connection of the backend) and QEMU is given that key's SHA-256 (``host-key-check``
``mode=hash``), so a node whose key changed in between is refused by QEMU too.
QEMU (libssh) authenticates only through an ssh-agent: a private ``ssh-agent`` holds
the node's identity file for the time of the export, and QEMU runs with a private,
empty ``HOME`` (libssh reads no ``~/.ssh/config`` or known_hosts of the user's).

libguestfs then attaches ``nbd`` over the unix socket ``S``
(:func:`imgprep.libguestfs.open_guest`'s ``nbd_socket``): its appliance mounts the
guest filesystem inside its own VM.

Through ``ProxyJump`` hosts (the headnode), QEMU connects to a loopback port of this
host that imgprep forwards, connection by connection, as a ``direct-tcpip`` channel of
the last jump host's verified connection (what ``ssh -J`` does); the key QEMU pins is
still the node's own, end to end through the tunnel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko

from imgprep.errors import ImgprepError, MissingDependency
from imgprep.sanitize import clean

log = logging.getLogger(__name__)

QEMU_NBD = "qemu-nbd"
START_TIMEOUT = 60.0


def host_key_sha256_hex(key: paramiko.PKey) -> str:
    """What QEMU's ``host-key-check`` ``type=sha256`` compares: SHA-256 of the key blob, hex."""
    return hashlib.sha256(key.asbytes()).hexdigest()


def ssh_json(*, host: str, port: int, user: str, path: str, host_key: paramiko.PKey) -> str:
    """The ``json:`` pseudo-filename of the remote device (raw format on an ssh file)."""
    spec = {
        "driver": "raw",
        "file": {
            "driver": "ssh",
            "server": {"host": host, "port": str(port)},
            "user": user,
            "path": path,
            "host-key-check": {"mode": "hash", "type": "sha256", "hash": host_key_sha256_hex(host_key)},
        },
    }
    return "json:" + json.dumps(spec, sort_keys=True)


def _need(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise MissingDependency(
            f"{program} is needed to open an HVM guest's disk over SSH (Debian: qemu-utils, openssh-client)"
        )
    return found


def _reason(log_path: Path) -> str:
    """qemu-nbd's last message without the json: filename it quotes (``...': reason``)."""
    lines = log_path.read_text(errors="replace").strip().splitlines()
    last = lines[-1] if lines else ""
    return clean(last.rpartition("': ")[2] if "': " in last else last, limit=300)


@contextlib.contextmanager
def _agent(directory: Path, key_file: Path) -> Iterator[dict[str, str]]:
    """A private ssh-agent holding ``key_file``; yields the environment that reaches it."""
    sock = directory / "agent.sock"
    proc = subprocess.Popen(
        [_need("ssh-agent"), "-D", "-a", str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ImgprepError("ssh-agent did not start", code="SshAgentFailed")
            time.sleep(0.05)
        env = {"SSH_AUTH_SOCK": str(sock), "HOME": str(directory), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        added = subprocess.run(
            [_need("ssh-add"), "-q", str(key_file)],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if added.returncode != 0:
            raise ImgprepError(
                f"ssh-add {key_file}: {added.stderr.strip()[:300]} (a passphrase-protected key cannot be used here)",
                code="SshAuthFailed",
            )
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def open_remote_disk(
    *,
    host: str,
    port: int,
    user: str,
    key_file: Path,
    host_key: paramiko.PKey,
    path: str,
    via: paramiko.Transport | None = None,
    readonly: bool = False,
) -> Iterator[Path]:
    """Serve the remote device ``path`` on a local NBD unix socket (yielded) while the
    context lasts; writes reach the device when the context ends (qemu-nbd flushes
    when its one client disconnects, and exits). ``readonly``: a read-only export that
    serves several connections (libguestfs' overlay), ended when the context ends."""
    qemu_nbd = _need(QEMU_NBD)
    with contextlib.ExitStack() as stack:
        if via is not None:
            host, port = "127.0.0.1", stack.enter_context(_forward(via, host, port))
        yield stack.enter_context(
            _serve(
                qemu_nbd,
                host=host,
                port=port,
                user=user,
                key_file=key_file,
                host_key=host_key,
                path=path,
                readonly=readonly,
            )
        )


@contextlib.contextmanager
def _forward(via: paramiko.Transport, host: str, port: int) -> Iterator[int]:
    """A loopback port whose every connection is a direct-tcpip channel of ``via`` to host:port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def pipe(src: socket.socket | paramiko.Channel, dst: socket.socket | paramiko.Channel) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            dst.close()
            src.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                channel = via.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=15)
            except (paramiko.ChannelException, paramiko.SSHException, OSError, EOFError) as exc:
                log.warning("the jump host cannot connect to %s:%s: %s", host, port, exc)
                conn.close()
                continue
            threading.Thread(target=pipe, args=(conn, channel), daemon=True).start()
            threading.Thread(target=pipe, args=(channel, conn), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


@contextlib.contextmanager
def _serve(
    qemu_nbd: str,
    *,
    host: str,
    port: int,
    user: str,
    key_file: Path,
    host_key: paramiko.PKey,
    path: str,
    readonly: bool,
) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="imgprep-nbdssh-") as tmp:
        directory = Path(tmp)
        directory.chmod(0o700)
        with _agent(directory, key_file) as env:
            sock = directory / "nbd.sock"
            spec = ssh_json(host=host, port=port, user=user, path=path, host_key=host_key)
            log_path = directory / "qemu-nbd.log"
            # read-only: libguestfs puts an overlay on it, whose creation connects once
            # before the appliance does, so the server must outlive a client
            readonly_opts = ["--read-only", "--persistent"] if readonly else []
            with log_path.open("wb") as log_file:
                proc = subprocess.Popen(
                    [
                        qemu_nbd,
                        "--socket",
                        str(sock),
                        "--cache=writeback",
                        f"--pid-file={directory / 'qemu-nbd.pid'}",
                        *readonly_opts,
                        spec,
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            try:
                deadline = time.monotonic() + START_TIMEOUT
                # the socket is made before the device is opened: the pid file only after
                # (a refused host key ends qemu-nbd without one)
                while not (directory / "qemu-nbd.pid").exists():
                    if proc.poll() is not None:
                        raise ImgprepError(
                            f"cannot open {path} on {host} over SSH: {_reason(log_path) or 'qemu-nbd exited'}",
                            code="RemoteDiskFailed",
                        )
                    if time.monotonic() > deadline:
                        raise ImgprepError(
                            f"qemu-nbd did not open {path} in {START_TIMEOUT:.0f}s", code="RemoteDiskFailed"
                        )
                    time.sleep(0.1)
                yield sock
                if readonly:
                    return  # nothing to flush: the finally below ends the server
                # qemu-nbd exits after its one client disconnected (flushing the device)
                try:
                    rc = proc.wait(120)
                except subprocess.TimeoutExpired:
                    raise ImgprepError(f"qemu-nbd did not finish writing {path}", code="RemoteDiskFailed") from None
                if rc != 0:
                    raise ImgprepError(f"qemu-nbd failed writing {path}: {_reason(log_path)}", code="RemoteDiskFailed")
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
