"""The unit-test subprocess guard itself (tests/unit/conftest.py) refuses what it must."""

from __future__ import annotations

import os
import subprocess

import pytest

from imgprep.errors import CommandError
from imgprep.run import run
from tests.unit.conftest import SubprocessGuard, UnplannedSubprocess


def test_unplanned_subprocess_is_refused_and_recorded(subprocess_guard: SubprocessGuard) -> None:
    with pytest.raises(UnplannedSubprocess, match="unplanned subprocess"):
        subprocess.run(["true"], check=False)
    with pytest.raises(UnplannedSubprocess):
        run(["/usr/bin/false"])  # imgprep's own runner goes through subprocess.Popen too
    with pytest.raises(UnplannedSubprocess):
        os.system("true")
    with pytest.raises(UnplannedSubprocess):
        os.posix_spawnp("true", ["true"], os.environ)
    assert len(subprocess_guard.violations) == 4
    # Even a swallowed refusal fails the test at teardown; this test asserted on it, so clear it.
    subprocess_guard.violations.clear()


@pytest.mark.allow_subprocess("true", "false")
def test_planned_programs_run_for_real(subprocess_guard: SubprocessGuard) -> None:
    assert subprocess.run(["true"], check=False).returncode == 0
    with pytest.raises(CommandError) as info:
        run(["/usr/bin/false"])
    assert info.value.returncode == 1
    # a planned program does not open the door to others
    with pytest.raises(UnplannedSubprocess):
        subprocess.run(["echo", "x"], check=False, capture_output=True)
    assert subprocess_guard.violations == ["subprocess.Popen(['echo', 'x'])"]
    subprocess_guard.violations.clear()
