"""operator_scripts/linux-prepare-image, run for real in a chroot of the Debian test guest.

The module copies the test guest's rootfs once, seeds it with something for every cleanup
operation plus control files that must survive, runs the script inside it with
``unshare --mount --pid --fork`` + ``chroot`` (nothing leaks to the host: proc and the
transient machine-id bind mount live in a private mount namespace), and compares a full
before/after inventory of the tree (type, mode, owner, size, mtime, content hash): every
difference must be one the operations explain. Scenarios: the guest's own /bin/sh
(dash), busybox ash with busybox applets first in PATH (an Alpine-like userland), a
second run, the cloud-init command path and a failing prepare.d hook.

Needs root-level capabilities (mount namespaces, chroot); the module probes for them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.capabilities import requires
from tests.guestimage import build

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "operator_scripts" / "linux-prepare-image"
DOC = REPO / "docs" / "cleanup-operations.md"

GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Test scaffolding lives under /run in the tree: a tmpfs in a real guest, not part of
# the image, excluded from the inventory and never touched by the script.
SCAFFOLD = "/run/imgprep-test"
HOOK_LOG = f"{SCAFFOLD}/hooks.log"
TRANSIENT_ID = f"{SCAFFOLD}/transient-machine-id"
EXCLUDED_TOP = frozenset({"proc", "sys", "dev", "run"})

PROTOTYPE_ID = "4f1c0b9e2d7a4c6b8e3f5a1d2c9b7e60"
TRANSIENT_MACHINE_ID = "0a1b2c3d4e5f60718293a4b5c6d7e8f9"
HOOK_DIR = "/etc/imgprep/prepare.d"
KEYGEN_UNIT = "/etc/systemd/system/ssh-hostkeys-firstboot.service"
KEYGEN_WANTS = "/etc/systemd/system/multi-user.target.wants/ssh-hostkeys-firstboot.service"
IDENTITY_UNIT = "/etc/systemd/system/host-identities-firstboot.service"
IDENTITY_WANTS = "/etc/systemd/system/multi-user.target.wants/host-identities-firstboot.service"
ISCSI_NAME = "/etc/iscsi/initiatorname.iscsi"
# Stand-ins for the tools the first-boot unit calls (nvme-cli, ssl-cert, zfsutils).
IDENTITY_TOOLS = ("/usr/sbin/nvme", "/usr/sbin/make-ssl-cert", "/usr/sbin/zgenhostid")
RHEL_UNITS = ("/usr/lib/systemd/system/iscsi-init.service", "/usr/lib/systemd/system/httpd-init.service")
JOURNAL_DIR = f"/var/log/journal/{PROTOTYPE_ID}"
IFCFG = "/etc/sysconfig/network-scripts/ifcfg-eth0"
IFCFG_TEXT = 'DEVICE=eth0\nBOOTPROTO=dhcp\nHWADDR="52:54:00:12:34:56"\nONBOOT=yes\n'
FAKE_CLOUD_INIT = "/usr/bin/cloud-init"
CLOUD_INIT_ARGS = f"{SCAFFOLD}/cloud-init.args"

HOOK_FIRST = f"""#!/bin/sh
# Records that it ran, and whether the built-in operations had run before it.
if [ -e /etc/ssh/ssh_host_rsa_key ]; then keys=present; else keys=absent; fi
echo "10-first keys=$keys" >> {HOOK_LOG}
"""
HOOK_LAST = f"""#!/bin/sh
echo 90-last >> {HOOK_LOG}
echo "hook 90-last: find is $(command -v find)"
"""
HOOK_NOT_EXECUTABLE = f"""#!/bin/sh
echo 15-not-executable >> {HOOK_LOG}
"""
HOOK_FAILING = """#!/bin/sh
echo "30-fail: about to fail"
exit 3
"""
CLOUD_INIT_SCRIPT = f"""#!/bin/sh
printf '%s\\n' "$*" > {CLOUD_INIT_ARGS}
echo "fake cloud-init: $*"
"""


def _consul_hook_from_doc() -> str:
    """The example hook of docs/cleanup-operations.md, verbatim."""
    text = DOC.read_text()
    marker = text.index("<!-- tested verbatim by tests/integration/")
    match = re.compile(r"```sh\n(.*?)```", re.DOTALL).search(text, marker)
    assert match is not None, "no ```sh block after the tested-verbatim marker"
    return match.group(1)


# --- seeding -------------------------------------------------------------------------

# Paths the script must remove (a removed directory covers its contents).
REMOVED = frozenset(
    {
        "/etc/ssh/ssh_host_ed25519_key-cert.pub",
        "/root/.ssh/authorized_keys",
        "/root/.ssh/known_hosts",
        "/root/.bash_history",
        "/root/.python_history",
        "/root/.lesshst",
        "/root/.viminfo",
        "/home/user/.bash_history",
        "/home/user/.zsh_history",
        "/home/user/.ash_history",
        "/home/user/.local/share/fish/fish_history",
        "/var/lib/redis/.rediscli_history",
        "/var/log/syslog.1",
        "/var/log/syslog.2.gz",
        "/var/log/messages-20240101",
        "/var/log/dpkg.log.old",
        "/var/log/apt/history.log.1.gz",
        "/var/log/nginx/access.log.10",
        JOURNAL_DIR,
        "/var/lib/systemd/random-seed",
        "/var/lib/urandom/random-seed",
        "/var/lib/seedrng/seed.credit",
        "/var/lib/systemd/credential.secret",
        "/var/lib/systemd/timers/stamp-apt-daily.timer",
        "/var/crash/_usr_bin_demo.0.crash",
        "/var/lib/systemd/coredump/core.demo.0.1234.zst",
        "/var/lib/dhcp/dhclient.eth0.leases",
        "/var/lib/dhclient/dhclient-5f2a-eth0.lease",
        "/var/lib/NetworkManager/internal-5f2a-eth0.lease",
        "/var/lib/NetworkManager/secret_key",
        "/var/lib/dhcpcd/eth0.lease",
        "/var/lib/dhcpcd/duid",
        "/etc/udev/rules.d/70-persistent-net.rules",
        "/var/cache/apt/pkgcache.bin",
        "/var/cache/apt/srcpkgcache.bin",
        "/var/cache/apt/archives/hello_2.10-3_amd64.deb",
        "/var/cache/apt/archives/partial/curl_7.88.1-10_amd64.deb",
        "/var/cache/dnf/baseos-1a2b3c",
        "/var/cache/apk/busybox-1.36.1-r5.apk",
        "/var/spool/cron/atjobs/a0000101a2b3c4",
        "/var/mail/root",
        "/var/mail/user",
        "/tmp/session.txt",
        "/tmp/.hidden-socket",
        "/tmp/build",
        "/var/tmp/systemd-private-abc-chrony.service-XYZ",
        "/var/tmp/.cache",
        "/var/lib/consul/node-id",  # removed by the documented example hook
        # host identities generated at install time
        "/etc/nvme/hostnqn",
        "/etc/nvme/hostid",
        "/etc/ssl/private/ssl-cert-snakeoil.key",
        "/etc/ssl/certs/ssl-cert-snakeoil.pem",
        "/etc/cockpit/ws-certs.d/0-self-signed.cert",
        "/etc/salt/minion_id",
        "/etc/salt/pki/minion/minion.pem",
        "/etc/salt/pki/minion/minion.pub",
        "/etc/puppetlabs/puppet/ssl/private_keys",
        "/etc/puppetlabs/puppet/ssl/certs",
        "/var/lib/puppet/ssl/certs",
        "/etc/chef/client.pem",
        "/etc/pki/consumer/cert.pem",
        "/etc/pki/consumer/key.pem",
        "/etc/pki/entitlement/7134.pem",
        "/etc/pki/entitlement/7134-key.pem",
        "/etc/sysconfig/rhn/systemid",
        "/etc/hostid",
    }
)
CLOUD_STATE = frozenset(
    {
        "/var/lib/cloud/instance",
        "/var/lib/cloud/instances",
        "/var/lib/cloud/data",
        "/var/lib/cloud/sem",
        "/var/log/cloud-init.log",
        "/var/log/cloud-init-output.log",
    }
)
# Logs that must be truncated to zero length and keep their owner and mode.
TRUNCATED = frozenset(
    {
        "/var/log/syslog",
        "/var/log/auth.log",
        "/var/log/wtmp",
        "/var/log/btmp",
        "/var/log/lastlog",
        "/var/log/private/app.log",
        "/var/log/nginx/access.log",
    }
)
# Paths whose content the script changes in place, or that it replaces.
CHANGED = frozenset({"/etc/machine-id", "/var/lib/dbus/machine-id", "/etc/hostname", IFCFG, ISCSI_NAME})
ADDED = frozenset({KEYGEN_UNIT, KEYGEN_WANTS, IDENTITY_UNIT, IDENTITY_WANTS})
# Must survive byte for byte (the inventory check covers the rest of the tree too).
CONTROLS = frozenset(
    {
        "/etc/ssh/sshd_config",
        "/etc/ssh/moduli",
        "/etc/passwd",
        "/etc/hosts",
        "/root/.ssh/id_ed25519",
        "/root/.ssh/config",
        "/home/user/notes.txt",
        "/home/user/.bashrc",
        "/home/user2/.bash_history",  # symlink to /dev/null: deliberate
        "/var/spool/cron/crontabs/user",
        "/var/spool/cron/atjobs/.SEQ",
        "/var/lib/dhcp/dhcpd.leases",
        "/etc/udev/rules.d/75-persistent-net-generator.rules",
        "/var/lib/cloud/seed/nocloud/user-data",
        "/var/cache/apt/archives/lock",
        "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease",
        "/var/lib/etcd/member/snap/db",
        "/var/lib/NetworkManager/NetworkManager.state",
        f"{HOOK_DIR}/15-not-executable",
        "/var/log/journal",
        "/etc/iscsi/iscsid.conf",
        "/etc/salt/minion",
        "/etc/salt/pki/minion/minion_master.pub",
        "/etc/puppetlabs/puppet/ssl",
        "/etc/puppetlabs/puppet/puppet.conf",
        "/etc/chef/validation.pem",
        "/etc/pki/tls/private/localhost.key",  # no httpd-init.service: nothing would regenerate it
        "/tmp",
        "/var/tmp",
    }
)
ROTATED = re.compile(r"\.(gz|xz|bz2|zst|lz4|lzma|Z|old|[0-9]|[0-9][0-9])$|-[0-9]{8}$")


def _ids(root: Path, database: str) -> dict[str, int]:
    ids: dict[str, int] = {}
    for line in (root / "etc" / database).read_text().splitlines():
        fields = line.split(":")
        ids[fields[0]] = int(fields[2])
    return ids


def _parent_dirs(root: Path, rel: str) -> None:
    """Create missing parents of rel as root:root 0755 (what a package would do)."""
    missing: list[Path] = []
    parent = (root / rel.lstrip("/")).parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)


def _put(
    root: Path,
    rel: str,
    content: str | bytes,
    mode: int = 0o644,
    owner: tuple[int, int] = (0, 0),
) -> None:
    path = root / rel.lstrip("/")
    _parent_dirs(root, rel)
    if path.is_symlink() or path.is_file():
        path.unlink()
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chown(path, *owner)
    path.chmod(mode)


def _link(root: Path, rel: str, target: str) -> None:
    path = root / rel.lstrip("/")
    _parent_dirs(root, rel)
    if path.is_symlink() or path.is_file():
        path.unlink()
    path.symlink_to(target)


def seed(root: Path) -> None:
    """Give every operation something to do, and plant the controls. Idempotent."""
    users = _ids(root, "passwd")
    groups = _ids(root, "group")
    # Restore what an earlier scenario's run removed or installed.
    for rel in (KEYGEN_WANTS, KEYGEN_UNIT, IDENTITY_WANTS, IDENTITY_UNIT, FAKE_CLOUD_INIT, f"{HOOK_DIR}/30-fail"):
        path = root / rel.lstrip("/")
        if path.is_symlink() or path.exists():
            path.unlink()
    shutil.rmtree(root / SCAFFOLD.lstrip("/"), ignore_errors=True)
    _parent_dirs(root, f"{SCAFFOLD}/x")

    for kind in ("rsa", "ecdsa", "ed25519"):
        _put(root, f"/etc/ssh/ssh_host_{kind}_key", f"PRIVATE {kind} KEY\n", 0o600)
        _put(root, f"/etc/ssh/ssh_host_{kind}_key.pub", f"ssh-{kind} AAAA root@proto\n")
    _put(root, "/etc/ssh/ssh_host_ed25519_key-cert.pub", "ssh-ed25519-cert-v01 AAAA\n")
    _put(root, "/root/.ssh/authorized_keys", "ssh-ed25519 AAAA operator@laptop\n", 0o600)
    _put(root, "/root/.ssh/known_hosts", "github.com ssh-ed25519 AAAA\n", 0o600)
    _put(root, "/root/.ssh/id_ed25519", "PRIVATE deploy key\n", 0o600)
    _put(root, "/root/.ssh/config", "Host git\n  User git\n", 0o600)

    _put(root, "/root/.bash_history", "mysql -uroot -phunter2\n", 0o600)
    _put(root, "/root/.python_history", "import os\n", 0o600)
    _put(root, "/root/.lesshst", ".less-history-file:\n", 0o600)
    _put(root, "/root/.viminfo", "# viminfo\n", 0o600)
    user = (1000, 1000)
    _put(root, "/home/user/.bash_history", "curl -H 'token: s3cr3t'\n", 0o600, user)
    _put(root, "/home/user/.zsh_history", ": 1700000000:0;ls\n", 0o600, user)
    _put(root, "/home/user/.ash_history", "ls\n", 0o600, user)
    _put(root, "/home/user/.local/share/fish/fish_history", "- cmd: ls\n", 0o600, user)
    _put(root, "/home/user/notes.txt", "keep me\n", 0o644, user)
    _put(root, "/home/user/.bashrc", "alias ll='ls -l'\n", 0o644, user)
    _link(root, "/home/user2/.bash_history", "/dev/null")
    redis = (users["redis"], groups["redis"])
    _put(root, "/var/lib/redis/.rediscli_history", "AUTH s3cr3t\n", 0o600, redis)

    adm = groups["adm"]
    utmp = groups["utmp"]
    _put(root, "/var/log/syslog", "Nov 22 proto kernel: booted\n", 0o640, (0, adm))
    _put(root, "/var/log/auth.log", "Accepted publickey for root\n", 0o640, (0, adm))
    _put(root, "/var/log/wtmp", b"\x07\x00\x00\x00root login record", 0o664, (0, utmp))
    _put(root, "/var/log/btmp", b"\x06\x00\x00\x00failed login", 0o660, (0, utmp))
    _put(root, "/var/log/lastlog", b"\x00" * 64 + b"lastlog", 0o664, (0, utmp))
    _put(root, "/var/log/private/app.log", "secret app log\n", 0o600)
    _put(root, "/var/log/nginx/access.log", "10.0.0.1 GET /\n", 0o640, (0, adm))
    _put(root, "/var/log/syslog.1", "old syslog\n", 0o640, (0, adm))
    _put(root, "/var/log/syslog.2.gz", b"\x1f\x8b old", 0o640, (0, adm))
    _put(root, "/var/log/messages-20240101", "rhel dateext rotation\n", 0o600)
    _put(root, "/var/log/dpkg.log.old", "old dpkg log\n")
    _put(root, "/var/log/apt/history.log.1.gz", b"\x1f\x8b apt")
    _put(root, "/var/log/nginx/access.log.10", "ancient\n", 0o640, (0, adm))
    _put(root, f"{JOURNAL_DIR}/system.journal", b"LPKSHHRH system", 0o640)
    _put(root, f"{JOURNAL_DIR}/user-1000.journal", b"LPKSHHRH user", 0o640)

    _put(root, "/etc/machine-id", PROTOTYPE_ID + "\n", 0o444)
    _put(root, TRANSIENT_ID, TRANSIENT_MACHINE_ID + "\n", 0o444)
    _put(root, "/var/lib/dbus/machine-id", PROTOTYPE_ID + "\n", 0o444)
    _put(root, "/etc/hostname", "imgprep-proto\n")
    _put(root, "/var/lib/systemd/random-seed", os.urandom(512), 0o600)
    _put(root, "/var/lib/urandom/random-seed", os.urandom(512), 0o600)
    _put(root, "/var/lib/seedrng/seed.credit", os.urandom(32), 0o400)
    _put(root, "/var/lib/systemd/credential.secret", os.urandom(32), 0o400)
    _put(root, "/var/lib/systemd/timers/stamp-apt-daily.timer", "")
    _put(root, "/var/crash/_usr_bin_demo.0.crash", "ProblemType: Crash\n", 0o640)
    _put(root, "/var/lib/systemd/coredump/core.demo.0.1234.zst", b"core", 0o640)

    _put(root, "/var/lib/dhcp/dhclient.eth0.leases", "lease { fixed-address 10.0.0.5; }\n")
    _put(root, "/var/lib/dhcp/dhcpd.leases", "# dhcpd server leases\n")
    _put(root, "/var/lib/dhclient/dhclient-5f2a-eth0.lease", "lease {}\n")
    _put(root, "/var/lib/NetworkManager/internal-5f2a-eth0.lease", "ADDRESS=10.0.0.5\n")
    _put(root, "/var/lib/NetworkManager/secret_key", os.urandom(32), 0o600)
    _put(root, "/var/lib/NetworkManager/NetworkManager.state", "[main]\nNetworkingEnabled=true\n")
    _put(root, "/var/lib/dhcpcd/eth0.lease", b"lease")
    _put(root, "/var/lib/dhcpcd/duid", "00:01:00:01:2b:3c\n")
    _put(root, "/etc/udev/rules.d/70-persistent-net.rules", 'NAME="eth0"\n')
    _put(root, "/etc/udev/rules.d/75-persistent-net-generator.rules", "")
    _put(root, IFCFG, IFCFG_TEXT)

    _put(root, "/var/lib/cloud/instances/iid-proto/sem/config_ssh", "done\n")
    _put(root, "/var/lib/cloud/instances/iid-proto/user-data.txt", "#cloud-config\n", 0o600)
    _link(root, "/var/lib/cloud/instance", "/var/lib/cloud/instances/iid-proto")
    _put(root, "/var/lib/cloud/data/instance-id", "iid-proto\n")
    _put(root, "/var/lib/cloud/sem/config_scripts_per_once.once", "done\n")
    _put(root, "/var/lib/cloud/seed/nocloud/user-data", "#cloud-config\n")
    _put(root, "/var/log/cloud-init.log", "cloud-init ran\n", 0o640, (0, adm))
    _put(root, "/var/log/cloud-init-output.log", "cloud-init output\n", 0o640, (0, adm))

    _put(root, "/var/cache/apt/pkgcache.bin", b"apt cache")
    _put(root, "/var/cache/apt/srcpkgcache.bin", b"apt src cache")
    _put(root, "/var/cache/apt/archives/hello_2.10-3_amd64.deb", b"!<arch>")
    _put(root, "/var/cache/apt/archives/partial/curl_7.88.1-10_amd64.deb", b"!<ar")
    _put(root, "/var/cache/apt/archives/lock", "", 0o640)
    _put(root, "/var/cache/dnf/baseos-1a2b3c/repodata/repomd.xml", "<repomd/>\n")
    _put(root, "/var/cache/apk/busybox-1.36.1-r5.apk", b"apk")
    _put(root, "/var/spool/cron/crontabs/user", "0 3 * * * /usr/local/bin/backup\n", 0o600)
    _put(root, "/var/spool/cron/atjobs/a0000101a2b3c4", "#!/bin/sh\nreboot\n", 0o700)
    _put(root, "/var/spool/cron/atjobs/.SEQ", "2\n", 0o600)
    mail = groups["mail"]
    _put(root, "/var/mail/root", "From cron: backup output\n", 0o600, (0, mail))
    _put(root, "/var/mail/user", "From: bank\n", 0o660, (1000, mail))

    _put(root, "/tmp/session.txt", "prototype session\n")
    _put(root, "/tmp/.hidden-socket", "")
    _put(root, "/tmp/build/obj/main.o", b"\x7fELF")
    _put(root, "/var/tmp/systemd-private-abc-chrony.service-XYZ/tmp/x", "")
    _put(root, "/var/tmp/.cache", "")
    _put(root, "/var/lib/etcd/member/snap/db", b"etcd data: not the script's business")
    _put(root, "/var/lib/consul/node-id", "c1d2e3f4-prototype-node\n")

    _put(root, ISCSI_NAME, "InitiatorName=iqn.1993-08.org.debian:01:5e1f0c2a9b7d\n", 0o600)
    _put(root, "/etc/iscsi/iscsid.conf", "node.startup = manual\n", 0o600)
    _put(root, "/etc/nvme/hostnqn", "nqn.2014-08.org.nvmexpress:uuid:4f1c0b9e-2d7a-4c6b-8e3f-5a1d2c9b7e60\n")
    _put(root, "/etc/nvme/hostid", "4f1c0b9e-2d7a-4c6b-8e3f-5a1d2c9b7e60\n")
    _put(root, "/etc/ssl/private/ssl-cert-snakeoil.key", "PRIVATE snakeoil\n", 0o640)
    _put(root, "/etc/ssl/certs/ssl-cert-snakeoil.pem", "CERT snakeoil\n")
    _put(root, "/etc/pki/tls/private/localhost.key", "PRIVATE localhost\n", 0o600)
    _put(root, "/etc/cockpit/ws-certs.d/0-self-signed.cert", "CERT cockpit\n")
    _put(root, "/etc/salt/minion", "master: salt.example\n")
    _put(root, "/etc/salt/minion_id", "imgprep-proto\n")
    _put(root, "/etc/salt/pki/minion/minion.pem", "PRIVATE salt\n", 0o400)
    _put(root, "/etc/salt/pki/minion/minion.pub", "PUBLIC salt\n")
    _put(root, "/etc/salt/pki/minion/minion_master.pub", "PUBLIC master\n")
    _put(root, "/etc/puppetlabs/puppet/puppet.conf", "[main]\nserver = puppet\n")
    _put(root, "/etc/puppetlabs/puppet/ssl/private_keys/imgprep-proto.pem", "PRIVATE puppet\n", 0o640)
    _put(root, "/etc/puppetlabs/puppet/ssl/certs/imgprep-proto.pem", "CERT puppet\n")
    (root / "etc/puppetlabs/puppet/ssl").chmod(0o771)
    _put(root, "/var/lib/puppet/ssl/certs/ca.pem", "CERT ca\n")
    _put(root, "/etc/chef/client.pem", "PRIVATE chef client\n", 0o600)
    _put(root, "/etc/chef/validation.pem", "PRIVATE chef validator\n", 0o600)
    _put(root, "/etc/pki/consumer/cert.pem", "CERT consumer\n")
    _put(root, "/etc/pki/consumer/key.pem", "PRIVATE consumer\n", 0o600)
    _put(root, "/etc/pki/entitlement/7134.pem", "CERT entitlement\n")
    _put(root, "/etc/pki/entitlement/7134-key.pem", "PRIVATE entitlement\n", 0o600)
    _put(root, "/etc/sysconfig/rhn/systemid", "<systemid/>\n", 0o600)
    _put(root, "/etc/hostid", b"\xde\xad\xbe\xef")
    for tool in IDENTITY_TOOLS:
        _put(root, tool, "#!/bin/sh\nexit 0\n", 0o755)

    _put(root, f"{HOOK_DIR}/10-first", HOOK_FIRST, 0o755)
    _put(root, f"{HOOK_DIR}/15-not-executable", HOOK_NOT_EXECUTABLE, 0o644)
    _put(root, f"{HOOK_DIR}/50-consul-node-id", _consul_hook_from_doc(), 0o755)
    _put(root, f"{HOOK_DIR}/90-last", HOOK_LAST, 0o755)

    shutil.copy(SCRIPT, root / SCAFFOLD.lstrip("/") / "linux-prepare-image")


# --- inventory -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """What the inventory records of one path (directories: no size, mtime, content)."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int = 0
    mtime_ns: int = 0
    content: str = ""  # sha256 of a file, target of a symlink
    xattrs: tuple[tuple[str, str], ...] = ()  # ACLs, SELinux labels, capabilities


Inventory = dict[str, Entry]


def _entry(path: str) -> Entry:
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    owner = (st.st_uid, st.st_gid)
    if stat.S_ISLNK(st.st_mode):
        return Entry("symlink", mode, *owner, content=os.readlink(path))
    xattrs = tuple(
        (name, _sha256(os.getxattr(path, name, follow_symlinks=False)))
        for name in sorted(os.listxattr(path, follow_symlinks=False))
    )
    if stat.S_ISDIR(st.st_mode):
        return Entry("dir", mode, *owner, xattrs=xattrs)
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as stream:
            digest = hashlib.file_digest(stream, "sha256").hexdigest()
        return Entry("file", mode, *owner, st.st_size, st.st_mtime_ns, digest, xattrs)
    return Entry("other", mode, *owner, mtime_ns=st.st_mtime_ns, xattrs=xattrs)


def inventory(root: Path) -> Inventory:
    """Every path of the tree but the runtime filesystems, keyed by its guest path."""
    result: Inventory = {}
    prefix = len(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [name for name in dirnames if name not in EXCLUDED_TOP]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            result[path[prefix:]] = _entry(path)
    return result


def differences(before: Inventory, after: Inventory) -> dict[str, str]:
    changes: dict[str, str] = {}
    for path in before.keys() | after.keys():
        if path not in after:
            changes[path] = "removed"
        elif path not in before:
            changes[path] = "added"
        elif before[path] != after[path]:
            changes[path] = "changed"
    return changes


def _covered(path: str, paths: frozenset[str]) -> bool:
    """path is in paths, or inside a directory that is."""
    return path in paths or any(path.startswith(p + "/") for p in paths)


def _is_log(path: str, before: Inventory) -> bool:
    return path.startswith("/var/log/") and not path.startswith("/var/log/journal/") and before[path].kind == "file"


# --- running the script --------------------------------------------------------------

# Runs in a private mount and pid namespace: proc and the bind mount vanish with it.
RUNNER = """
set -e
root=$1 transient_id=$2 guest_path=$3
shift 3
mount -t proc proc "$root/proc"
# What systemd does at boot while /etc/machine-id is uninitialized: a transient id
# bind-mounted over it. The script must write the file underneath.
mount --bind "$root$transient_id" "$root/etc/machine-id"
exec chroot "$root" /usr/bin/env -i PATH="$guest_path" "$@"
"""


def run_script(root: Path, shell: str = "/bin/sh", guest_path: str = GUEST_PATH) -> subprocess.CompletedProcess[str]:
    """Run the script in the tree as the runner would: root, cwd /, early-boot PATH."""
    cmd = ["unshare", "--mount", "--pid", "--fork", "--", "/bin/sh", "-c", RUNNER, "runner"]
    cmd += [str(root), TRANSIENT_ID, guest_path, shell, f"{SCAFFOLD}/linux-prepare-image"]
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, check=False)


@pytest.fixture(autouse=True, scope="module")
def _namespaces() -> None:
    """Every test runs the script in mount/pid namespaces under chroot: the capability,
    not the user, decides."""
    requires("chroot-namespaces", "debootstrap")


@dataclasses.dataclass(frozen=True)
class Run:
    before: Inventory
    after: Inventory
    result: subprocess.CompletedProcess[str]
    hook_log: str
    transient_id: str
    keygen_unit: str | None


def _read(root: Path, rel: str) -> str | None:
    path = root / rel.lstrip("/")
    return path.read_text() if path.is_file() else None


def _run_and_record(root: Path, shell: str, guest_path: str) -> Run:
    before = inventory(root)
    result = run_script(root, shell, guest_path)
    return Run(
        before=before,
        after=inventory(root),
        result=result,
        hook_log=_read(root, HOOK_LOG) or "",
        transient_id=_read(root, TRANSIENT_ID) or "",
        keygen_unit=_read(root, KEYGEN_UNIT),
    )


def seeded_run(root: Path, shell: str = "/bin/sh", guest_path: str = GUEST_PATH) -> Run:
    seed(root)
    return _run_and_record(root, shell, guest_path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One copy of the test guest's rootfs for the whole module."""
    root = tmp_path_factory.mktemp("linux-prepare-image") / "rootfs"
    subprocess.run(["cp", "-a", str(build().rootfs), str(root)], check=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def dash_run(tree: Path) -> Run:
    """The script run once by the guest's own /bin/sh (dash) on a freshly seeded tree."""
    assert os.path.realpath(tree / "bin/sh").endswith("dash")
    return seeded_run(tree)


# --- assertions shared by the dash and busybox runs ---------------------------------


def assert_succeeded(run: Run) -> None:
    assert run.result.returncode == 0, run.result.stdout + run.result.stderr
    assert run.result.stdout.splitlines()[-1] == "linux-prepare-image: done"


def assert_cleaned(run: Run) -> None:
    """Each operation's effect, path by path."""
    before, after = run.before, run.after
    # Everything seeded for removal is gone, and so is every host key of the tree.
    host_keys = {p for p in before if p.startswith("/etc/ssh/ssh_host_")}
    assert len(host_keys) >= 7
    for path in sorted(REMOVED | CLOUD_STATE | host_keys):
        assert path in before, f"seeding missed {path}"
        assert path not in after, f"{path} was not removed"
    for path in sorted(CONTROLS):
        assert path in after, f"control {path} was removed"
        assert after[path] == before[path], f"control {path} was modified"

    # Logs: truncated, not deleted, owner and mode kept; rotated ones deleted.
    for path in sorted(TRUNCATED):
        assert before[path].size > 0
        assert after[path].size == 0, f"{path} not truncated"
        assert (after[path].mode, after[path].uid, after[path].gid) == (
            before[path].mode,
            before[path].uid,
            before[path].gid,
        )
    for path in sorted(p for p in before if _is_log(p, before)):
        name = path.rsplit("/", 1)[1]
        if ROTATED.search(name) or _covered(path, CLOUD_STATE):
            assert path not in after, f"rotated log {path} kept"
        else:
            assert path in after, f"log {path} deleted instead of truncated"
            assert after[path].size == 0, f"log {path} not truncated"

    # The journal directory stays (persistent storage), its contents go.
    assert after["/var/log/journal"] == before["/var/log/journal"]
    assert not [p for p in after if p.startswith("/var/log/journal/")]

    # machine-id: the file on disk under the transient bind mount was written.
    assert after["/etc/machine-id"].kind == "file"
    assert after["/etc/machine-id"].mode == 0o444
    assert after["/etc/machine-id"].content == _sha256(b"uninitialized\n")
    assert run.transient_id == TRANSIENT_MACHINE_ID + "\n", "wrote through the bind mount"
    assert after["/var/lib/dbus/machine-id"].kind == "symlink"
    assert after["/var/lib/dbus/machine-id"].content == "/etc/machine-id"
    assert after["/etc/hostname"].content == _sha256(b"localhost\n")
    expected_ifcfg = IFCFG_TEXT.replace('HWADDR="52:54:00:12:34:56"\n', "")
    assert after[IFCFG].content == _sha256(expected_ifcfg.encode())
    assert after[IFCFG].mode == before[IFCFG].mode

    # Temporary directories: emptied, themselves untouched (mode 1777).
    for directory in ("/tmp", "/var/tmp"):
        assert after[directory].mode == 0o1777
        assert not [p for p in after if p.startswith(directory + "/")]

    # No cloud-init command in the tree: state removed by hand, the seed kept.
    assert "cloud-init: command not installed" in run.result.stdout
    assert "/var/lib/cloud/seed/nocloud/user-data" in after

    # No cloud-init, Debian's ssh.service does not generate keys: the unit is installed.
    assert after[KEYGEN_WANTS].kind == "symlink"
    assert after[KEYGEN_WANTS].content == KEYGEN_UNIT

    # Host identities: Debian's open-iscsi regenerates a name from GenerateName=yes,
    # the rest is removed and regenerated by the first-boot unit or its daemon.
    iscsi = after[ISCSI_NAME]
    assert (iscsi.kind, iscsi.mode) == ("file", 0o600)
    assert "iscsi-initiatorname: /etc/iscsi/initiatorname.iscsi set to 'GenerateName=yes'" in run.result.stdout
    assert after[IDENTITY_WANTS].kind == "symlink"
    assert after[IDENTITY_WANTS].content == IDENTITY_UNIT
    assert after["/etc/puppetlabs/puppet/ssl"].mode == 0o771


def assert_keygen_unit(run: Run) -> None:
    unit = run.keygen_unit
    assert unit is not None
    assert "ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key\n" in unit
    assert "Before=ssh.service sshd.service\n" in unit
    assert "ExecStart=/usr/bin/ssh-keygen -A\n" in unit
    assert "WantedBy=multi-user.target\n" in unit
    assert run.after[KEYGEN_UNIT].mode == 0o644
    assert "imgprep-" not in KEYGEN_UNIT


def assert_only_expected_changes(run: Run) -> None:
    """The strongest check: nothing changed in the tree that no operation explains."""
    unexpected = {
        path: change
        for path, change in differences(run.before, run.after).items()
        if not (
            _covered(path, REMOVED | CLOUD_STATE | CHANGED | ADDED)
            or path.startswith(("/etc/ssh/ssh_host_", "/tmp/", "/var/tmp/"))
            or path.startswith("/var/log/journal/")
            or (path in run.before and _is_log(path, run.before))
        )
    }
    assert unexpected == {}


def assert_identity_unit(root: Path) -> None:
    unit = _read(root, IDENTITY_UNIT)
    assert unit is not None
    assert "ExecStart=/bin/sh -c 'test -s /etc/nvme/hostnqn || " in unit
    assert "make-ssl-cert generate-default-snakeoil'\n" in unit
    assert "ExecStart=/bin/sh -c 'test -e /etc/hostid || zgenhostid'\n" in unit
    assert "Before=multi-user.target nvmf-autoconnect.service" in unit
    assert " nginx.service " in unit
    assert "WantedBy=multi-user.target\n" in unit
    assert "imgprep-" not in IDENTITY_UNIT
    iscsi = _read(root, ISCSI_NAME)
    assert iscsi is not None
    assert iscsi.endswith("\nGenerateName=yes\n")
    assert "InitiatorName=" not in iscsi


def assert_hooks(run: Run, find: str) -> None:
    # Executables in lexical order, before any built-in operation; the
    # non-executable one is announced and not run.
    assert run.hook_log == "10-first keys=present\n90-last\n"
    lines = run.result.stdout.splitlines()
    running = [line.rsplit("/", 1)[1] for line in lines if "running hook" in line]
    assert running == ["10-first", "50-consul-node-id", "90-last"]
    assert f"prepare.d: ignoring {HOOK_DIR}/15-not-executable (not an executable regular file)" in lines
    assert "consul: removed /var/lib/consul/node-id" in lines
    # Hooks' output is part of the script's output; find tells which userland ran.
    assert f"hook 90-last: find is {find}" in lines
    assert lines.index("prepare.d: ran 3 hook(s) from /etc/imgprep/prepare.d") < min(
        i for i, line in enumerate(lines) if line.startswith("ssh-host-keys:")
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- tests ---------------------------------------------------------------------------


def test_dash_run_cleans_every_operation(dash_run: Run) -> None:
    assert_succeeded(dash_run)
    assert_cleaned(dash_run)
    assert_keygen_unit(dash_run)
    assert "machine-id: unmounted the transient id" in dash_run.result.stdout


def test_dash_run_resets_host_identities(dash_run: Run, tree: Path) -> None:
    assert_succeeded(dash_run)
    assert_identity_unit(tree)


def test_dash_run_changes_nothing_else(dash_run: Run) -> None:
    assert_only_expected_changes(dash_run)


def test_dash_run_hooks(dash_run: Run) -> None:
    assert_hooks(dash_run, "/usr/bin/find")


OPERATIONS = (
    "prepare.d",
    "cloud-init",
    "ssh-host-keys",
    "ssh-hostkeys-firstboot",
    "root-ssh",
    "shell-history",
    "machine-id",
    "dbus-machine-id",
    "random-seed",
    "systemd-state",
    "iscsi-initiatorname",
    "nvme-hostnqn",
    "tls-self-signed",
    "config-management",
    "hostid",
    "host-identities-firstboot",
    "crash-data",
    "hostname",
    "dhcp-client-state",
    "udev-persistent-net",
    "net-hwaddr",
    "package-manager-cache",
    "at-jobs",
    "mail-spool",
    "tmp-files",
    "journal",
    "logfiles",
)


def test_every_operation_is_reported_and_documented(dash_run: Run) -> None:
    lines = dash_run.result.stdout.splitlines()
    # Built-in operations report after the hooks (whose own output is free-form).
    start = next(i for i, line in enumerate(lines) if line.startswith("prepare.d: ran "))
    reported = ["prepare.d"]
    for line in lines[start + 1 : -1]:
        name = line.split(":", 1)[0]
        if name != reported[-1]:
            reported.append(name)
    assert tuple(reported) == OPERATIONS
    doc = DOC.read_text()
    for name in OPERATIONS:
        if name == "ssh-hostkeys-firstboot":
            assert "## SSH host keys on an instance's first boot" in doc
        else:
            assert f"| `{name}` |" in doc, f"operation {name} missing from the doc table"


def test_keygen_unit_passes_systemd_analyze_verify(tree: Path) -> None:
    requires("systemd-analyze")
    analyze = "systemd-analyze"
    assert_succeeded(seeded_run(tree))
    for unit in (KEYGEN_UNIT, IDENTITY_UNIT):
        name = unit.rsplit("/", 1)[1]
        verify = subprocess.run(
            [analyze, "verify", f"--root={tree}", name], capture_output=True, text=True, check=False
        )
        assert verify.returncode == 0, verify.stderr
        assert verify.stderr == ""


def test_second_run_changes_nothing(tree: Path) -> None:
    first = seeded_run(tree)
    assert_succeeded(first)
    second = run_script(tree)
    assert second.returncode == 0, second.stdout + second.stderr
    assert differences(first.after, inventory(tree)) == {}
    assert "already installed and enabled" in second.stdout
    assert "/etc/machine-id already 'uninitialized'" in second.stdout
    assert "iscsi-initiatorname: /etc/iscsi/initiatorname.iscsi already 'GenerateName=yes'" in second.stdout
    assert "host-identities-firstboot: /etc/systemd/system/host-identities-firstboot.service already" in second.stdout


def test_rhel_family_identities_are_removed_for_their_init_units(tree: Path) -> None:
    """With iscsi-init.service and httpd-init.service (RHEL family) the initiator name
    and mod_ssl's localhost pair are removed: those units regenerate missing files."""
    seed(tree)
    for unit in RHEL_UNITS:
        _put(tree, unit, "[Service]\nType=oneshot\nExecStart=/bin/true\n")
    try:
        result = run_script(tree)
    finally:
        for unit in RHEL_UNITS:
            (tree / unit.lstrip("/")).unlink()
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tree / ISCSI_NAME.lstrip("/")).exists()
    assert "removed /etc/iscsi/initiatorname.iscsi (iscsi-init.service regenerates it)" in result.stdout
    assert not (tree / "etc/pki/tls/private/localhost.key").exists()
    assert (tree / "etc/iscsi/iscsid.conf").exists()


def test_busybox_ash_and_applets(tree: Path) -> None:
    """Alpine-like userland: busybox ash, and busybox applets ahead of GNU tools."""
    requires("busybox")
    busybox = shutil.which("busybox")
    assert busybox is not None
    bin_dir = tree / SCAFFOLD.lstrip("/") / "bin"

    def install_busybox() -> None:
        bin_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(busybox, bin_dir / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            (bin_dir / applet).symlink_to("busybox")

    # seeded_run() recreates the scaffold directory: seed first, then add busybox.
    seed(tree)
    install_busybox()
    run = _run_and_record(tree, f"{SCAFFOLD}/bin/sh", f"{SCAFFOLD}/bin:{GUEST_PATH}")
    assert_succeeded(run)
    assert_cleaned(run)
    assert_keygen_unit(run)
    assert_only_expected_changes(run)
    assert_hooks(run, f"{SCAFFOLD}/bin/find")


def test_cloud_init_command_is_used_when_installed(tree: Path) -> None:
    seed(tree)
    _put(tree, FAKE_CLOUD_INIT, CLOUD_INIT_SCRIPT, 0o755)
    try:
        result = run_script(tree)
        assert result.returncode == 0, result.stdout + result.stderr
        args = tree / CLOUD_INIT_ARGS.lstrip("/")
        assert args.read_text() == "clean --logs\n"
        assert "cloud-init: ran 'cloud-init clean --logs'" in result.stdout
        # The script trusted the command: no fallback removal of the state it owns.
        for path in CLOUD_STATE:
            assert (tree / path.lstrip("/")).is_symlink() or (tree / path.lstrip("/")).exists()
        # cloud-init regenerates host keys: no first-boot unit.
        assert "cloud-init generates host keys on first boot" in result.stdout
        assert not (tree / KEYGEN_UNIT.lstrip("/")).exists()
        assert not (tree / KEYGEN_WANTS.lstrip("/")).is_symlink()
        assert not (tree / "etc/ssh/ssh_host_rsa_key").exists()
    finally:
        (tree / FAKE_CLOUD_INIT.lstrip("/")).unlink()


def test_failing_hook_fails_the_script_and_names_it(tree: Path) -> None:
    seed(tree)
    _put(tree, f"{HOOK_DIR}/30-fail", HOOK_FAILING, 0o755)
    try:
        result = run_script(tree)
    finally:
        (tree / HOOK_DIR.lstrip("/") / "30-fail").unlink()
    assert result.returncode != 0
    assert f"linux-prepare-image: error: prepare.d hook {HOOK_DIR}/30-fail failed with exit status 3" in result.stderr
    assert "30-fail: about to fail" in result.stdout
    # Failed fast: the hook after it and the built-in operations did not run.
    assert (tree / HOOK_LOG.lstrip("/")).read_text() == "10-first keys=present\n"
    assert (tree / "etc/ssh/ssh_host_rsa_key").exists()
    assert "linux-prepare-image: done" not in result.stdout
