"""OpenSSH client configuration (``~/.ssh/config``) for imgprep's SSH connections.

Triton operators reach compute nodes through the headnode, with keys and certificates
named in their ``~/.ssh/config``. :func:`plan_route` turns one target into the hops to
connect through, each with its address, user, keys and known_hosts file, as OpenSSH's
``ssh`` would for the same name:

* ``Host`` patterns and ``Match`` as paramiko's :class:`paramiko.SSHConfig` reads them
  (the first value obtained wins, as in ssh_config(5)); ``HostName``, ``User``,
  ``Port``, ``IdentityFile`` (every one, in order), ``CertificateFile``,
  ``UserKnownHostsFile`` (the first), ``ProxyJump`` (``[user@]host[:port]`` or a
  ``Host`` alias, comma-separated for several jumps; ``none`` = direct).
* What imgprep itself was given wins over the file, as ssh's command line does: a
  ``hosts:`` entry's ``key_file``/``known_hosts``, and a ``user``/``port`` that is not
  the default (``root``/22); a default value is taken from the file when it has one.
* Each jump host's settings come from its own ``Host`` block; a jump host's own
  ``ProxyJump`` is not followed (the chain is the target's ``ProxyJump`` list).
* ``ProxyCommand`` is refused (a command line built from the config is outside
  imgprep's "argument lists only" rule); ``ProxyJump`` covers the headnode case.

The file is read at connect time, so ``jobs recover`` uses the configuration of then.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import paramiko

from imgprep.errors import InvalidInput

DEFAULT_SSH_CONFIG = "~/.ssh/config"
DEFAULT_USER = "root"
DEFAULT_PORT = 22
MAX_JUMPS = 8

_HOP_RE = re.compile(r"^(?:(?P<user>[^@\s:]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@\s:\[\],]+)(?::(?P<port>\d{1,5}))?$")


class Endpoint:
    """What an SSH endpoint (a route's hop, a configured target) says of itself: the
    known_hosts file and name its host key is checked against, and ``user@host:port``."""

    host: str
    port: int
    user: str
    known_hosts: str | None

    @property
    def known_hosts_path(self) -> Path:
        return Path(self.known_hosts or "~/.ssh/known_hosts").expanduser()

    @property
    def host_key_name(self) -> str:
        """The name known_hosts uses: ``host`` on port 22, ``[host]:port`` otherwise."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Hop(Endpoint):
    """One SSH connection of a route: where to connect, as whom, with which keys, and
    which known_hosts file must hold its host key."""

    name: str  # what the user wrote (an alias or an address), for messages
    host: str  # the address (HostName)
    port: int
    user: str
    key_files: tuple[str, ...] = ()  # () = ssh-agent and paramiko's default ~/.ssh/id_*
    certificate_file: str | None = None  # for the first key file (CertificateFile)
    known_hosts: str | None = None  # None = ~/.ssh/known_hosts


def load(path: str | None) -> paramiko.SSHConfig | None:
    """The parsed file; None for ``none``, or for the default path when it does not exist.
    A file named explicitly that cannot be read is bad input."""
    if path is not None and path.strip().lower() == "none":
        return None
    given = path is not None
    resolved = Path(path or DEFAULT_SSH_CONFIG).expanduser()
    if not resolved.exists():
        if given:
            raise InvalidInput(f"ssh_config {path}: no such file", code="SshConfigInvalid")
        return None
    try:
        return paramiko.SSHConfig.from_path(str(resolved))
    except (OSError, UnicodeDecodeError, paramiko.SSHException, ValueError) as exc:
        raise InvalidInput(f"ssh_config {resolved}: cannot read: {exc}", code="SshConfigInvalid") from None


def _port(value: object, where: str) -> int:
    try:
        port = int(str(value))
    except ValueError:
        raise InvalidInput(f"{where}: port {value!r} is not a number", code="SshConfigInvalid") from None
    if not 0 < port < 65536:
        raise InvalidInput(f"{where}: port {port} out of range", code="SshConfigInvalid")
    return port


def _expand(path: str) -> str:
    return os.path.expanduser(path)


def _hop(
    config: paramiko.SSHConfig | None,
    name: str,
    *,
    user: str | None,
    port: int | None,
    key_file: str | None = None,
    known_hosts: str | None = None,
) -> tuple[Hop, str | None]:
    """The hop for ``name`` and its ProxyJump value (if any). ``user``/``port`` None = from
    the file, else the default; ``key_file``/``known_hosts`` given = they win."""
    entry = config.lookup(name) if config is not None else {}
    if "proxycommand" in entry and str(entry["proxycommand"]).strip().lower() != "none":
        raise InvalidInput(
            f"ssh_config: host {name}: ProxyCommand is not supported; use ProxyJump (e.g. ProxyJump headnode)",
            code="SshConfigInvalid",
        )
    host = str(entry.get("hostname") or name)
    resolved_port = port if port is not None else _port(entry.get("port", DEFAULT_PORT), f"ssh_config: host {name}")
    identities = [key_file] if key_file else [str(p) for p in entry.get("identityfile", [])]
    certificate = entry.get("certificatefile")
    known = known_hosts
    if known is None and entry.get("userknownhostsfile"):
        known = str(entry["userknownhostsfile"]).split()[0]
    hop = Hop(
        name=name,
        host=host.strip("[]"),
        port=resolved_port,
        user=user or str(entry.get("user") or DEFAULT_USER),
        key_files=tuple(_expand(p) for p in identities),
        certificate_file=_expand(str(certificate)) if certificate and not key_file else None,
        known_hosts=_expand(known) if known else None,
    )
    jump = entry.get("proxyjump")
    return hop, (str(jump) if jump is not None else None)


def plan_route(
    host: str,
    *,
    user: str = DEFAULT_USER,
    port: int = DEFAULT_PORT,
    key_file: str | None = None,
    known_hosts: str | None = None,
    ssh_config: str | None = None,
) -> list[Hop]:
    """The hops to connect through, the target last (a single hop without ProxyJump)."""
    config = load(ssh_config)
    target, jump = _hop(
        config,
        host,
        user=None if user == DEFAULT_USER else user,
        port=None if port == DEFAULT_PORT else port,
        key_file=key_file,
        known_hosts=known_hosts,
    )
    if jump is None or jump.strip().lower() == "none":
        return [target]
    hops: list[Hop] = []
    for item in jump.split(","):
        match = _HOP_RE.match(item.strip())
        if match is None:
            raise InvalidInput(
                f"ssh_config: host {host}: ProxyJump {item!r}: expected [USER@]HOST[:PORT]", code="SshConfigInvalid"
            )
        given_port = match.group("port")
        hop, _ = _hop(
            config,
            match.group("host").strip("[]"),
            user=match.group("user"),
            port=_port(given_port, f"ProxyJump {item}") if given_port else None,
            # a jump host is checked against the same known_hosts file as the target
            known_hosts=known_hosts,
        )
        hops.append(hop)
    if len(hops) > MAX_JUMPS:
        raise InvalidInput(f"ssh_config: host {host}: more than {MAX_JUMPS} ProxyJump hosts", code="SshConfigInvalid")
    return [*hops, target]
