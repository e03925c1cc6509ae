"""Guest artifacts: rendered units against expected text and the real ``systemd-analyze verify``,
and the armed file's quoting against the real ``/bin/sh``."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgprep import artifacts
from imgprep.artifacts import (
    PREFIX,
    UNIT_NAME,
    UNIT_PATH,
    Mode,
    _substitute,
    artifact,
    linux_injection,
    render_armed,
    render_unit,
    wants_link,
)
from tests.capabilities import requires

SYSTEM_UNITS = Path("/lib/systemd/system")

# Every directive of the rendered units (comments may be reworded freely).
EARLY_DIRECTIVES = """\
[Unit]
Description=imgprep early operator script (prepare image)
DefaultDependencies=no
ConditionPathExists=/var/lib/imgprep-prepare/armed
Requires=local-fs.target
After=local-fs.target systemd-remount-fs.service
Before=sysinit.target cloud-init-local.service systemd-journal-flush.service
Before=systemd-random-seed.service systemd-machine-id-commit.service
Before=systemd-update-utmp.service systemd-tmpfiles-setup.service
Conflicts=shutdown.target
Before=shutdown.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/var/lib/imgprep-prepare/runner
TimeoutStartSec=360
StandardOutput=journal+console
StandardError=journal+console
"""

LEGACY_DIRECTIVES = """\
[Unit]
Description=imgprep operator script, late placement (legacy, benchmark only)
ConditionPathExists=/var/lib/imgprep-prepare/armed
After=multi-user.target network.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/var/lib/imgprep-prepare/runner
TimeoutStartSec=360
StandardOutput=journal+console
StandardError=journal+console
"""


def directives(unit: str) -> str:
    return "".join(line + "\n" for line in unit.splitlines() if not line.startswith("#"))


# --- render functions ---------------------------------------------------------------


def test_early_unit_renders_to_the_expected_text() -> None:
    unit = render_unit("early", 300)
    assert directives(unit) == EARLY_DIRECTIVES
    assert unit.startswith("# imgprep's early-boot operator-script unit")
    assert "@" not in unit


def test_legacy_unit_renders_to_the_expected_text() -> None:
    assert directives(render_unit("legacy", 300)) == LEGACY_DIRECTIVES


def test_unit_timeout_is_the_script_limit_plus_the_margin() -> None:
    assert f"TimeoutStartSec={45 + artifacts.UNIT_TIMEOUT_MARGIN}\n" in render_unit("early", 45)


def test_wants_links() -> None:
    assert wants_link("early") == f"/etc/systemd/system/sysinit.target.wants/{UNIT_NAME}"
    assert wants_link("legacy") == f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}"
    assert f"/etc/systemd/system/{UNIT_NAME}" == UNIT_PATH


def test_artifact_lookup() -> None:
    assert artifact("units/imgprep-prepare-runner").read_text().startswith("#!/bin/sh\n")
    with pytest.raises(FileNotFoundError, match="units/nope"):
        artifact("units/nope")


@pytest.mark.parametrize(
    "template",
    [
        "TimeoutStartSec=@TIMEOUT_START_SEC@\n",  # the form the units use
        "ExecStart=@RUNNER@ --flag\n",
        "@ALONE@\n",
    ],
)
def test_unrendered_placeholders_are_refused(template: str) -> None:
    with pytest.raises(ValueError, match="unrendered placeholders"):
        _substitute(template, {"OTHER": "x"})


def test_placeholders_in_comments_and_plain_at_signs_are_fine() -> None:
    assert _substitute("# mentions @TIMEOUT_START_SEC@\nUser=a@b\nX=@V@\n", {"V": "1"}) == (
        "# mentions @TIMEOUT_START_SEC@\nUser=a@b\nX=1\n"
    )


# --- systemd-analyze verify ----------------------------------------------------------


@pytest.fixture(scope="module")
def system_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root tree for ``systemd-analyze verify --root``: the host's stock units (read only
    copies), plus the real runner at the unit's ExecStart path."""
    requires("systemd-analyze", "stock-systemd-units")
    root = tmp_path_factory.mktemp("sysroot")
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    runner = root / PREFIX.lstrip("/") / "runner"
    runner.parent.mkdir(parents=True)
    shutil.copy2(artifact("units/imgprep-prepare-runner"), runner)
    runner.chmod(0o755)
    return root


@pytest.fixture
def unit_dir(system_root: Path) -> Iterator[Path]:
    path = system_root / "etc/systemd/system"
    path.mkdir(parents=True, exist_ok=True)
    yield path
    shutil.rmtree(path)


def verify(root: Path, *units: str) -> str:
    """Run the real validator; return everything it said (it exits 0 on mere warnings,
    such as an unknown key, so anything it prints counts as a finding)."""
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    return (proc.stdout + proc.stderr + (f"\nexit status {proc.returncode}" if proc.returncode else "")).strip()


def install(unit_dir: Path, text: str, mode: artifacts.Mode) -> None:
    (unit_dir / UNIT_NAME).write_text(text)
    link = unit_dir.parent.parent.parent / wants_link(mode).lstrip("/")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(UNIT_PATH)


@pytest.mark.allow_subprocess("systemd-analyze")
@pytest.mark.parametrize("mode", ["early", "legacy"])
def test_rendered_unit_passes_systemd_analyze_verify(system_root: Path, unit_dir: Path, mode: artifacts.Mode) -> None:
    install(unit_dir, render_unit(mode, 300), mode)
    target = artifacts.WANTED_BY[mode]
    # the unit itself, and the target that pulls it in through the wants link
    assert verify(system_root, UNIT_NAME, target) == ""


@pytest.mark.allow_subprocess("systemd-analyze")
def test_control_success_action_in_service_section_is_caught(system_root: Path, unit_dir: Path) -> None:
    """The bug class from DESIGN.md: SuccessAction= under [Service] is silently ignored at
    boot (the boot goes on into the daemons). Prove the check above would catch it."""
    lines = render_unit("early", 300).splitlines()
    moved = [ln for ln in lines if not ln.startswith("SuccessAction=")]
    at = moved.index("[Service]") + 1
    moved[at:at] = ["SuccessAction=poweroff-force"]
    (unit_dir / UNIT_NAME).write_text("\n".join(moved) + "\n")
    findings = verify(system_root, UNIT_NAME)
    assert "Unknown key 'SuccessAction' in section [Service]" in findings
    # (FailureAction= is still accepted under [Service], as a pre-v236 compatibility alias,
    # so only SuccessAction= shows this bug class.)


@pytest.mark.allow_subprocess("systemd-analyze")
def test_control_missing_runner_is_caught(system_root: Path, unit_dir: Path) -> None:
    """The verify root is really used: without the runner at ExecStart, verify complains."""
    (unit_dir / UNIT_NAME).write_text(render_unit("early", 300).replace("/runner", "/no-such-runner"))
    assert "no-such-runner is not executable" in verify(system_root, UNIT_NAME)


# --- the armed file ------------------------------------------------------------------

HOSTILE = "/dev/tty S0 'single' \"double\" $(touch CANARY1) `touch CANARY2` ; touch CANARY3 \\ $HOME *\nline2"


def source_with_sh(armed: str, cwd: Path) -> list[str]:
    path = cwd / "armed"
    path.write_text(armed)
    proc = subprocess.run(
        [
            "/bin/sh",
            "-c",
            '. "$1" && printf "%s\\0" "$IMGPREP_CHANNEL" "$IMGPREP_SCRIPT_TIMEOUT" "$IMGPREP_UNIT" '
            '"$IMGPREP_REMOVE" "$IMGPREP_RMDIRS"',
            "sh",
            str(path),
        ],
        cwd=cwd,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=True,
    )
    return proc.stdout.decode().split("\0")[:-1]


@pytest.mark.allow_subprocess("sh")
def test_render_armed_quotes_hostile_values(tmp_path: Path) -> None:
    armed = render_armed(
        channel=HOSTILE,
        script_timeout=300,
        remove=["/etc/a b", "/etc/$(touch CANARY4)"],
        rmdirs=["/etc/'q'"],
    )
    values = source_with_sh(armed, tmp_path)
    assert values == [HOSTILE, "300", UNIT_NAME, "/etc/a b /etc/$(touch CANARY4)", "/etc/'q'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["armed"]  # no command ran


@pytest.mark.allow_subprocess("sh")
def test_render_armed_plain_values(tmp_path: Path) -> None:
    armed = render_armed(channel="/dev/ttyS1", script_timeout=60, remove=[UNIT_PATH, wants_link("early")], rmdirs=[])
    assert armed.splitlines()[0] == "IMGPREP_CHANNEL=/dev/ttyS1"
    assert source_with_sh(armed, tmp_path) == [
        "/dev/ttyS1",
        "60",
        UNIT_NAME,
        f"{UNIT_PATH} {wants_link('early')}",
        "",
    ]


@pytest.mark.allow_subprocess("sh")
@pytest.mark.parametrize(
    ("mode", "channel", "expected"),
    [("early", "/dev/ttyS1", "fast"), ("legacy", "/dev/ttyS1", "unit"), ("early", "mdata:/usr/sbin/mdata-put", "unit")],
)
def test_fast_poweroff_only_for_the_early_unit_on_a_serial_channel(
    tmp_path: Path, mode: Mode, channel: str, expected: str
) -> None:
    files = linux_injection(mode=mode, script=b"#!/bin/sh\n", script_timeout=60, channel=channel, wants_dir_exists=True)
    armed = next(f for f in files if f.path.endswith("/armed"))
    path = tmp_path / "armed"
    path.write_bytes(armed.data)
    proc = subprocess.run(
        ["/bin/sh", "-c", '. "$1" && printf %s "$IMGPREP_POWEROFF"', "sh", str(path)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=True,
    )
    assert proc.stdout.decode() == expected
