"""The verification of an exported image: what its first boot reported, and the verdict.

After the export, the libvirt backend boots the image once as a throwaway
(imgprep.verifyboot); the verification unit (``units/imgprep-verify.service`` and its
runner) reports one ``IMGPREP1 verify`` message of ``key=value`` lines over the guest
channel. Everything in it is the guest's claim and hostile: :func:`parse_report` keeps
only known keys whose values match strict patterns (bounded in count and length; any
free text is escaped by ``sanitize.clean``), and :func:`decide` compares it with what
the host knows (the prototype's identity hashes, taken during inject) and returns the
checks. The host decides; a guest can make its verification fail, never pass what the
checks do not see.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from imgprep import identities
from imgprep.errors import ImgprepError
from imgprep.sanitize import clean

MAX_UNITS = 512  # failed units and services kept
MAX_LINES = 16  # kernel/fsck evidence lines kept
MAX_KEYS = 16  # ssh host keys kept
MAX_IDENTITY_FILES = 256
LINE_MAX = 300

_UNIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.@\\-]{0,255}")
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43} \([A-Z0-9-]{1,16}\)")
_PATH = re.compile(r"/[A-Za-z0-9._/@+-]{1,254}")
_FSCK = re.compile(r"(systemd-fsck[A-Za-z0-9:_.@\\-]{0,200}) ([a-z-]{1,32}) ([0-9]{1,3})")
VERIFY_UNIT = "imgprep-verify.service"


class VerificationFailed(ImgprepError):
    """The exported image's verification boot showed a problem (or did not report)."""

    code = "VerificationFailed"

    def __init__(self, message: str, *, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}  # what the record's ``verification`` shows (checks, report)


@dataclasses.dataclass
class Report:
    """The parsed verification report (every value checked against its pattern)."""

    system_state: str | None = None
    settle_s: int | None = None
    machine_id: str | None = None
    machine_id_mounted: bool | None = None
    commit_state: str | None = None
    commit_result: str | None = None
    commit_start_us: int | None = None
    ssh_host_keys: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    services: list[str] = dataclasses.field(default_factory=list)
    kernel_fs: list[str] = dataclasses.field(default_factory=list)
    fsck: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fsck_log: list[str] = dataclasses.field(default_factory=list)
    selinux: str | None = None
    identities: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)
    complete: bool = False
    rejected: int = 0  # lines whose key or value was not acceptable

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["identities"] = {
            name: [{"sha256": d, "path": p} for d, p in files] for name, files in self.identities.items()
        }
        return data


def _int(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else None


def parse_report(text: str) -> Report:
    """The guest's ``key=value`` lines -> a Report; unknown keys and bad values are dropped
    (and counted in ``rejected``)."""
    report = Report()
    identity_files = 0
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        accepted = True
        if key == "system_state":
            accepted = bool(_WORD.fullmatch(value))
            report.system_state = value if accepted else None
        elif key in ("settle_s", "commit_start_us"):
            number = _int(value)
            accepted = number is not None
            setattr(report, key, number)
        elif key == "machine_id":
            accepted = bool(_MACHINE_ID.fullmatch(value)) or value == ""
            report.machine_id = value if value and accepted else None
        elif key == "machine_id_mounted":
            accepted = value in ("yes", "no")
            report.machine_id_mounted = value == "yes" if accepted else None
        elif key in ("commit_state", "commit_result", "selinux"):
            accepted = bool(_WORD.fullmatch(value))
            setattr(report, key, value if accepted else None)
        elif key == "ssh_host_key":
            accepted = bool(_FINGERPRINT.fullmatch(value)) and len(report.ssh_host_keys) < MAX_KEYS
            if accepted:
                report.ssh_host_keys.append(value)
        elif key == "failed":
            accepted = bool(_UNIT.fullmatch(value)) and len(report.failed) < MAX_UNITS
            if accepted:
                report.failed.append(value)
        elif key == "services":
            names = value.split()
            report.services = [n for n in names if _UNIT.fullmatch(n)][:MAX_UNITS]
            accepted = len(report.services) == len(names)
        elif key in ("kernel_fs", "fsck_log"):
            lines: list[str] = getattr(report, key)
            accepted = len(lines) < MAX_LINES
            if accepted:
                lines.append(clean(value, limit=LINE_MAX))
        elif key == "fsck":
            match = _FSCK.fullmatch(value)
            accepted = match is not None and len(report.fsck) < MAX_LINES
            if match is not None and accepted:
                report.fsck.append({"unit": match[1], "result": match[2], "status": int(match[3])})
        elif key == "identity":
            accepted = _identity(report, value, identity_files)
            identity_files += accepted
        elif key == "end":
            report.complete = value == "1"
        else:
            accepted = False
        if not accepted:
            report.rejected += 1
    return report


def _identity(report: Report, value: str, count: int) -> bool:
    parts = value.split(" ")
    if len(parts) != 3 or count >= MAX_IDENTITY_FILES:
        return False
    name, digest, path = parts
    if name not in identities.NAMES or not identities.SHA256.fullmatch(digest) or not _PATH.fullmatch(path):
        return False
    if ".." in path.split("/") or identities.pattern_of(name, path) is None:
        return False  # a path the list does not name: not ours to judge
    report.identities.setdefault(name, []).append((digest, path))
    return True


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "status": "passed" if self.passed else "failed", "detail": self.detail}


def decide(report: Report, prototype: Mapping[str, Sequence[str]]) -> list[Check]:
    """The checks of one verification boot. ``prototype``: the prototype's identity
    hashes (identities.hash_guest, taken during inject)."""
    checks = [
        Check(
            "report",
            report.complete,
            "the report is complete" if report.complete else "the verification report was incomplete",
        ),
        Check(
            "boot",
            report.system_state in ("running", "degraded"),
            f"the boot settled (system state {report.system_state})"
            if report.system_state in ("running", "degraded")
            else f"the boot did not settle (system state {report.system_state or 'unknown'})",
        ),
    ]
    failed = [u for u in report.failed if u != VERIFY_UNIT]
    checks.append(
        Check("failed-units", not failed, f"failed units: {', '.join(failed)}" if failed else "no failed units")
    )
    checks.append(_machine_id(report, prototype))
    checks.append(_ssh_host_keys(report, prototype))
    others = {k: v for k, v in report.identities.items() if k not in ("machine-id", "ssh-host-keys")}
    same = identities.reused(prototype, others)
    checks.append(
        Check(
            "identities",
            not same,
            f"equal to the prototype's: {', '.join(same)}"
            if same
            else f"every identity present is new ({', '.join(sorted(others)) or 'none but machine-id, host keys'})",
        )
    )
    checks.append(_filesystems(report))
    return checks


def _machine_id(report: Report, prototype: Mapping[str, Sequence[str]]) -> Check:
    if report.machine_id is None:
        return Check("machine-id", False, "no valid machine-id in the first boot")
    if report.machine_id_mounted:
        return Check("machine-id", False, "machine-id was not committed (still a transient mount)")
    if identities.reused(prototype, {"machine-id": report.identities.get("machine-id", [])}):
        return Check("machine-id", False, "machine-id equals the prototype's")
    if "machine-id" not in report.identities:
        return Check("machine-id", False, "machine-id file was not hashed in the first boot")
    committed = (
        report.commit_state == "active" and report.commit_result == "success" and (report.commit_start_us or 0) > 0
    )
    how = "committed on this boot by systemd-machine-id-commit.service" if committed else "on disk"
    return Check("machine-id", True, f"new machine-id {report.machine_id}, {how}")


def _ssh_host_keys(report: Report, prototype: Mapping[str, Sequence[str]]) -> Check:
    had = bool(prototype.get("ssh-host-keys"))
    files = report.identities.get("ssh-host-keys", [])
    same = [path for digest, path in files if identities.reused(prototype, {"ssh-host-keys": [(digest, path)]})]
    if same:
        return Check("ssh-host-keys", False, f"SSH host keys equal the prototype's: {', '.join(same)}")
    if had and not report.ssh_host_keys:
        return Check("ssh-host-keys", False, "no SSH host keys after the first boot (the prototype had some)")
    if not report.ssh_host_keys:
        return Check("ssh-host-keys", True, "no SSH host keys (nor had the prototype)")
    return Check("ssh-host-keys", True, f"{len(report.ssh_host_keys)} new SSH host keys")


def _filesystems(report: Report) -> Check:
    problems = []
    if report.kernel_fs:
        problems.append(f"root filesystem needed journal recovery (kernel: {report.kernel_fs[0]})")
    bad_fsck = [f for f in report.fsck if f["result"] != "success" or f["status"] != 0]
    if bad_fsck:
        problems.append("fsck: " + ", ".join(f"{f['unit']} {f['result']} status {f['status']}" for f in bad_fsck))
    if report.fsck_log:
        problems.append(f"fsck repaired the filesystem ({report.fsck_log[0]})")
    if problems:
        return Check("filesystems", False, "; ".join(problems))
    ran = ", ".join(f["unit"] for f in report.fsck) or "none"
    return Check("filesystems", True, f"no journal recovery, no orphan cleanup, fsck clean (fsck units run: {ran})")


def failure_message(checks: Sequence[Check]) -> str:
    return "verification of the image failed: " + "; ".join(c.detail for c in checks if not c.passed)
