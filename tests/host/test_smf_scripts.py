"""The SmartOS guest side, run for real: the early-boot SMF method and the default
cleanup script (the manifest and the SMF ordering model: tests/unit/test_smf_model.py).

Nothing here touches the host: the shell scripts run under ``IMGPREP_ROOT`` (a prefix for
every path they touch) in a temporary directory, with fake
``mdata-put``, ``svccfg``, ``svcadm``, ``halt``... first on ``PATH``
(checked before every run). The scripts run under dash and ksh93 (illumos's ``/bin/sh``);
each shell is a capability (``tests.capabilities``), so CI fails without ksh93.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imgprep.channel import parse_report
from tests.capabilities import requires

REPO = Path(__file__).resolve().parents[2]
MANIFEST_PATH = REPO / "smf" / "imgprep-operator-script.xml"
METHOD_PATH = REPO / "smf" / "imgprep-operator-script"
PREPARE_PATH = REPO / "operator_scripts" / "smartos-prepare-image"
ZONE_DATA = REPO / "tests" / "data" / "smf"
OP = "svc:/site/imgprep/operator-script"


# --- the shell scripts: fakes and sandbox ------------------------------------

# dash (Debian's /bin/sh) and ksh93 (illumos's /bin/sh): each run requires its shell.
SHELLS = ("dash", "ksh93")

FAKE = """#!{python}
import json, os, signal, sys
name = os.path.basename(sys.argv[0])
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({{"cmd": name, "args": sys.argv[1:]}}) + "\\n")
if name == "zonename":
    print(os.environ.get("FAKE_ZONENAME", "f00dfeed-0000-4000-8000-000000000001"))
elif name in ("halt", "uadmin"):
    if os.environ.get("FAKE_HALT", "kill") == "kill":
        # the zone dies: so does the method that called halt
        os.kill(os.getppid(), signal.SIGKILL)
    sys.exit(1)
elif name == "svcprop":
    sys.exit(int(os.environ.get("FAKE_SVCPROP_RC", "0")))
elif name == "svcs":  # -H -o state,fmri [FMRI...]: FAKE_SVCS is "state fmri" lines
    lines = [l.split() for l in os.environ.get("FAKE_SVCS", "").splitlines() if l.strip()]
    wanted = [a for a in sys.argv[1:] if a.startswith("svc:/")]
    for state, fmri in lines:
        if not wanted or fmri in wanted:
            print(state, fmri)
elif name == "kstat":  # -p -m zones -n ZONENAME -s boot_time
    if "FAKE_BOOT_TIME" in os.environ:
        print("zones:7:%s:boot_time\t%s" % (sys.argv[sys.argv.index("-n") + 1], os.environ["FAKE_BOOT_TIME"]))
"""

# Commands that would act on the host if the real one ran: all must be fakes.
FAKED = (
    "mdata-put",
    "svccfg",
    "svcadm",
    "svcprop",
    "zonename",
    "halt",
    "uadmin",
    "shutdown",
    "poweroff",
    "reboot",
    "init",
    "sync",
    "passwd",
    "svcs",
    "kstat",
)


@dataclass
class Sandbox:
    root: Path
    fakebin: Path
    calls_file: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": f"{self.fakebin}:/usr/bin:/bin",
            "IMGPREP_ROOT": str(self.root),
            "FAKE_CALLS": str(self.calls_file),
            "LC_ALL": "C",
            "HOME": str(self.root / "root"),
        }
        env.update(extra)
        for cmd in FAKED:
            found = shutil.which(cmd, path=env["PATH"])
            assert found == str(self.fakebin / cmd), f"{cmd} would run {found}"
        return env

    def calls(self) -> list[dict[str, Any]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def put(self, rel: str, content: str = "", mode: int = 0o644) -> Path:
        path = self.root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode)
        return path


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    root = tmp_path / "zone"
    root.mkdir()
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    fake = FAKE.format(python=sys.executable)
    for cmd in FAKED:
        path = fakebin / cmd
        path.write_text(fake)
        path.chmod(0o755)
    return Sandbox(root, fakebin, tmp_path / "calls.jsonl")


def _run(
    shell: str, script: Path, sandbox: Sandbox, *args: str, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    requires(shell)
    return subprocess.run(
        [shell, str(script), *args],
        env=sandbox.env(**env),
        cwd=sandbox.root,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- the method script ------------------------------------------------------

MANIFEST_IN_ZONE = "var/svc/manifest/site/imgprep-operator-script.xml"
METHOD_IN_ZONE = "var/svc/method/imgprep-operator-script"
SMF_LOG_IN_ZONE = "var/svc/log/site-imgprep-operator-script:default.log"


def _install(sandbox: Sandbox, script: str | None, armed: str | None = "IMGPREP_SCRIPT_TIMEOUT=30\n") -> Path:
    """Lay the service out in the zone as the host does; returns the method to run."""
    sandbox.put(MANIFEST_IN_ZONE, MANIFEST_PATH.read_text())
    sandbox.put("var/svc/manifest/site/other-app.xml", "<service_bundle/>")
    method = sandbox.put(METHOD_IN_ZONE, METHOD_PATH.read_text(), 0o755)
    sandbox.put(SMF_LOG_IN_ZONE, "[ Executing start method ]\n")
    sandbox.put(SMF_LOG_IN_ZONE + ".0", "old\n")
    (sandbox.root / "var/run").mkdir(parents=True, exist_ok=True)
    if script is not None:
        sandbox.put("var/imgprep/operator-script", script, 0o644)
    if armed is not None:
        sandbox.put("var/imgprep/armed", armed)
    return method


def _mdata(sandbox: Sandbox) -> list[tuple[str, str]]:
    return [(c["args"][0], c["args"][1]) for c in sandbox.calls() if c["cmd"] == "mdata-put"]


def _cmds(sandbox: Sandbox) -> list[str]:
    return [" ".join([c["cmd"], *c["args"]]) for c in sandbox.calls() if c["cmd"] != "mdata-put"]


def _error(sandbox: Sandbox) -> dict[str, Any]:
    errors = [v for k, v in _mdata(sandbox) if k == "prepare-image:error"]
    assert len(errors) == 1
    value: dict[str, Any] = json.loads(errors[0])
    return value


def _assert_traces_removed(sandbox: Sandbox) -> None:
    for rel in (
        MANIFEST_IN_ZONE,
        METHOD_IN_ZONE,
        SMF_LOG_IN_ZONE,
        SMF_LOG_IN_ZONE + ".0",
        "var/imgprep",
        "var/run/imgprep-operator-script",
    ):
        assert not (sandbox.root / rel).exists(), rel
    # control: the neighbours stay
    assert (sandbox.root / "var/svc/manifest/site/other-app.xml").exists()
    assert (sandbox.root / "var/run").is_dir()


def _assert_teardown_then_halt(sandbox: Sandbox) -> None:
    # zonename, and the boot report's reads (kstat, svcs), before the teardown
    cmds = [c for c in _cmds(sandbox) if not c.startswith(("zonename", "kstat ", "svcs "))]
    match = re.search(r'^DEPENDENT_INSTANCES="([^"]*)"', METHOD_PATH.read_text(), re.MULTILINE)
    assert match
    holds = [f"svcadm disable -s -t {fmri}" for fmri in match.group(1).split()]
    assert cmds == [
        *holds,
        f"svccfg delete -f {OP}",
        "svccfg -s svc:/smf/manifest delpg var_svc_manifest_site_imgprep-operator-script_xml",
        "sync",
        "halt -l",
    ]


@pytest.mark.parametrize("shell", SHELLS)
def test_method_unarmed_does_nothing(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\ntouch /should-not-run\n", armed=None)
    result = _run(shell, method, sandbox, "start")
    assert result.returncode == 0, result.stderr
    assert "not armed" in result.stdout
    assert sandbox.calls() == []
    assert (sandbox.root / MANIFEST_IN_ZONE).exists()
    assert (sandbox.root / METHOD_IN_ZONE).exists()
    assert (sandbox.root / "var/imgprep/operator-script").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_method_success_reports_cleans_up_and_halts(shell: str, sandbox: Sandbox) -> None:
    script = textwrap.dedent(
        """\
        #!/bin/sh
        echo "cwd=$(pwd)" > "$IMGPREP_ROOT/ran"
        echo cleaning
        """
    )
    method = _install(sandbox, script)
    result = _run(shell, method, sandbox, "start")
    # the fake halt kills the method, as the zone's death would
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    assert (sandbox.root / "ran").read_text() == "cwd=/\n"
    assert [(k, v) for k, v in _mdata(sandbox) if k != "imgprep:report"] == [
        ("prepare-image:state", "running"),
        ("prepare-image:state", "success"),
    ]
    assert [k for k, _ in _mdata(sandbox)][-2:] == ["imgprep:report", "prepare-image:state"]
    _assert_teardown_then_halt(sandbox)
    _assert_traces_removed(sandbox)
    assert "halting the zone" in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_method_failure_sets_the_error_before_the_state(shell: str, sandbox: Sandbox) -> None:
    script = textwrap.dedent(
        """\
        #!/bin/sh
        i=1
        while [ $i -le 100 ]; do echo "line $i"; i=$((i + 1)); done
        printf 'quote " backslash \\\\ tab \\t bell \\a end\\n' >&2
        exit 3
        """
    )
    method = _install(sandbox, script)
    result = _run(shell, method, sandbox, "start")
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    keys = _mdata(sandbox)
    assert [k for k, _ in keys] == [
        "prepare-image:state",
        "prepare-image:error",
        "imgprep:report",
        "prepare-image:state",
    ]
    assert keys[0][1] == "running"
    assert keys[3][1] == "error"
    error = _error(sandbox)
    assert error["exit_status"] == 3
    assert error["timed_out"] is False
    assert error["timeout_seconds"] == 30
    assert "exit status 3" in error["message"]
    tail = error["output_tail"].split("\n")
    assert len(tail) == 40
    assert tail[-1] == 'quote " backslash \\ tab \t bell  end'  # control char dropped
    assert tail[-2] == "line 100"
    assert "line 1" not in tail
    _assert_teardown_then_halt(sandbox)
    _assert_traces_removed(sandbox)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie: a killed orphan stays one where PID 1 does
    not reap, as in containers)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _died_of(exit_status: int, sig: signal.Signals) -> bool:
    """The shell's status for a child killed by ``sig``: 128+N (dash), 256+N (ksh93)."""
    return exit_status in (128 + sig, 256 + sig)


@pytest.mark.parametrize("shell", SHELLS)
def test_method_kills_a_hung_script_and_still_halts(shell: str, sandbox: Sandbox) -> None:
    script = textwrap.dedent(
        """\
        #!/bin/sh
        echo "started"
        sleep 600 &
        echo $! > "$IMGPREP_ROOT/sleep.pid"
        wait
        """
    )
    method = _install(sandbox, script, armed="IMGPREP_SCRIPT_TIMEOUT=1\n")
    result = _run(shell, method, sandbox, "start")
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    error = _error(sandbox)
    assert error["timed_out"] is True
    # The script died of the TERM at the deadline, not of the KILL after the grace
    # period (the control: test_method_kills_a_script_that_ignores_sigterm).
    assert _died_of(error["exit_status"], signal.SIGTERM), error
    assert error["timeout_seconds"] == 1
    assert "timed out" in error["message"]
    assert error["output_tail"] == "started"
    assert [k for k, _ in _mdata(sandbox)][-3:] == ["prepare-image:error", "imgprep:report", "prepare-image:state"]
    sleep_pid = int((sandbox.root / "sleep.pid").read_text())
    assert not _alive(sleep_pid)  # the whole process tree was killed
    _assert_teardown_then_halt(sandbox)
    _assert_traces_removed(sandbox)


@pytest.mark.parametrize("shell", SHELLS)
def test_method_kills_a_script_that_ignores_sigterm(shell: str, sandbox: Sandbox) -> None:
    script = "#!/bin/sh\ntrap '' TERM\necho stubborn\nwhile :; do sleep 1; done\n"
    method = _install(sandbox, script, armed="IMGPREP_SCRIPT_TIMEOUT=1\n")
    result = _run(shell, method, sandbox, "start")
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    error = _error(sandbox)
    assert error["timed_out"] is True
    assert _died_of(error["exit_status"], signal.SIGKILL), error  # it survived the TERM
    assert _cmds(sandbox)[-1] == "halt -l"


@pytest.mark.parametrize("shell", SHELLS)
def test_method_reports_a_missing_operator_script(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, None)
    result = _run(shell, method, sandbox, "start")
    assert result.returncode == -signal.SIGKILL
    error = _error(sandbox)
    assert error["exit_status"] is None
    assert "missing" in error["message"]
    _assert_teardown_then_halt(sandbox)
    _assert_traces_removed(sandbox)


@pytest.mark.parametrize("shell", SHELLS)
def test_method_when_halt_returns_tries_uadmin_and_reports(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\nexit 0\n")
    result = _run(shell, method, sandbox, "start", FAKE_HALT="fail")
    assert result.returncode == 95  # SMF_EXIT_ERR_FATAL
    assert _cmds(sandbox)[-2:] == ["halt -l", "uadmin 2 0"]
    keys = _mdata(sandbox)
    assert [k for k, _ in keys[-3:]] == ["prepare-image:error", "imgprep:report", "prepare-image:state"]
    assert keys[-1] == ("prepare-image:state", "error")
    assert "could not halt" in _error(sandbox)["message"]


@pytest.mark.parametrize(
    ("armed", "expected"),
    [
        ("IMGPREP_SCRIPT_TIMEOUT=7\n", 7),
        ('IMGPREP_SCRIPT_TIMEOUT="8"\nOTHER=1\n', 8),
        ("# host\nexport IMGPREP_SCRIPT_TIMEOUT=0009\n", 9),
        ("IMGPREP_SCRIPT_TIMEOUT=$(reboot)\n", 300),
        ("IMGPREP_SCRIPT_TIMEOUT=0\n", 300),
        ("", 300),
        ("IMGPREP_SCRIPT_TIMEOUT=99999999999999999999\n", 82800),
    ],
)
def test_method_reads_the_timeout_without_sourcing_the_armed_file(armed: str, expected: int, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\nexit 1\n", armed=armed)
    result = _run("dash", method, sandbox, "start")
    assert result.returncode == -signal.SIGKILL
    assert _error(sandbox)["timeout_seconds"] == expected
    assert "reboot" not in [c["cmd"] for c in sandbox.calls()]


@pytest.mark.parametrize("shell", SHELLS)
def test_method_refuses_to_run_in_the_global_zone(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\nexit 0\n")
    result = _run(shell, method, sandbox, "start", FAKE_ZONENAME="global")
    assert result.returncode == 96
    assert [c["cmd"] for c in sandbox.calls()] == ["zonename"]
    assert (sandbox.root / "var/imgprep/armed").exists()


# --- smartos-prepare-image --------------------------------------------------

PREPARE_OPS = [
    "prepare.d",
    "ssh-host-keys",
    "root-ssh",
    "shell-history",
    "tmp-files",
    "package-cache",
    "at-jobs",
    "mail-spool",
    "network-state",
    "provisioning-state",
    "zoneinit",
    "logfiles",
]


def _prototype(sandbox: Sandbox, outside: Path) -> None:
    """A zone root with the prototype's leftovers (and things that must stay)."""
    put = sandbox.put
    put("var/ssh/ssh_host_rsa_key", "private")
    put("var/ssh/ssh_host_rsa_key.pub", "public")
    put("var/ssh/ssh_host_ed25519_key", "private")
    put("etc/ssh/ssh_host_dsa_key", "old sunssh key")
    put(
        "etc/ssh/sshd_config",
        "HostKey /var/ssh/ssh_host_rsa_key\nHostKey /var/ssh/ssh_host_ed25519_key\n",
    )
    put("root/.ssh/authorized_keys", "ssh-ed25519 AAAA operator")
    put("root/.ssh/known_hosts", "host key")
    put("root/.ssh/id_ed25519", "root's own key")
    put("root/.bash_history", "mysql -psecret")
    put("home/admin/.bash_history", "history")
    (sandbox.root / "home/admin/.lesshst").symlink_to("/dev/null")
    put("var/log/syslog", "prototype log\n")
    put("var/log/syslog.0", "rotated\n")
    put("var/log/app/app.log.1.gz", "compressed")
    put("var/adm/wtmpx", "logins")
    put("var/adm/utmpx", "logins")
    put("var/adm/lastlog", "lastlog")
    put("var/adm/messages", "kernel\n")
    put("var/adm/messages.1", "older\n")
    put("var/svc/log/pkgsrc-consul:default.log", "consul started\n")
    put("var/cron/log", "cron ran\n")
    (sandbox.root / "var/log/evil").symlink_to(outside)
    put("tmp/session", "x")
    put("tmp/.hidden", "x")
    put("var/tmp/build/deep/file", "x")
    put("opt/local/var/db/pkgin/cache/redis-7.0.tgz", "pkg")
    put("opt/local/var/db/pkgin/pkgin.db", "package db")
    put("var/spool/cron/crontabs/root", "0 * * * * logadm")
    put("var/spool/cron/atjobs/1700000000.a", "reboot")
    put("var/mail/root", "mail")
    put("var/spool/postfix/deferred/A/A1B2C3", "queued")
    put("etc/dhcp/net0.dhc", "lease")
    put("etc/hostname.net0", "10.0.0.5")
    put("etc/defaultrouter", "10.0.0.1")
    put("var/svc/provision_success", "")
    put("var/svc/mdata-user-script", "secret")
    put("var/db/consul/node-id", "the prototype's node id")
    put(
        "etc/imgprep/prepare.d/10-consul",
        '#!/bin/sh\nrm -f "$IMGPREP_ROOT/var/db/consul/node-id"\necho 10 >> "$IMGPREP_ROOT/hooks"\n',
        0o755,
    )
    put(
        "etc/imgprep/prepare.d/20-second",
        '#!/bin/sh\necho "20 $(pwd)" >> "$IMGPREP_ROOT/hooks"\n',
        0o755,
    )
    put("etc/imgprep/prepare.d/README", "not a hook", 0o644)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside-the-zone"
    path.write_text("must survive")
    return path


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_cleans_the_zone(shell: str, sandbox: Sandbox, outside: Path) -> None:
    _prototype(sandbox, outside)
    result = _run(shell, PREPARE_PATH, sandbox)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # one line per operation, in order; prepare.d also names each hook it runs or skips
    hook_lines = [line for line in lines if line.startswith("prepare.d: ")]
    assert hook_lines == [
        "prepare.d: running hook 10-consul",
        "prepare.d: running hook 20-second",
        "prepare.d: ignoring README (not an executable regular file)",
        "prepare.d: ran 2 hook(s) from /etc/imgprep/prepare.d",
    ]
    ops = [line.split(":", 1)[0] for line in lines[len(hook_lines) - 1 :]]
    assert ops == [*PREPARE_OPS, "smartos-prepare-image"]
    root = sandbox.root

    gone = [
        "var/ssh/ssh_host_rsa_key",
        "var/ssh/ssh_host_rsa_key.pub",
        "var/ssh/ssh_host_ed25519_key",
        "etc/ssh/ssh_host_dsa_key",
        "root/.ssh/authorized_keys",
        "root/.ssh/known_hosts",
        "root/.bash_history",
        "home/admin/.bash_history",
        "var/log/syslog.0",
        "var/log/app/app.log.1.gz",
        "var/adm/messages.1",
        "tmp/session",
        "tmp/.hidden",
        "var/tmp/build",
        "opt/local/var/db/pkgin/cache/redis-7.0.tgz",
        "var/spool/cron/atjobs/1700000000.a",
        "var/mail/root",
        "var/spool/postfix/deferred/A/A1B2C3",
        "etc/dhcp/net0.dhc",
        "etc/hostname.net0",
        "etc/defaultrouter",
        "var/svc/provision_success",
        "var/svc/mdata-user-script",
        "var/db/consul/node-id",  # by the hook
    ]
    assert [rel for rel in gone if (root / rel).exists() or (root / rel).is_symlink()] == []
    truncated = [
        "var/log/syslog",
        "var/adm/wtmpx",
        "var/adm/utmpx",
        "var/adm/lastlog",
        "var/adm/messages",
        "var/svc/log/pkgsrc-consul:default.log",
        "var/cron/log",
    ]
    assert {rel: (root / rel).stat().st_size for rel in truncated} == dict.fromkeys(truncated, 0)
    kept = [
        "root/.ssh/id_ed25519",
        "etc/ssh/sshd_config",
        "opt/local/var/db/pkgin/pkgin.db",
        "var/spool/cron/crontabs/root",
        "etc/imgprep/prepare.d/10-consul",
        "tmp",
        "var/tmp",
        "var/spool/postfix/deferred/A",
        "var/ssh",
    ]
    assert [rel for rel in kept if not (root / rel).exists()] == []
    assert (root / "home/admin/.lesshst").is_symlink()
    assert outside.read_text() == "must survive"  # the symlink in /var/log was not followed
    assert (root / "hooks").read_text() == f"10\n20 {root}\n"
    assert any("svc:/network/ssh creates /var/ssh/ssh_host_rsa_key" in line for line in lines)
    assert [" ".join([c["cmd"], *c["args"]]) for c in sandbox.calls() if c["cmd"] != "zonename"] == [
        "svcprop -q -p application/done svc:/system/zoneinit",
        "svccfg -s svc:/system/zoneinit setprop application/done = false",
        "svcadm refresh svc:/system/zoneinit",
    ]
    assert "halt" not in [c["cmd"] for c in sandbox.calls()]

    again = _run(shell, PREPARE_PATH, sandbox)
    assert again.returncode == 0, again.stderr
    assert "ssh-host-keys: removed 0 file(s)" in again.stdout
    assert "logfiles: truncated 0 file(s), removed 0 rotated" in again.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_a_failing_hook_fails_the_script(shell: str, sandbox: Sandbox, outside: Path) -> None:
    _prototype(sandbox, outside)
    sandbox.put("etc/imgprep/prepare.d/15-broken", "#!/bin/sh\necho oops\nexit 4\n", 0o755)
    result = _run(shell, PREPARE_PATH, sandbox)
    assert result.returncode != 0
    assert "prepare.d hook 15-broken failed with exit status 4" in result.stderr
    assert (sandbox.root / "hooks").read_text() == "10\n"  # 20-second never ran
    assert (sandbox.root / "var/ssh/ssh_host_rsa_key").exists()  # nothing else ran


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_warns_when_nothing_would_recreate_host_keys(shell: str, sandbox: Sandbox) -> None:
    sandbox.put("etc/ssh/sshd_config", "PermitRootLogin without-password\n")
    sandbox.put("var/ssh/ssh_host_rsa_key", "private")
    result = _run(shell, PREPARE_PATH, sandbox, FAKE_SVCPROP_RC="1")
    assert result.returncode == 0, result.stderr
    assert "ssh-host-keys: removed 1 file(s); WARNING: no HostKey" in result.stdout
    assert "zoneinit: not installed, nothing to reset" in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_refuses_the_global_zone(shell: str, sandbox: Sandbox, outside: Path) -> None:
    _prototype(sandbox, outside)
    result = _run(shell, PREPARE_PATH, sandbox, FAKE_ZONENAME="global")
    assert result.returncode != 0
    assert "global zone" in result.stderr
    assert (sandbox.root / "var/ssh/ssh_host_rsa_key").exists()


def _guard_only(tmp_path: Path) -> Path:
    """The script with its operations replaced by a marker: tests the guards without
    any chance of running the cleanup on this machine."""
    text = PREPARE_PATH.read_text()
    head, sep, _ = text.partition("\nop_hooks\n")
    assert sep
    path = tmp_path / "guard-only"
    path.write_text(head + "\nsay reached-operations\n")
    return path


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_refuses_to_run_outside_illumos_without_a_root(
    shell: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    guard = _guard_only(tmp_path)
    env = sandbox.env()
    del env["IMGPREP_ROOT"]
    refused = subprocess.run([shell, str(guard)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode != 0
    assert "refusing to run outside illumos" in refused.stderr
    assert "reached-operations" not in refused.stdout
    for bad_root in ("relative/dir", "/"):
        bad = subprocess.run(
            [shell, str(guard)],
            env={**env, "IMGPREP_ROOT": bad_root},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert bad.returncode != 0, bad_root
        assert "reached-operations" not in bad.stdout
    allowed = _run(shell, guard, sandbox)  # control
    assert allowed.returncode == 0, allowed.stderr
    assert "reached-operations" in allowed.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_image_helpers_refuse_paths_outside_the_root(
    shell: str, sandbox: Sandbox, outside: Path, tmp_path: Path
) -> None:
    text = PREPARE_PATH.read_text()
    helpers = text[text.index("# --- helpers") : text.index("# --- operations")]
    prelude = text[: text.index("# --- helpers")]
    probe = tmp_path / "probe"
    inside = sandbox.put("var/tmp/inside", "x")
    probe.write_text(
        prelude
        + helpers
        + f'n=0\nremove "{inside}"\nsay "inside removed: $n"\n'
        + f'remove "{outside}"\nsay "outside removed: $n"\n'
    )
    result = _run(shell, probe, sandbox)
    assert result.returncode != 0
    assert "inside removed: 1" in result.stdout
    assert "outside removed" not in result.stdout
    assert f"refusing to touch {outside}" in result.stderr
    assert not inside.exists()
    assert outside.read_text() == "must survive"
    dotdot = tmp_path / "probe2"
    dotdot.write_text(prelude + helpers + f'n=0\nremove "{sandbox.root}/../outside-the-zone"\n')
    refused = _run(shell, dotdot, sandbox)
    assert refused.returncode != 0
    assert "refusing path with '..'" in refused.stderr
    assert outside.exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_method_boot_report_lists_what_svcs_showed_online(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\nexit 0\n")
    svcs = "\n".join(
        [
            "online svc:/system/filesystem/minimal:default",
            "offline* svc:/site/imgprep/operator-script:default",
            "online svc:/system/filesystem/local:default",  # a dependent: should have waited
            "offline svc:/milestone/multi-user:default",
            "online svc:/network/loopback:default",
        ]
    )
    boot = int(time.time()) - 100
    _run(shell, method, sandbox, "start", FAKE_SVCS=svcs, FAKE_BOOT_TIME=str(boot))
    reports = [v for k, v in _mdata(sandbox) if k == "imgprep:report"]
    assert len(reports) == 1
    report = parse_report(reports[0])
    assert report["clock"] == "zone"
    assert report["zone_boot_time"] == str(boot)
    assert report["services"] == [
        "svc:/system/filesystem/minimal:default",
        "svc:/system/filesystem/local:default",
        "svc:/network/loopback:default",
    ]
    assert report["late_services"] == ["svc:/system/filesystem/local:default"]
    assert report["targets"]["svc:/milestone/multi-user:default"] == "offline"
    assert report["targets"]["svc:/system/filesystem/minimal:default"] == "online"
    # seconds since the zone booted, in microseconds, in order
    starts = [report[k] for k in ("unit_start_us", "script_start_us", "script_end_us", "finish_us")]
    assert all(isinstance(v, int) and v >= 100_000_000 and v % 1_000_000 == 0 for v in starts)
    assert starts == sorted(starts)
    assert report["script_exit"] == 0


@pytest.mark.parametrize("shell", SHELLS)
def test_method_boot_report_without_kstat_has_no_times(shell: str, sandbox: Sandbox) -> None:
    method = _install(sandbox, "#!/bin/sh\nexit 0\n")
    _run(shell, method, sandbox, "start", FAKE_SVCS="online svc:/network/loopback:default")
    (raw,) = [v for k, v in _mdata(sandbox) if k == "imgprep:report"]
    report = parse_report(raw)
    assert report["services"] == ["svc:/network/loopback:default"]  # the control: svcs was read
    assert report["script_start_us"] is None
    assert report["timeline_ms"]["script_start"] is None
