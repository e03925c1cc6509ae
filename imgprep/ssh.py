"""SSH to a compute node (paramiko): the remote half of "one way to run a command".

* Remote commands are argument lists. ``shlex.join`` quotes every argument for the
  remote login shell, which parses the line back into exactly that argument list;
  nothing is ever built from unquoted input. Failures raise the same
  :class:`~imgprep.errors.CommandError` as the local :func:`imgprep.run.run`.
* Host keys are verified against a known_hosts file before anything else happens.
  An unknown key is refused unless ``accept_new_host_key`` is set, in which case it
  is saved (and only an unknown one: a *changed* key is always refused, whatever the
  options). Both refusals are :class:`HostKeyRefused` (an ``InvalidInput``: nothing
  was touched).
* The OpenSSH client configuration (``~/.ssh/config``, or a host's ``ssh_config``)
  is honoured: ``Host`` aliases, ``HostName``, ``User``, ``Port``, ``IdentityFile``,
  ``CertificateFile`` (and ``<key>-cert.pub``), ``UserKnownHostsFile`` and
  ``ProxyJump`` through a headnode (:mod:`imgprep.ssh_config` plans the route; each
  jump is a ``direct-tcpip`` channel of the previous hop, and every hop's host key is
  verified as above).
* A dropped connection, a channel that cannot be opened, a command that ends
  without an exit status (the transport died under it) are :class:`TransientError`:
  the client forgets the connection, the workflow engine retries the step, and the
  next command reconnects. A command's own failure is never retried.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import re
import shlex
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import paramiko

from imgprep.config import SmartosHost
from imgprep.errors import Cancelled, CommandError, InvalidInput, TransientError
from imgprep.ssh_config import Endpoint, Hop, plan_route

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
KEEPALIVE_SECONDS = 15
COMMAND_TIMEOUT = 600.0  # one remote command (not a stream); vmadm stop may take minutes
STREAM_IDLE_TIMEOUT = 300.0  # no byte of a stream for this long = a dead connection
CHUNK = 1024 * 1024

_TARGET_RE = re.compile(r"^(?:(?P<user>[^@\s:]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@\s:\[\]]+)(?::(?P<port>\d{1,5}))?$")


class HostKeyRefused(InvalidInput):
    """The node's host key is unknown (and not accepted) or has changed."""

    code = "HostKeyRefused"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint: what ``ssh-keygen -lf`` prints."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclasses.dataclass(frozen=True)
class SshTarget(SmartosHost, Endpoint):
    """Where and how to connect (a config host entry, or parsed from ``[user@]host[:port]``).
    ``known_hosts`` None = ``~/.ssh/known_hosts``."""

    @classmethod
    def parse(cls, text: str) -> SshTarget:
        """``[user@]host[:port]``; an IPv6 address goes in brackets: ``root@[::1]:2222``."""
        match = _TARGET_RE.match(text.strip())
        if match is None:
            raise InvalidInput(f"host {text!r}: expected [USER@]HOST[:PORT]")
        port = int(match.group("port") or 22)
        if not 0 < port < 65536:
            raise InvalidInput(f"host {text!r}: port {port} out of range")
        return cls(host=match.group("host").strip("[]"), user=match.group("user") or "root", port=port)

    @classmethod
    def resolve(cls, text: str, hosts: Mapping[str, SmartosHost] | None = None) -> SshTarget:
        """A host named in the config (``hosts:``), else ``[user@]host[:port]``."""
        entry = (hosts or {}).get(text)
        if entry is not None:
            return cls(**dataclasses.asdict(entry))
        return cls.parse(text)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def route(self) -> list[Hop]:
        """The hops to connect through (``ProxyJump`` from the SSH config), this target last."""
        return plan_route(
            self.host,
            user=self.user,
            port=self.port,
            key_file=self.key_file,
            known_hosts=self.known_hosts,
            ssh_config=self.ssh_config,
        )


class _UnknownKey(Exception):
    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__("unknown host key")
        self.key = key


class _RefuseUnknown(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownKey(key)


class _AcceptAndSaveUnknown(paramiko.MissingHostKeyPolicy):
    """Accept a key the known_hosts file has *no* entry for, and append it there.

    paramiko calls a policy only for hosts without any known key; a changed key
    raises BadHostKeyException before, so this never overrides a known key.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line)
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("accepted and saved the new host key of %s (%s) in %s", hostname, fingerprint(key), self.path)


def _certified_key(hop: Hop) -> paramiko.PKey | None:
    """The first key file with its ``CertificateFile`` loaded (paramiko finds a
    ``<key>-cert.pub`` next to a key by itself; an explicit CertificateFile needs this)."""
    if hop.certificate_file is None or not hop.key_files:
        return None
    try:
        key = paramiko.PKey.from_path(hop.key_files[0])
        key.load_certificate(hop.certificate_file)
    except (OSError, ValueError, paramiko.SSHException) as exc:
        raise InvalidInput(
            f"{hop}: key {hop.key_files[0]} with certificate {hop.certificate_file}: {exc}", code="SshAuthFailed"
        ) from None
    return key


class SshClient:
    """One connection to a node, reopened on demand after a transient failure."""

    def __init__(self, target: SshTarget, *, accept_new_host_key: bool = False) -> None:
        self.target = target
        self.accept_new_host_key = accept_new_host_key or target.accept_new_host_key
        self._client: paramiko.SSHClient | None = None
        self._jumps: list[paramiko.SSHClient] = []  # the ProxyJump hosts' connections, in order
        self._lock = threading.Lock()

    # --- connection -----------------------------------------------------------------

    def connect(self) -> paramiko.Transport:
        """The live transport, connecting (and verifying the host key) if needed."""
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return transport
                self._drop()
            self._client = self._open()
            transport = self._client.get_transport()
            assert transport is not None
            return transport

    def jump_transport(self) -> paramiko.Transport | None:
        """The connected transport of the last ``ProxyJump`` host (None for a direct route):
        what a second connection to the node (QEMU's, for an HVM disk) tunnels through."""
        self.connect()
        with self._lock:
            return self._jumps[-1].get_transport() if self._jumps else None

    def _open(self) -> paramiko.SSHClient:
        """Connect through every hop of the route (``ProxyJump``), verifying each host key."""
        route = self.target.route()
        jumps: list[paramiko.SSHClient] = []
        sock: socket.socket | paramiko.Channel | None = None
        try:
            for index, hop in enumerate(route):
                if index > 0:
                    sock = self._tunnel(jumps[-1], hop, route[index - 1])
                jumps.append(self._open_hop(hop, sock, via=route[index - 1] if index else None))
        except BaseException:
            for client in reversed(jumps):
                client.close()
            raise
        self._jumps = jumps[:-1]
        return jumps[-1]

    @staticmethod
    def _tunnel(jump: paramiko.SSHClient, hop: Hop, via: Hop) -> paramiko.Channel:
        """A ``direct-tcpip`` channel from the jump host to the next hop (what ``ssh -J`` opens)."""
        transport = jump.get_transport()
        assert transport is not None
        try:
            return transport.open_channel(
                "direct-tcpip", (hop.host, hop.port), ("127.0.0.1", 0), timeout=CONNECT_TIMEOUT
            )
        except (paramiko.ChannelException, paramiko.SSHException, OSError, EOFError) as exc:
            raise TransientError(f"ssh {hop} via {via}: the jump host cannot connect: {exc}") from None

    def _open_hop(self, hop: Hop, sock: socket.socket | paramiko.Channel | None, via: Hop | None) -> paramiko.SSHClient:
        where = f"{hop}" if via is None else f"{hop} (via {via})"
        client = paramiko.SSHClient()
        known = hop.known_hosts_path
        if known.exists():
            try:
                client.load_host_keys(str(known))
            except (OSError, paramiko.SSHException) as exc:
                raise InvalidInput(f"known_hosts file {known}: cannot read: {exc}", code="HostKeyRefused") from None
        client.set_missing_host_key_policy(
            _AcceptAndSaveUnknown(known) if self.accept_new_host_key else _RefuseUnknown()
        )
        log.debug("ssh: connecting to %s", where)
        if sock is None:
            try:
                sock = socket.create_connection((hop.host, hop.port), timeout=CONNECT_TIMEOUT)
                # Small request/response exchanges: without this, Nagle and delayed ACKs
                # add tens of milliseconds to every command (OpenSSH sets it too).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                client.close()
                raise TransientError(f"ssh {where}: cannot connect: {exc}") from None
        try:
            client.connect(
                hop.host,
                sock=sock,
                port=hop.port,
                username=hop.user,
                pkey=_certified_key(hop),
                key_filename=list(hop.key_files) or None,  # type: ignore[arg-type]  # paramiko takes a list too
                look_for_keys=not hop.key_files,
                allow_agent=True,
                timeout=CONNECT_TIMEOUT,
                banner_timeout=CONNECT_TIMEOUT,
                auth_timeout=CONNECT_TIMEOUT,
                channel_timeout=CONNECT_TIMEOUT,
            )
        except _UnknownKey as exc:
            client.close()
            raise HostKeyRefused(
                f"{where}: unknown host key {exc.key.get_name()} {fingerprint(exc.key)} "
                f"(not in {known}); verify it, then add it to known_hosts or rerun with --accept-new-host-key",
                code="HostKeyUnknown",
            ) from None
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyRefused(
                f"{where}: HOST KEY CHANGED: the node offered {exc.key.get_name()} {fingerprint(exc.key)}, "
                f"{known} expects {exc.expected_key.get_name()} {fingerprint(exc.expected_key)}; refusing to "
                f"connect (a changed key is never accepted automatically: remove the old entry if the node "
                f"was really reinstalled)",
                code="HostKeyChanged",
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            keys = ", ".join(hop.key_files) or "default keys and ssh-agent"
            raise InvalidInput(
                f"{where}: authentication failed ({exc}); key files: {keys}",
                code="SshAuthFailed",
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            client.close()
            sock.close()
            raise TransientError(f"ssh {where}: cannot connect: {exc or type(exc).__name__}") from None
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE_SECONDS)
        return client

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        for jump in reversed(self._jumps):
            jump.close()
        self._jumps = []

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _transient(self, argv: Sequence[str], exc: BaseException | str) -> TransientError:
        self.close()
        detail = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
        return TransientError(f"ssh {self.target}: {shlex.join(argv)}: {detail}")

    def _open_channel(self, argv: Sequence[str], timeout: float) -> paramiko.Channel:
        transport = self.connect()
        command = shlex.join(argv)
        log.debug("ssh %s: %s", self.target, command)
        try:
            channel = transport.open_session(timeout=CONNECT_TIMEOUT)
            channel.settimeout(timeout)
            channel.exec_command(command)
        except (paramiko.ChannelException, paramiko.SSHException, OSError, EOFError) as exc:
            raise self._transient(argv, exc) from None
        return channel

    # --- commands ---------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        check: bool = True,
        allowed: Sequence[int] = (0,),
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the node; its stdin gets ``input`` (else EOF at once)."""
        out = bytearray()
        status, err = self._execute(argv, out.extend, input=input, timeout=timeout)
        stdout = out.decode(errors="replace")
        if check and status not in allowed:
            raise CommandError(list(argv), status, stdout, err)
        return subprocess.CompletedProcess(list(argv), status, stdout, err)

    def run_stream(
        self,
        argv: Sequence[str],
        sink: Callable[[bytes], None],
        *,
        idle_timeout: float = STREAM_IDLE_TIMEOUT,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> int:
        """Run ``argv`` and hand its stdout to ``sink`` chunk by chunk; return the byte count.

        A stream cut short (connection dropped, no exit status) is a TransientError:
        the caller must discard what ``sink`` got and start again.
        """
        count = [0]

        def counting(data: bytes) -> None:
            count[0] += len(data)
            sink(data)

        status, err = self._execute(argv, counting, timeout=idle_timeout, cancelled=cancelled)
        if status != 0:
            raise CommandError(list(argv), status, "", err)
        return count[0]

    def _execute(
        self,
        argv: Sequence[str],
        sink: Callable[[bytes], None],
        *,
        input: bytes | None = None,
        timeout: float,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> tuple[int, str]:
        """(exit status, stderr); stdout goes to ``sink``. Drains stderr as it comes, so a
        chatty stderr cannot fill the channel window and stall stdout."""
        channel = self._open_channel(argv, timeout)
        err = bytearray()
        received = 0
        try:
            if input:
                channel.sendall(input)
            channel.shutdown_write()
            while True:
                if cancelled():
                    raise Cancelled(f"ssh {self.target}: {shlex.join(argv)}: canceled")
                data = channel.recv(CHUNK)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(CHUNK)
                if not data:
                    break
                received += len(data)
                sink(data)
            while data := channel.recv_stderr(CHUNK):
                err += data
            # set by the exit-status message, or by the channel closing without one
            channel.status_event.wait(CONNECT_TIMEOUT)
            status = channel.exit_status if channel.status_event.is_set() else -1
        except (TimeoutError, paramiko.SSHException, OSError, EOFError) as exc:
            raise self._transient(argv, exc) from None
        finally:
            channel.close()
        if status == -1:
            raise self._transient(argv, f"the connection ended after {received} bytes of output, before an exit status")
        return status, err.decode(errors="replace")
