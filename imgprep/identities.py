"""Every per-machine identity the cleanup resets, in one list (docs/cleanup-operations.md
says why each one matters and how it comes back).

The list serves both ends of the verification (docs/verification.md): during the
inject step the host hashes each identity file of the prototype (sha256 only: no key
material is ever copied into the job record), and the verification boot's unit hashes
the same paths in the first boot of the exported image; the host then checks that each
one present is new. A pattern may hold a ``*`` in its last component (a glob).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

log = logging.getLogger(__name__)

MAX_FILE = 1024 * 1024  # bytes: a larger "identity file" is not one; not hashed
MAX_MATCHES = 64  # files hashed per pattern (a hostile guest could plant thousands)
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class Identity:
    name: str  # as the cleanup operation calls it (docs/cleanup-operations.md)
    patterns: tuple[str, ...]  # absolute guest paths; ``*`` only in the last component


IDENTITIES: tuple[Identity, ...] = (
    Identity("machine-id", ("/etc/machine-id",)),
    Identity("dbus-machine-id", ("/var/lib/dbus/machine-id",)),
    Identity("ssh-host-keys", ("/etc/ssh/ssh_host_*",)),
    Identity("random-seed", ("/var/lib/systemd/random-seed", "/var/lib/urandom/random-seed")),
    Identity("systemd-credential-secret", ("/var/lib/systemd/credential.secret",)),
    Identity("iscsi-initiatorname", ("/etc/iscsi/initiatorname.iscsi",)),
    Identity("nvme-hostnqn", ("/etc/nvme/hostnqn",)),
    Identity("nvme-hostid", ("/etc/nvme/hostid",)),
    Identity(
        "tls-self-signed",
        (
            "/etc/ssl/private/ssl-cert-snakeoil.key",
            "/etc/ssl/certs/ssl-cert-snakeoil.pem",
            "/etc/pki/tls/certs/localhost.crt",
            "/etc/pki/tls/private/localhost.key",
            "/etc/pki/dovecot/certs/dovecot.pem",
            "/etc/pki/dovecot/private/dovecot.pem",
            "/etc/cockpit/ws-certs.d/0-self-signed.cert",
            "/etc/cockpit/ws-certs.d/0-self-signed.key",
        ),
    ),
    Identity(
        "salt-minion", ("/etc/salt/minion_id", "/etc/salt/pki/minion/minion.pem", "/etc/salt/pki/minion/minion.pub")
    ),
    Identity("puppet-ssl", ("/etc/puppetlabs/puppet/ssl/*", "/var/lib/puppet/ssl/*")),
    Identity("chef-client", ("/etc/chef/client.pem",)),
    Identity(
        "subscription-manager",
        ("/etc/pki/consumer/cert.pem", "/etc/pki/consumer/key.pem", "/etc/pki/entitlement/*.pem"),
    ),
    Identity("rhn-systemid", ("/etc/sysconfig/rhn/systemid",)),
    Identity("hostid", ("/etc/hostid",)),
    Identity("networkmanager-secret-key", ("/var/lib/NetworkManager/secret_key",)),
)
NAMES = frozenset(i.name for i in IDENTITIES)

# Contents that are the same on every machine by design, not an identity: the
# "regenerate me" placeholders the cleanup writes (and packages ship).
PLACEHOLDERS = frozenset(
    hashlib.sha256(text).hexdigest() for text in (b"", b"uninitialized\n", b"GenerateName=yes\n", b"GenerateName=yes")
)


def render_list() -> str:
    """The list for the verification unit: ``name pattern`` lines."""
    return "".join(f"{i.name} {p}\n" for i in IDENTITIES for p in i.patterns)


def pattern_of(name: str, path: str) -> str | None:
    """The pattern of identity ``name`` that ``path`` matches, if any (guest paths are checked)."""
    for identity in IDENTITIES:
        if identity.name == name:
            for pattern in identity.patterns:
                if path.rsplit("/", 1)[0] == pattern.rsplit("/", 1)[0] and fnmatchcase(path, pattern):
                    return pattern
    return None


def hash_guest(g: Any) -> dict[str, list[str]]:
    """sha256 of every identity file present in a mounted guest (a libguestfs handle):
    ``{name: [sha256, ...]}`` (sorted, without the placeholders). Only regular files
    (``is_file`` does not follow symlinks) of at most ``MAX_FILE`` bytes."""
    found: dict[str, list[str]] = {}
    for identity in IDENTITIES:
        hashes: set[str] = set()
        for pattern in identity.patterns:
            paths = list(g.glob_expand(pattern))[:MAX_MATCHES] if "*" in pattern else [pattern]
            for path in paths:
                try:
                    if not g.is_file(path) or int(g.filesize(path)) > MAX_FILE:
                        continue
                    digest = hashlib.sha256(bytes(g.read_file(path))).hexdigest()
                except RuntimeError as exc:  # e.g. a path component that is not a directory
                    log.debug("identity %s: %s: %s", identity.name, path, exc)
                    continue
                if digest not in PLACEHOLDERS:
                    hashes.add(digest)
        if hashes:
            found[identity.name] = sorted(hashes)
    return found


def reused(prototype: Mapping[str, Sequence[str]], verified: Mapping[str, Sequence[tuple[str, str]]]) -> list[str]:
    """The identities of the verified boot that equal the prototype's: ``name (path)``.

    ``prototype``: :func:`hash_guest` of the prototype; ``verified``: ``{name: [(sha256,
    path), ...]}`` as the verification report gives them."""
    same: list[str] = []
    for name in sorted(verified):
        old = set(prototype.get(name, ()))
        for digest, path in verified[name]:
            if digest in old and digest not in PLACEHOLDERS:
                same.append(f"{name} ({path})")
    return same
