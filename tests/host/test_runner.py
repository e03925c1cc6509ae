"""units/imgprep-prepare-runner, run for real under /bin/sh in a private mount namespace.

The runner uses fixed guest paths (/var/lib/imgprep-prepare, /run, /etc/systemd/system)
and sets its own PATH, so each run happens in ``unshare --mount --pid --fork`` where
temporary directories are bind-mounted over /var/lib, /run and /etc/systemd/system and a
fake ``systemctl`` (which records its arguments) over /usr/bin/systemctl. Mount
propagation is private: nothing is visible outside the namespace, and the pid namespace
kills anything left behind. The channel is a plain file, parsed with ChannelParser.

Needs: private mount namespaces (``requires("mount-namespaces")``: root or CAP_SYS_ADMIN).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from imgprep.artifacts import PREFIX, UNIT_NAME, UNIT_PATH, artifact, render_armed, wants_link
from imgprep.channel import ChannelParser, GuestStatus
from tests.capabilities import requires

GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # what the runner sets for itself
MOUNTS = {"varlib": "/var/lib", "run": "/run", "etcsys": "/etc/systemd/system"}
WANTS_DIR = "/etc/systemd/system/sysinit.target.wants"
# A private mount namespace (propagation private), and a pid namespace that kills
# whatever the runner leaves behind when it exits.
UNSHARE = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child"]

# Bind the fake tree in, then run the runner the way systemd does: exec the file.
# With "fast" (the fast power-off path), a fake /proc (uptime, mounts, sysrq-trigger as
# plain files), sleep and mount are bound in too, so that nothing the runner remounts
# or triggers can reach the host; the last check refuses to run the runner otherwise.
NAMESPACE_SCRIPT = """
set -e
t=$1
mount --no-mtab --bind "$t/varlib" /var/lib
mount --no-mtab --bind "$t/run" /run
mount --no-mtab --bind "$t/etcsys" /etc/systemd/system
mount --no-mtab --bind "$t/systemctl" /usr/bin/systemctl
if [ "$2" = fast ]; then
    cat /proc/uptime > "$t/proc/uptime"
    cp /usr/bin/mount "$t/realmount"
    "$t/realmount" --no-mtab --bind "$t/sleep" /usr/bin/sleep
    "$t/realmount" --no-mtab --bind "$t/proc" /proc
    if [ -e /dev/kmsg ]; then "$t/realmount" --no-mtab --bind "$t/kmsg" /dev/kmsg; fi
    "$t/realmount" --no-mtab --bind "$t/mount" /usr/bin/mount
    [ "$(cat /proc/imgprep-fake)" = yes ] && grep -q IMGPREP-FAKE /usr/bin/mount || exit 99
fi
exec /var/lib/imgprep-prepare/runner
"""

# What the fast path sees as /proc/mounts: two filesystems to remount (innermost first),
# one with an escaped space, and kinds it must leave alone.
FAKE_MOUNTS = """\
/dev/vda1 / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
tmpfs /run tmpfs rw 0 0
/dev/vda15 /boot/efi vfat rw 0 0
/dev/vdb /srv/with\\040space xfs rw 0 0
"""

FAKE_MOUNT = """\
#!/bin/sh
# IMGPREP-FAKE mount: records its arguments; fails for the mount point in /run/mount.fail
echo "$*" >> /run/mount.args
[ -f /run/mount.fail ] && [ "$3" = "$(cat /run/mount.fail)" ] && exit 32
exit 0
"""

FAKE_SLEEP = '#!/bin/sh\necho "sleep $*" >> /run/sleep.args\n'

FAKE_SYSTEMCTL = """\
#!/bin/sh
# A fake systemctl for the few verbs the runner uses, in systemctl's output format.
echo "$*" >> /run/systemctl.args
# the loaded services: before the script, stopped before it, stopped after it started,
# started after it, never started, and one that stopped by the time of the call
SERVICES="systemd-journald.service imgprep-prepare.service cron.service early-oneshot.service
stopped-later.service later.service never.service exited-meanwhile.service"
prop() {  # prop NAME UNIT
    case "$1:$2" in
    Id:*) echo "$2" ;;
    InactiveExitTimestampMonotonic:imgprep-prepare.service) echo 2000000 ;;
    ExecMainStartTimestampMonotonic:imgprep-prepare.service) echo 2100000 ;;
    InactiveExitTimestampMonotonic:systemd-journald.service) echo 900000 ;;
    InactiveExitTimestampMonotonic:cron.service) echo 1900000 ;;
    InactiveExitTimestampMonotonic:early-oneshot.service) echo 1000000 ;;
    InactiveEnterTimestampMonotonic:early-oneshot.service) echo 1100000 ;;
    InactiveExitTimestampMonotonic:stopped-later.service) echo 1000000 ;;
    InactiveEnterTimestampMonotonic:stopped-later.service) echo 999999999999999 ;;
    InactiveExitTimestampMonotonic:later.service) echo 999999999999999 ;;
    InactiveExitTimestampMonotonic:exited-meanwhile.service) echo 1000000 ;;
    InactiveEnterTimestampMonotonic:exited-meanwhile.service)  # just now: inactive again
        read -r up _ </proc/uptime; echo $(( ${up%.*}${up#*.} * 10000 )) ;;
    ActiveEnterTimestampMonotonic:local-fs.target) echo 1800000 ;;
    ActiveEnterTimestampMonotonic:basic.target) echo 999999999999999 ;;
    ActiveEnterTimestampMonotonic:sysinit.target) cat /run/sysinit.reached 2>/dev/null || echo 0 ;;
    UserspaceTimestampMonotonic:*) echo 1500000 ;;
    DefaultDependencies:cron.service | DefaultDependencies:later.service) echo yes ;;
    DefaultDependencies:never.service) echo yes ;;
    DefaultDependencies:*) echo no ;;
    *) echo 0 ;;
    esac
}
verb=$1
shift
case "$verb" in
show)  # show [-p PROP]... [--value] [UNIT]...
    props=""
    value=no
    states=""
    while [ $# -gt 0 ]; do
        case "$1" in
        -p) props="$props $2"; shift 2 ;;
        --value) value=yes; shift ;;
        --state=*) states=",${1#--state=},"; shift ;;
        *) break ;;
        esac
    done
    [ $# -gt 0 ] || set -- manager
    units=""
    for unit in "$@"; do  # a pattern matches the loaded units in --state, as systemctl's does
        if [ "$unit" = "*.service" ]; then
            for s in $SERVICES; do
                case $s in
                systemd-journald.service | cron.service | stopped-later.service) state=active ;;
                imgprep-prepare.service) state=activating ;;
                *) state=inactive ;;
                esac
                case $states in "" | *",$state,"*) units="$units $s" ;; esac
            done
        else
            units="$units $unit"
        fi
    done
    first=yes
    for unit in $units; do
        [ $first = yes ] || echo  # a blank line between units
        first=no
        for p in $props; do
            if [ $value = yes ]; then prop "$p" "$unit"; else echo "$p=$(prop "$p" "$unit")"; fi
        done
    done ;;
poweroff) ;;
esac
exit 0
"""


@pytest.fixture(scope="module")
def namespaces() -> None:
    """A private mount namespace with bind mounts over the fixed paths, and the real
    systemctl at /usr/bin/systemctl to bind the fake over."""
    requires("mount-namespaces", "usr-bin-systemctl")
    for target in MOUNTS.values():
        assert Path(target).is_dir(), f"{target} is not a directory here"


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: bytes
    stderr: bytes
    messages: list[tuple[str, str]]
    status: GuestStatus
    tree: Path
    channel: Path

    def host(self, guest_path: str) -> Path:
        """Where a guest path of the fake tree lives on the host."""
        for name, mount in MOUNTS.items():
            if guest_path == mount or guest_path.startswith(mount + "/"):
                return self.tree / name / guest_path[len(mount) :].lstrip("/")
        raise AssertionError(f"{guest_path} is not in the fake tree")

    @property
    def kinds(self) -> list[str]:
        return [kind if kind != "state" else f"state:{text}" for kind, text in self.messages]


def make_tree(
    tmp_path: Path,
    script: str,
    *,
    timeout: int = 30,
    armed: bool = True,
    remove: list[str] | None = None,
    fast: bool = False,
) -> Run:
    tree = tmp_path / "tree"
    for name in MOUNTS:
        (tree / name).mkdir(parents=True)
    run = Run(0, b"", b"", [], GuestStatus(), tree, tmp_path / "chan 'nel' $x.log")
    prefix = run.host(PREFIX)
    prefix.mkdir(mode=0o700)
    shutil.copy2(artifact("units/imgprep-prepare-runner"), prefix / "runner")
    (prefix / "runner").chmod(0o755)
    (prefix / "operator-script").write_text(textwrap.dedent(script))
    # what inject() writes: the unit and its wants link
    run.host(UNIT_PATH).write_text("[Unit]\n")
    run.host(WANTS_DIR).mkdir()
    run.host(wants_link("early")).symlink_to(UNIT_PATH)
    # controls: things that are not imgprep's must survive the cleanup
    run.host("/etc/systemd/system/keep.service").write_text("[Unit]\n")
    run.host("/var/lib/other-app").mkdir()
    run.host("/var/lib/other-app/state").write_text("keep me\n")
    fake = tree / "systemctl"
    fake.write_text(FAKE_SYSTEMCTL)
    fake.chmod(0o755)
    if fast:
        (tree / "proc").mkdir()
        (tree / "proc" / "imgprep-fake").write_text("yes\n")
        (tree / "proc" / "mounts").write_text(FAKE_MOUNTS)
        (tree / "proc" / "sysrq-trigger").write_text("untouched\n")
        (tree / "kmsg").write_text("")
        for name, text in (("mount", FAKE_MOUNT), ("sleep", FAKE_SLEEP)):
            (tree / name).write_text(text)
            (tree / name).chmod(0o755)
    if armed:
        (prefix / "armed").write_text(
            render_armed(
                channel=str(run.channel),
                script_timeout=timeout,
                remove=remove if remove is not None else [UNIT_PATH, wants_link("early")],
                rmdirs=[WANTS_DIR],
                fast_poweroff=fast,
            )
        )
    return run


def run_runner(run: Run) -> Run:
    fast = (run.tree / "proc").is_dir()
    proc = subprocess.run(
        [*UNSHARE, "/bin/sh", "-c", NAMESPACE_SCRIPT, "sh", str(run.tree), "fast" if fast else "unit"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "LANG": "C"},
        timeout=120,
        check=False,
    )
    run.returncode, run.stdout, run.stderr = proc.returncode, proc.stdout, proc.stderr
    if run.channel.exists():
        parser = ChannelParser()
        run.messages = parser.feed(run.channel.read_bytes())
        run.status = parser.status
    return run


def assert_cleaned_up(run: Run) -> None:
    assert not run.host(PREFIX).exists()
    assert not run.host(UNIT_PATH).exists()
    assert not run.host(wants_link("early")).is_symlink()
    assert not run.host(WANTS_DIR).exists()  # emptied, so removed
    # the controls survived
    assert run.host("/etc/systemd/system/keep.service").exists()
    assert run.host("/var/lib/other-app/state").read_text() == "keep me\n"


def test_success(namespaces: None, tmp_path: Path) -> None:
    run = run_runner(
        make_tree(
            tmp_path,
            """\
            #!/bin/sh
            echo "cleaning up"
            echo "path=$PATH"
            echo marker > /run/script-ran
            [ -e /run/systemctl.args ] || echo none > /run/systemctl-calls-before-script
            """,
        )
    )
    assert run.returncode == 0, run.stderr
    assert run.kinds == ["state:running", "log", "report", "state:success"]
    assert run.status.seen_states == ["running", "success"]
    assert run.status.error is None
    assert run.status.log == f"cleaning up\npath={GUEST_PATH}"
    assert (run.tree / "run" / "script-ran").read_text() == "marker\n"
    assert (run.tree / "run" / "systemctl-calls-before-script").read_text() == "none\n"
    report = run.status.report
    assert report is not None
    assert report["unit"] == UNIT_NAME
    assert report["script_exit"] == 0
    assert report["unit_start_us"] == 2000000
    assert report["exec_start_us"] == 2100000  # systemd forked the runner
    assert report["userspace_us"] == 1500000
    # up at some time while the script ran: not the unit itself, not one stopped before
    # the script or started after it, nor one never started
    assert report["services"] == ["systemd-journald.service", "cron.service", "stopped-later.service"]
    assert report["late_services"] == ["cron.service"]  # default dependencies, started before the end
    assert report["targets"] == {
        "local-fs.target": "active",
        "sysinit.target": "inactive",  # not reached
        "basic.target": "inactive",  # reached only after the script
        "network.target": "inactive",
        "multi-user.target": "inactive",
    }
    assert report["poweroff"] == "unit"
    stamps = ["script_start_us", "script_end_us", "sync_start_us", "clean_us", "finish_us"]
    assert report[stamps[0]] > 0
    assert [report[k] for k in stamps] == sorted(report[k] for k in stamps)
    assert_cleaned_up(run)
    calls = (run.tree / "run" / "systemctl.args").read_text().splitlines()
    # no systemctl call before the script; afterwards the manager's timestamps and one
    # show of this unit, the targets and only the services not inactive (sysinit.target
    # not reached: every one with default dependencies waits for it)
    assert len(calls) == 2
    show = next(c for c in calls if "InactiveExitTimestampMonotonic" in c)
    assert "--state=active,activating,deactivating,reloading,failed" in show
    targets = "local-fs.target sysinit.target basic.target network.target multi-user.target"
    assert show.endswith(f"{UNIT_NAME} {targets} *.service")
    assert not any("poweroff" in c for c in calls)
    # the script's full output stays in the guest's /run (a tmpfs, not part of the image)
    assert "cleaning up" in (run.tree / "run" / "imgprep-prepare.log").read_text()


def test_once_sysinit_target_is_reached_every_loaded_service_is_read(namespaces: None, tmp_path: Path) -> None:
    """The legacy placement (after multi-user.target): the ordering proof no longer
    holds, so the runner reads the timestamps of every loaded service too."""
    run = run_runner(make_tree(tmp_path, "#!/bin/sh\necho 1700000 > /run/sysinit.reached\n"))
    assert run.returncode == 0, run.stderr
    shows = [c for c in (run.tree / "run" / "systemctl.args").read_text().splitlines() if "InactiveExit" in c]
    assert len(shows) == 2
    assert "--state=" not in shows[1]
    assert shows[1].endswith("ExecMainStartTimestampMonotonic *.service")
    assert run.status.report is not None
    assert run.status.report["targets"]["sysinit.target"] == "active"
    # every loaded service that was up in the window, whatever its state now
    assert run.status.report["services"] == [
        "systemd-journald.service",
        "cron.service",
        "stopped-later.service",
        "exited-meanwhile.service",
    ]


def test_script_failure_reports_the_error_before_the_final_state(namespaces: None, tmp_path: Path) -> None:
    run = run_runner(
        make_tree(
            tmp_path,
            """\
            #!/bin/sh
            echo "removing keys"
            echo "boom: cannot remove /etc/ssh/key" >&2
            exit 3
            """,
        )
    )
    assert run.returncode == 1
    assert run.kinds == ["state:running", "log", "error", "report", "state:error"]
    assert run.kinds.index("error") < run.kinds.index("state:error")
    assert run.status.state == "error"
    assert run.status.error == "operator script exited with status 3\nremoving keys\nboom: cannot remove /etc/ssh/key"
    assert run.status.report is not None
    assert run.status.report["script_exit"] == 3
    assert_cleaned_up(run)  # cleanup happens on failure too


def test_script_timeout(namespaces: None, tmp_path: Path) -> None:
    run = run_runner(
        make_tree(
            tmp_path,
            """\
            #!/bin/sh
            echo started
            exec sleep 120
            """,
            timeout=1,
        )
    )
    assert run.returncode == 1
    assert run.kinds == ["state:running", "log", "error", "report", "state:error"]
    assert run.status.error is not None
    assert run.status.error.startswith("operator script timed out after 1s\nstarted")
    assert run.status.report is not None
    assert run.status.report["script_exit"] == 124
    assert_cleaned_up(run)


def test_cleanup_failure_is_an_error_even_when_the_script_succeeded(namespaces: None, tmp_path: Path) -> None:
    stubborn = "/etc/systemd/system/stubborn.d"  # rm -f cannot remove a non-empty directory
    run = make_tree(tmp_path, "#!/bin/sh\necho ok\n", remove=[UNIT_PATH, wants_link("early"), stubborn])
    run.host(stubborn).mkdir()
    (run.host(stubborn) / "x").write_text("")
    run = run_runner(run)
    assert run.returncode == 1
    assert run.kinds == ["state:running", "log", "error", "report", "state:error"]
    assert run.status.error is not None
    assert run.status.error.startswith(f"imgprep cleanup failed: cannot remove {stubborn}; {stubborn} still present;")
    assert run.status.report is not None
    assert run.status.report["script_exit"] == 0
    assert not run.host(UNIT_PATH).exists()  # the rest was still removed
    assert not run.host(PREFIX).exists()


def test_unarmed_runner_does_nothing_and_says_nothing(namespaces: None, tmp_path: Path) -> None:
    run = run_runner(make_tree(tmp_path, "#!/bin/sh\necho should not run > /run/ran\n", armed=False))
    assert run.returncode == 0
    assert run.stdout == b""
    assert run.stderr == b""
    assert not run.channel.exists()
    assert not (run.tree / "run" / "ran").exists()
    assert not (run.tree / "run" / "systemctl.args").exists()
    assert run.host(PREFIX + "/runner").exists()  # nothing removed
    assert run.host(UNIT_PATH).exists()
    assert os.listdir(run.tree / "run") == []


FAKE_MDATA_PUT = """\
#!/bin/sh
# records each call as: key TAB base64(value)
[ $# -eq 2 ] || { echo "usage: mdata-put <keyname> [<value>]" >&2; exit 3; }
printf '%s\\t%s\\n' "$1" "$(printf '%s' "$2" | base64 -w0)" >> /run/mdata.calls
"""


def mdata_calls(run: Run) -> list[tuple[str, str]]:
    import base64

    path = run.tree / "run" / "mdata.calls"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(k, base64.b64decode(v).decode()) for k, _, v in (line.partition("\t") for line in lines)]


def make_mdata_tree(tmp_path: Path, script: str) -> Run:
    """An lx zone's runner: it reports through mdata-put instead of a serial port."""
    run = make_tree(tmp_path, script, armed=False)
    fake = run.host("/var/lib/native-sbin/mdata-put")
    fake.parent.mkdir()
    fake.write_text(FAKE_MDATA_PUT)
    fake.chmod(0o755)
    (run.host(PREFIX) / "armed").write_text(
        render_armed(
            channel="mdata:/var/lib/native-sbin/mdata-put",
            script_timeout=30,
            remove=[UNIT_PATH, wants_link("early")],
            rmdirs=[WANTS_DIR],
        )
    )
    return run


def test_mdata_channel_reports_through_the_metadata_contract(namespaces: None, tmp_path: Path) -> None:
    run = run_runner(make_mdata_tree(tmp_path, "#!/bin/sh\necho cleaned\n"))
    assert run.returncode == 0, run.stderr
    assert not run.channel.exists()  # no serial protocol in this mode
    calls = mdata_calls(run)
    assert [k for k, _ in calls] == ["prepare-image:state", "imgprep:log", "imgprep:report", "prepare-image:state"]
    assert calls[0][1] == "running"
    assert calls[-1][1] == "success"
    assert calls[1][1] == "cleaned"
    assert "script_exit=0" in calls[2][1].splitlines()
    assert_cleaned_up(run)


def test_mdata_channel_writes_the_error_before_the_error_state(namespaces: None, tmp_path: Path) -> None:
    run = run_runner(make_mdata_tree(tmp_path, "#!/bin/sh\necho 'no space left' >&2\nexit 4\n"))
    assert run.returncode == 1
    calls = mdata_calls(run)
    keys = [k for k, _ in calls]
    assert keys == [
        "prepare-image:state",
        "imgprep:log",
        "prepare-image:error",
        "imgprep:report",
        "prepare-image:state",
    ]
    assert dict(calls)["prepare-image:error"] == "operator script exited with status 4\nno space left"
    assert calls[-1] == ("prepare-image:state", "error")
    assert_cleaned_up(run)


def test_output_tail_lines_are_capped(namespaces: None, tmp_path: Path) -> None:
    run = run_runner(
        make_tree(
            tmp_path,
            """\
            #!/bin/sh
            seq 1 60
            head -c 100000 /dev/zero | tr '\\0' x
            echo
            printf '\\033[31mred\\ttab\\001\\r\\n'
            echo short
            """,
        )
    )
    assert run.returncode == 0, run.stderr
    # the last 40 lines, in order, each cut to 200 characters, control characters other
    # than tab dropped
    assert run.status.log is not None
    lines = run.status.log.split("\n")
    assert lines == [str(k) for k in range(24, 61)] + ["x" * 200, "[31mred\ttab", "short"]
    # the whole line stays in the guest's /run log
    assert len((run.tree / "run" / "imgprep-prepare.log").read_text()) > 100000


def test_fast_poweroff_remounts_read_only_then_cuts_power(namespaces: None, tmp_path: Path) -> None:
    script = "#!/bin/sh\necho ok\n[ -e /run/imgprep-prepare.runner ] || echo absent > /run/copy-during-script\n"
    run = run_runner(make_tree(tmp_path, script, fast=True))
    assert run.returncode == 0, run.stderr
    assert run.kinds == ["state:running", "log", "report", "state:success"]
    assert run.status.report is not None
    assert run.status.report["poweroff"] == "fast"
    assert run.status.log == "ok"
    # every local filesystem, innermost first; not proc or tmpfs
    remounts = (run.tree / "run" / "mount.args").read_text().splitlines()
    assert remounts == ["-o remount,ro /srv/with space", "-o remount,ro /boot/efi", "-o remount,ro /"]
    assert (run.tree / "proc" / "sysrq-trigger").read_text() == "o\n"
    assert (run.tree / "kmsg").read_text() == "imgprep-prepare: reported, powering off\n"
    assert (run.tree / "run" / "sleep.args").read_text() == "sleep 30\n"  # waits for the kernel
    # after the script it ran from a copy in /run: the deleted original must not be held
    # open at the remount; the copy is made only after the script (nothing before it)
    copy = run.tree / "run" / "imgprep-prepare.runner"
    assert copy.read_bytes() == artifact("units/imgprep-prepare-runner").read_bytes()
    assert (run.tree / "run" / "copy-during-script").read_text() == "absent\n"
    assert_cleaned_up(run)
    calls = (run.tree / "run" / "systemctl.args").read_text().splitlines()
    assert not any("poweroff" in c for c in calls)  # sysrq worked: no fallback


def test_fast_poweroff_on_failure_too(namespaces: None, tmp_path: Path) -> None:
    run = run_runner(make_tree(tmp_path, "#!/bin/sh\necho failing\nexit 5\n", fast=True))
    assert run.returncode == 1
    assert run.kinds == ["state:running", "log", "error", "report", "state:error"]
    assert (run.tree / "proc" / "sysrq-trigger").read_text() == "o\n"


def test_fast_poweroff_falls_back_to_the_unit_when_a_remount_fails(namespaces: None, tmp_path: Path) -> None:
    run = make_tree(tmp_path, "#!/bin/sh\necho ok\n", fast=True)
    (run.tree / "run" / "mount.fail").write_text("/boot/efi")
    run = run_runner(run)
    assert run.returncode == 0, run.stderr
    assert run.status.report is not None
    assert run.status.report["poweroff"] == "unit: cannot remount /boot/efi read-only"
    assert (run.tree / "proc" / "sysrq-trigger").read_text() == "untouched\n"  # control: not cut
    assert not (run.tree / "run" / "sleep.args").exists()
