"""The fast power-off leaves clean filesystems: the exported image's first boot (the
verification boot, which reads the kernel log and the fsck units) needs no journal
replay. Control: the same image, booted and powered off hard while it runs, does
replay its journal on the next boot, in the words the verification looks for.

ext4 sets its needs-recovery flag while mounted read-write and clears it when
unmounted or remounted read-only; on a mount that finds the flag set it replays the
journal and logs "recovery complete" (kernel log, shown on the test guest's console).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Prototype
from tests.e2e.test_create import TIMEOUTS

pytestmark = pytest.mark.e2e

REPLAYED = ("recovery complete", "recovery required")
ROOT_MOUNTED = "EXT4-fs (vda): mounted filesystem"


def boot_text(proto: Prototype, wait_for: str, timeout: float = 900.0) -> str:
    """Boot until the console shows ``wait_for``; the console text of this boot only."""
    before = proto.console_text()
    proto.dom.create()
    proto.wait_console(wait_for, len(before), timeout=timeout)
    after = proto.console_text()
    return after[len(before) :] if after.startswith(before) else after


def test_exported_image_needs_no_journal_recovery(
    prototype: Prototype, make_prototype: Callable[..., Prototype], imgprep: Any, output_dir: Path
) -> None:
    prototype.start()
    result = imgprep(
        "create", "--vm", prototype.uuid, "--output-dir", str(output_dir), "--json", *TIMEOUTS, verify=True
    )
    assert result.returncode == 0, result.stderr
    summary = result.summary
    assert summary["boot_report"]["poweroff"] == "fast"  # the path under test was taken
    verification = summary["verification"]
    assert verification["status"] == "passed", verification
    (filesystems,) = [c for c in verification["checks"] if c["name"] == "filesystems"]
    assert filesystems["status"] == "passed", filesystems
    assert verification["report"]["kernel_fs"] == []
    assert verification["report"]["fsck_log"] == []

    clone = make_prototype()
    shutil.copyfile(summary["file"], clone.disk)
    first = boot_text(clone, "login:")
    assert ROOT_MOUNTED in first  # the console shows the root filesystem's mount messages
    assert not [m for m in REPLAYED if m in first], first[-4000:]

    # Control: cut the power of the running clone (its counter writer keeps writing);
    # the next boot must replay the journal, and the console must show it.
    clone.dom.destroy()
    second = boot_text(clone, ROOT_MOUNTED)  # ext4 logs its replay before this line
    assert ROOT_MOUNTED in second
    assert "recovery complete" in second, second[-4000:]
