"""Guest-side artifacts (``units/``, ``smf/``, ``operator_scripts/``) and pure renderers.

The artifacts are plain files in the source tree; a wheel carries them under
``imgprep/_data``. Rendering only substitutes a few ``@NAME@`` placeholders, so the
files stay readable and ``systemd-analyze verify`` can check the rendered result.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

_PACKAGE = Path(__file__).resolve().parent

PREFIX = "/var/lib/imgprep-prepare"
UNIT_NAME = "imgprep-prepare.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
Mode = Literal["early", "legacy"]
WANTED_BY: dict[Mode, str] = {"early": "sysinit.target", "legacy": "multi-user.target"}
# The unit's own start timeout: the script's limit plus time for cleanup and reporting.
UNIT_TIMEOUT_MARGIN = 60


def artifact(relpath: str) -> Path:
    """Path of a guest artifact, e.g. ``units/imgprep-prepare.service``."""
    for root in (_PACKAGE / "_data", _PACKAGE.parent):
        candidate = root / relpath
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"imgprep artifact {relpath} is missing from this installation")


def _substitute(template: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    # placeholders sit inside words ("TimeoutStartSec=@X@"); comments may mention them
    body = "\n".join(line for line in template.splitlines() if not line.lstrip().startswith("#"))
    leftover = re.findall(r"@[A-Z][A-Z0-9_]*@", body)
    if leftover:
        raise ValueError(f"unrendered placeholders: {leftover}")
    return template


def render_unit(mode: Mode, script_timeout: int) -> str:
    name = "imgprep-prepare.service" if mode == "early" else "imgprep-prepare-legacy.service"
    template = artifact(f"units/{name}").read_text()
    return _substitute(template, {"TIMEOUT_START_SEC": str(script_timeout + UNIT_TIMEOUT_MARGIN)})


def wants_link(mode: Mode) -> str:
    return f"/etc/systemd/system/{WANTED_BY[mode]}.wants/{UNIT_NAME}"


def render_armed(
    *,
    channel: str,
    script_timeout: int,
    remove: Sequence[str],
    rmdirs: Sequence[str],
    fast_poweroff: bool = False,
) -> str:
    """The shell-sourced file that arms the runner. Every value is quoted.

    ``fast_poweroff``: the runner remounts every local filesystem read-only after its
    cleanup and then powers the guest off at once (sysrq, i.e. reboot(2)) instead of
    letting systemd stop units and unmount; it falls back to the unit's
    SuccessAction/FailureAction if a remount fails."""
    values = {
        "IMGPREP_CHANNEL": channel,
        "IMGPREP_POWEROFF": "fast" if fast_poweroff else "unit",
        "IMGPREP_SCRIPT_TIMEOUT": str(script_timeout),
        "IMGPREP_UNIT": UNIT_NAME,
        "IMGPREP_REMOVE": " ".join(remove),
        "IMGPREP_RMDIRS": " ".join(rmdirs),
    }
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


@dataclasses.dataclass(frozen=True)
class GuestFile:
    """One file (or, with ``link``, a symlink to ``link``) a Linux guest gets, by absolute path."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    link: str = ""


def linux_injection(
    *, mode: Mode, script: bytes, script_timeout: int, channel: str, wants_dir_exists: bool
) -> list[GuestFile]:
    """What a systemd guest gets for the prepare boot, in the order to write it: the
    operator script, the runner, the unit, its wants link, and last the armed file (a
    partial injection never runs). Files under PREFIX belong in a 0700 directory; the
    wants directory, if the guest lacks it, is created by the caller and removed by the
    runner. The fast power-off is for the early unit on a serial channel only: in the
    legacy placement daemons hold files open (a read-only remount would fail), and an
    lx zone (``mdata:`` channel) is halted by its zone, not by a kernel of its own."""
    link = wants_link(mode)
    armed = render_armed(
        fast_poweroff=mode == "early" and not channel.startswith("mdata:"),
        channel=channel,
        script_timeout=script_timeout,
        remove=[UNIT_PATH, link],
        rmdirs=[] if wants_dir_exists else [str(Path(link).parent)],
    )
    return [
        GuestFile(f"{PREFIX}/operator-script", script, 0o700),
        GuestFile(f"{PREFIX}/runner", artifact("units/imgprep-prepare-runner").read_bytes(), 0o755),
        GuestFile(UNIT_PATH, render_unit(mode, script_timeout).encode(), 0o644),
        GuestFile(link, link=UNIT_PATH),
        GuestFile(f"{PREFIX}/armed", armed.encode(), 0o600),
    ]


VERIFY_PREFIX = "/var/lib/imgprep-verify"
VERIFY_UNIT_NAME = "imgprep-verify.service"
VERIFY_UNIT_PATH = f"/etc/systemd/system/{VERIFY_UNIT_NAME}"
VERIFY_WANTS = f"/etc/systemd/system/multi-user.target.wants/{VERIFY_UNIT_NAME}"


def verify_injection(*, channel: str, settle_timeout: int, identity_list: str) -> list[GuestFile]:
    """What the overlay of a verification boot gets (never the image): the verification
    unit, its runner, the identity list it hashes, and last the armed file."""
    armed = "".join(
        f"{k}={shlex.quote(v)}\n"
        for k, v in {"IMGPREP_CHANNEL": channel, "IMGPREP_SETTLE_TIMEOUT": str(settle_timeout)}.items()
    )
    return [
        GuestFile(f"{VERIFY_PREFIX}/runner", artifact("units/imgprep-verify-runner").read_bytes(), 0o755),
        GuestFile(f"{VERIFY_PREFIX}/identities", identity_list.encode(), 0o600),
        GuestFile(VERIFY_UNIT_PATH, artifact(f"units/{VERIFY_UNIT_NAME}").read_bytes(), 0o644),
        GuestFile(VERIFY_WANTS, link=VERIFY_UNIT_PATH),
        GuestFile(f"{VERIFY_PREFIX}/armed", armed.encode(), 0o600),
    ]


def nocloud_seed(instance_id: str) -> list[GuestFile]:
    """A NoCloud seed with a fresh instance-id: cloud-init treats the boot as a new instance."""
    return [
        GuestFile(
            NOCLOUD_SEED + "/meta-data", f"instance-id: {instance_id}\nlocal-hostname: imgprep-verify\n".encode()
        ),
        GuestFile(NOCLOUD_SEED + "/user-data", b"#cloud-config\n"),
    ]


NOCLOUD_SEED = "/var/lib/cloud/seed/nocloud"
