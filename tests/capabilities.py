"""What a test needs from the host, probed once, and what happens when it is missing.

Every test that needs more than Python calls :func:`requires` with the capabilities it
uses (``requires("qemu-img")``, ``requires("root", "systemd-nspawn")``). A missing
capability

* FAILS the test, with the reason, when ``IMGPREP_REQUIRE_E2E=1`` (``scripts/test``
  and CI set it: a host that cannot run a test must not pass by skipping it);
* skips it, with the reason, otherwise (``scripts/test --fast``, a contributor's laptop).

No test calls ``pytest.skip``, ``skipif`` or ``importorskip`` itself: the probes live
here, by name, so that ``git grep 'pytest.skip'`` finds exactly one place.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

REQUIRE_ENV = "IMGPREP_REQUIRE_E2E"
LIBVIRT_URI = "qemu:///system"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _tool(name: str, package: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        if shutil.which(name) is None:
            return f"{name} is not installed (Debian package {package}; scripts/setup-host installs it)"
        return None

    return probe


def _root() -> str | None:
    return None if os.geteuid() == 0 else "needs root"


def _quiet(cmd: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=60, check=False)


def _mount_namespaces() -> str | None:
    """A private mount namespace in which a bind mount works and stays inside."""
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    with tempfile.TemporaryDirectory(prefix="imgprep-probe-") as tmp:
        a, b = Path(tmp, "a"), Path(tmp, "b")
        a.mkdir()
        b.mkdir()
        (a / "seen").write_text("yes")
        script = 'mount --no-mtab --bind "$1/a" "$1/b" && test -e "$1/b/seen"'
        proc = _quiet(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh", tmp])
        if proc.returncode != 0:
            return f"no private mount namespace with bind mounts (needs CAP_SYS_ADMIN): {proc.stderr.decode().strip()}"
        if (b / "seen").exists():
            return "a bind mount made in a private mount namespace leaked out of it"
    return None


def _chroot_namespaces() -> str | None:
    """Mount and pid namespaces, and chroot inside them."""
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    proc = _quiet(["unshare", "--mount", "--pid", "--fork", "--", "chroot", "/", "true"])
    if proc.returncode != 0:
        return f"cannot unshare mount/pid namespaces and chroot (needs CAP_SYS_ADMIN): {proc.stderr.decode().strip()}"
    return None


def _libvirtd() -> str | None:
    try:
        import libvirt
    except ImportError as exc:
        return f"the libvirt Python bindings are missing: {exc}"
    try:
        libvirt.open(LIBVIRT_URI).close()
    except libvirt.libvirtError as exc:
        return f"libvirtd not reachable at {LIBVIRT_URI}: {exc}"
    return None


def _libguestfs() -> str | None:
    try:
        import guestfs  # noqa: F401
    except ImportError as exc:
        return f"the libguestfs Python bindings are missing ({exc}): Debian package python3-guestfs"
    return None


def _stock_units() -> str | None:
    if not (SYSTEM_UNITS / "local-fs.target").exists():
        return f"the stock systemd units are not in {SYSTEM_UNITS}"
    return None


def _real_systemctl() -> str | None:
    # The runner's own PATH must find /usr/bin/systemctl first, so a fake can be bound over it.
    if shutil.which("systemctl", path="/usr/sbin:/usr/bin:/sbin:/bin") != "/usr/bin/systemctl":
        return "needs /usr/bin/systemctl first on /usr/sbin:/usr/bin:/sbin:/bin"
    return None


def _python_venv() -> str | None:
    try:
        import ensurepip  # noqa: F401
    except ImportError:
        return "python3 -m venv cannot install pip (Debian package python3-venv)"
    return None


PROBES: dict[str, Callable[[], str | None]] = {
    "root": _root,
    "python-venv": _python_venv,
    "mount-namespaces": _mount_namespaces,
    "chroot-namespaces": _chroot_namespaces,
    "libvirtd": _libvirtd,
    "libguestfs": _libguestfs,
    "stock-systemd-units": _stock_units,
    "usr-bin-systemctl": _real_systemctl,
    "qemu-img": _tool("qemu-img", "qemu-utils"),
    "qemu-io": _tool("qemu-io", "qemu-utils"),
    "qemu-nbd": _tool("qemu-nbd", "qemu-utils"),
    "qemu-system-x86_64": _tool("qemu-system-x86_64", "qemu-system-x86"),
    "ssh-agent": _tool("ssh-agent", "openssh-client"),
    "systemd-analyze": _tool("systemd-analyze", "systemd"),
    "systemd-nspawn": _tool("systemd-nspawn", "systemd-container"),
    "nsenter": _tool("nsenter", "util-linux"),
    "setpriv": _tool("setpriv", "util-linux"),
    "debootstrap": _tool("debootstrap", "debootstrap"),
    "busybox": _tool("busybox", "busybox"),
    "dash": _tool("dash", "dash"),
    "ksh93": _tool("ksh93", "ksh"),
    "shellcheck": _tool("shellcheck", "shellcheck"),
    "node": _tool("node", "nodejs"),  # runs the SmartOS backend's remote/zone.js in the simulator
}


@functools.cache
def missing(capability: str) -> str | None:
    """Why ``capability`` is missing on this host, or None when it is there."""
    try:
        probe = PROBES[capability]
    except KeyError:
        raise ValueError(f"unknown capability {capability!r} (known: {', '.join(sorted(PROBES))})") from None
    return probe()


def required() -> bool:
    """Whether a missing capability fails (``IMGPREP_REQUIRE_E2E=1``) rather than skips."""
    return os.environ.get(REQUIRE_ENV) == "1"


def requires(*capabilities: str) -> None:
    """Fail (``IMGPREP_REQUIRE_E2E=1``) or skip the calling test unless every capability is there."""
    reasons = [f"{c}: {r}" for c in capabilities if (r := missing(c)) is not None]
    if not reasons:
        return
    text = "; ".join(reasons)
    if required():
        pytest.fail(f"required capability missing ({REQUIRE_ENV}=1): {text}", pytrace=False)
    pytest.skip(f"capability missing: {text}")
