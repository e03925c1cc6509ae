"""What a user gets from ``pip install .`` in a plain virtualenv (no system site packages).

The libguestfs bindings are not on PyPI, so such a venv has none: imgprep must still
install, start, and answer bad input with its one-line error (exit 2), and say what to
install when a guest has to be opened. The wheel holds the product only: no test code.
Slow-ish (a venv and a pip install): the full lane runs it, ``scripts/test --fast`` not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imgprep.libguestfs import MISSING_BINDINGS
from tests.capabilities import requires

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False, cwd="/"
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain venv (the base interpreter, no --system-site-packages) with imgprep pip-installed."""
    requires("python-venv")
    path = tmp_path_factory.mktemp("plain") / "v"
    made = _run([sys.executable, "-m", "venv", str(path)])
    assert made.returncode == 0, made.stderr
    installed = _run([str(path / "bin/pip"), "install", "-q", str(REPO)], timeout=900)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return path


def _site_packages(venv: Path) -> Path:
    (found,) = venv.glob("lib/python3*/site-packages")
    return found


def test_the_venv_has_no_libguestfs_bindings(venv: Path) -> None:
    """What the other tests rely on: ``import guestfs`` fails in this venv."""
    proc = _run([str(venv / "bin/python"), "-c", "import guestfs"])
    assert proc.returncode == 1
    assert "ModuleNotFoundError: No module named 'guestfs'" in proc.stderr


def test_an_unknown_vm_is_one_line_and_exit_2(venv: Path) -> None:
    proc = _run([str(venv / "bin/imgprep"), "create", "--vm", "nope", "--libvirt-uri", "test:///default"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "imgprep: error: no VM 'nope' at test:///default\n"
    assert proc.stdout == ""


def test_opening_a_guest_says_what_to_install(venv: Path) -> None:
    code = (
        "from imgprep.libguestfs import open_guest\n"
        "from imgprep.errors import MissingDependency\n"
        "try:\n"
        "    open_guest([], readonly=True, force_tcg=True).__enter__()\n"
        "except MissingDependency as exc:\n"
        "    print(exc.message)\n"
    )
    proc = _run([str(venv / "bin/python"), "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == MISSING_BINDINGS + "\n"


def test_the_wheel_holds_the_product_and_no_test_code(venv: Path) -> None:
    package = _site_packages(venv) / "imgprep"
    files = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    # the control: the product and its guest-side artifacts are there
    assert {"cli.py", "libguestfs.py", "_data/units/imgprep-prepare-runner"} <= files
    assert "_data/smf/imgprep-operator-script.xml" in files
    assert "_data/operator_scripts/linux-prepare-image" in files
    assert not [f for f in files if "smf_model" in f or f.endswith(".dtd.1") or "/dtd/" in f]
    assert not [f for f in files if f.startswith("tests/") or "/tests/" in f]
