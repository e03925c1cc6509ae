"""units/imgprep-verify-runner, run for real under /bin/sh in a private mount namespace,
its report parsed and judged by the host code (imgprep.verify).

As for the prepare runner (tests/host/test_runner.py): ``unshare --mount --pid`` with
temporary directories bound over /var/lib and /run, and fakes bound over
/usr/bin/systemctl, /usr/bin/journalctl, /dev/kmsg, /etc/ssh and /etc/machine-id, so
the runner reads a made-up first boot and nothing reaches the host. /etc/machine-id
is a bind mount here, exactly what a transient (uncommitted) machine-id looks like,
so the host must say so.

Needs: private mount namespaces (root or CAP_SYS_ADMIN).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from imgprep import artifacts, identities
from imgprep.channel import ChannelParser
from imgprep.verify import decide, parse_report
from tests.capabilities import requires

UNSHARE = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child"]
MACHINE_ID = "fedcba9876543210fedcba9876543210"

NAMESPACE_SCRIPT = """
set -e
t=$1
mount --no-mtab --bind "$t/varlib" /var/lib
mount --no-mtab --bind "$t/run" /run
mount --no-mtab --bind "$t/systemctl" /usr/bin/systemctl
mount --no-mtab --bind "$t/journalctl" /usr/bin/journalctl
mount --no-mtab --bind "$t/ssh" /etc/ssh
mount --no-mtab --bind "$t/machine-id" /etc/machine-id
if [ -e /dev/kmsg ]; then mount --no-mtab --bind "$t/kmsg" /dev/kmsg; fi
grep -q IMGPREP-FAKE /usr/bin/systemctl && grep -q IMGPREP-FAKE /usr/bin/journalctl || exit 99
exec /var/lib/imgprep-verify/runner
"""

FAKE_SYSTEMCTL = """\
#!/bin/sh
# IMGPREP-FAKE systemctl: a first boot that settled degraded, one failed unit
echo "$*" >> /run/systemctl.args
case "$1" in
is-system-running) echo degraded; exit 1 ;;
show)
    case "$*" in
    *machine-id-commit*) printf 'Result=success\\nExecMainStartTimestampMonotonic=31000000\\nActiveState=active\\n' ;;
    *fsck*) printf 'Id=systemd-fsck-root.service\\nResult=success\\nExecMainStatus=0\\n'
        echo ExecMainStartTimestampMonotonic=0 ;;
    esac ;;
list-units)
    case "$*" in
    *--failed*) printf '\\342\\227\\217 broken.service loaded failed failed Broken\\n' ;;
    *) printf 'ssh.service loaded active running OpenSSH\\nimgprep-test-writer.service loaded active running W\\n' ;;
    esac ;;
esac
exit 0
"""

FAKE_JOURNALCTL = """\
#!/bin/sh
# IMGPREP-FAKE journalctl: the kernel log of a root filesystem that replayed its journal
case "$*" in
*-k*) printf 'EXT4-fs (vda): recovery complete\\nEXT4-fs (vda): mounted filesystem with ordered data mode\\n' ;;
esac
exit 0
"""


@pytest.fixture(scope="module")
def namespaces() -> None:
    requires("mount-namespaces", "usr-bin-systemctl")
    for tool in ("/usr/bin/journalctl", "/usr/bin/ssh-keygen", "/etc/machine-id"):
        if not Path(tool).exists():
            pytest.skip(f"{tool} is not here to bind a fake over")


def make_tree(tmp_path: Path) -> tuple[Path, Path]:
    tree = tmp_path / "tree"
    for name in ("varlib", "run", "ssh"):
        (tree / name).mkdir(parents=True)
    channel = tmp_path / "channel"
    prefix = tree / "varlib" / artifacts.VERIFY_PREFIX.removeprefix("/var/lib/")
    prefix.mkdir(mode=0o700)
    files = artifacts.verify_injection(channel=str(channel), settle_timeout=5, identity_list=identities.render_list())
    for f in files:
        if f.path.startswith(artifacts.VERIFY_PREFIX):
            target = prefix / Path(f.path).name
            target.write_bytes(f.data)
            target.chmod(f.mode)
    for name, text in (("systemctl", FAKE_SYSTEMCTL), ("journalctl", FAKE_JOURNALCTL)):
        (tree / name).write_text(text)
        (tree / name).chmod(0o755)
    (tree / "kmsg").write_text("")
    (tree / "machine-id").write_text(MACHINE_ID + "\n")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tree / "ssh" / "ssh_host_ed25519_key")], check=True
    )
    (tree / "ssh" / "ssh_host_rsa_key.pub").symlink_to("/etc/shadow")  # a symlink: never read
    return tree, channel


def test_the_runner_reports_and_the_host_judges(namespaces: None, tmp_path: Path) -> None:
    tree, channel = make_tree(tmp_path)
    proc = subprocess.run(
        [*UNSHARE, "/bin/sh", "-c", NAMESPACE_SCRIPT, "sh", str(tree)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "LANG": "C"},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    parser = ChannelParser()
    parser.feed(channel.read_bytes())
    assert parser.status.verify is not None, channel.read_bytes()[:500]
    report = parse_report(parser.status.verify)
    assert report.rejected == 0, parser.status.verify
    assert report.complete
    assert report.system_state == "degraded"
    assert report.machine_id == MACHINE_ID
    assert report.machine_id_mounted is True  # a bind mount, as a transient id is
    assert report.commit_result == "success"
    assert report.failed == ["broken.service"]  # the status mark before the name skipped
    assert report.services == ["ssh.service", "imgprep-test-writer.service"]
    assert report.kernel_fs == ["EXT4-fs (vda): recovery complete"]
    assert report.fsck == []  # it did not run in this boot
    assert [k.endswith("(ED25519)") for k in report.ssh_host_keys] == [True]
    key = (tree / "ssh" / "ssh_host_ed25519_key").read_bytes()
    assert "machine-id" in report.identities
    assert "ssh-host-keys" in report.identities
    paths = sorted(p for _, p in report.identities["ssh-host-keys"])
    assert paths == ["/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ed25519_key.pub"]  # not the symlink

    # the host's verdict: the prototype had this very key and machine-id
    prototype = {
        "ssh-host-keys": [hashlib.sha256(key).hexdigest()],
        "machine-id": [hashlib.sha256(f"{MACHINE_ID}\n".encode()).hexdigest()],
    }
    checks = {c.name: c for c in decide(report, prototype)}
    assert checks["failed-units"].detail == "failed units: broken.service"
    assert checks["machine-id"].detail == "machine-id was not committed (still a transient mount)"
    assert "equal the prototype's" in checks["ssh-host-keys"].detail
    assert "root filesystem needed journal recovery" in checks["filesystems"].detail
    assert checks["boot"].passed
    assert "poweroff --no-block" in (tree / "run" / "systemctl.args").read_text()
