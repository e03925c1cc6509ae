"""End-to-end fixtures: a real libvirtd, real QEMU (software emulation), a real Debian guest.

Nothing here is mocked. The tests are gated on capabilities (``tests.capabilities``:
libvirtd reachable, libguestfs importable, debootstrap and qemu-img present, root); with
``IMGPREP_REQUIRE_E2E=1`` (set by ``scripts/test`` and CI) a missing one FAILS the tests
instead of skipping them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.capabilities import requires
from tests.conftest import RELIABILITY_PROPERTY
from tests.guestimage import GuestImage, build, build_split, domain_xml, remove_domain

LIBVIRT_URI = "qemu:///system"
VM_ROOT = Path(os.environ.get("IMGPREP_TEST_VM_DIR", "/var/lib/imgprep-test-vms"))
BOOT_TIMEOUT = 300.0
REPO = Path(__file__).resolve().parents[2]


# What the end-to-end tests need: the guest image is built with debootstrap and qemu-img
# (as root), the prototype runs under libvirtd, imgprep edits it with libguestfs.
E2E_NEEDS = ("root", "libvirtd", "libguestfs", "debootstrap", "qemu-img")


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    requires(*E2E_NEEDS)
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    return build()


@pytest.fixture(scope="session")
def libvirt_uri() -> str:
    return LIBVIRT_URI


@dataclasses.dataclass
class Prototype:
    """A defined libvirt domain booting a private copy of the test guest."""

    name: str
    uuid: str
    disk: Path
    console: Path
    conn: Any
    more_disks: tuple[Path, ...] = ()

    @property
    def dom(self) -> Any:
        import libvirt

        try:
            return self.conn.lookupByUUIDString(self.uuid)
        except libvirt.libvirtError:
            # libvirtd was restarted (a fault test does that): the old connection is dead
            self.conn = libvirt.open(LIBVIRT_URI)
            return self.conn.lookupByUUIDString(self.uuid)

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def is_running(self) -> bool:
        return bool(self.dom.isActive())

    def start(self, wait_for: str = "login:") -> None:
        """Boot and wait until the console shows ``wait_for`` (after this boot began)."""
        offset = len(self.console_text())
        self.dom.create()
        self.wait_console(wait_for, offset)

    def wait_console(self, text: str, offset: int = 0, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.console_text()[offset:]:
            if len(self.console_text()) < offset:
                offset = 0  # libvirt truncates a file-backed console when the domain starts
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {text!r} not seen on the console in {timeout}s")
            if not self.is_running():
                raise AssertionError(f"{self.name}: powered off before {text!r} appeared")
            time.sleep(1)

    def shutdown(self, timeout: float = 180) -> None:
        self.dom.shutdown()
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: did not shut down in {timeout}s")
            time.sleep(0.5)

    def snapshots(self) -> list[str]:
        return list(self.dom.snapshotListNames())

    def persistent_xml(self) -> str:
        import libvirt

        return str(self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


@pytest.fixture
def make_prototype(
    guest_image: GuestImage, libvirt_uri: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Prototype]]:
    """Factory: a defined domain on a private copy of the guest (``extra_cmdline`` for the kernel)."""
    import libvirt

    conn = libvirt.open(libvirt_uri)
    made: list[tuple[Prototype, Path]] = []

    def make(extra_cmdline: str = "", split: bool = False, agent: bool = True) -> Prototype:
        """``split``: root on partition 1 of disk 1, /var on a second disk; ``agent``: with
        the QEMU guest agent's channel (without it, the guest's agent never connects)."""
        name = f"imgprep-e2e-{uuid.uuid4().hex[:8]}"
        workdir = VM_ROOT / name
        workdir.mkdir(parents=True, exist_ok=True)
        disk = workdir / "disk.qcow2"
        console = workdir / "console.log"
        more: tuple[Path, ...] = ()
        if split:
            layout = build_split(guest_image)
            shutil.copyfile(layout.root_disk, disk)
            more = (workdir / "var.qcow2",)
            shutil.copyfile(layout.var_disk, more[0])
        else:
            shutil.copyfile(guest_image.disk, disk)
        xml = domain_xml(
            name,
            disk,
            image=guest_image,
            console_log=console,
            extra_cmdline=extra_cmdline,
            extra_disks=more,
            root="/dev/vda1" if split else "/dev/vda",
            agent=agent,
        )
        dom = conn.defineXML(xml)
        proto = Prototype(name, dom.UUIDString(), disk, console, conn, more)
        made.append((proto, workdir))
        return proto

    yield make
    try:
        for proto, _ in made:
            remove_domain(proto.dom)
    finally:
        for proto, _ in made:
            with contextlib.suppress(libvirt.libvirtError):
                proto.conn.close()
        report = getattr(request.node, "rep_call", None)
        for _, workdir in made:
            if report is None or report.passed:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                keep_logs_only(workdir)


def keep_logs_only(workdir: Path) -> None:
    """A failed test's prototype directory: its console log stays for the diagnosis, the
    disks go (hundreds of MB each: failed runs must not fill the host)."""
    for entry in workdir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.suffix != ".log":
            entry.unlink(missing_ok=True)


@pytest.fixture
def prototype(make_prototype: Callable[..., Prototype]) -> Prototype:
    return make_prototype()


@pytest.fixture
def block_and_raw_prototype(guest_image: GuestImage, libvirt_uri: str) -> Iterator[tuple[Prototype, str]]:
    """A shut-off prototype: vda a small raw *data* disk, vdb a block device (a loop
    device over a raw copy of the guest) holding the root filesystem."""
    import libvirt

    from imgprep.libguestfs import open_guest

    name = f"imgprep-e2e-{uuid.uuid4().hex[:8]}"
    workdir = VM_ROOT / name
    workdir.mkdir(parents=True)
    data, root_raw = workdir / "data.raw", workdir / "root.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data", str(data), "64M"], check=True)
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(guest_image.disk), str(root_raw)], check=True
    )
    # the guest's fstab names /dev/vda; here root is the second disk: mount it by label
    with open_guest([(root_raw, "raw")], readonly=False, force_tcg=True) as g:
        g.write("/etc/fstab", b"LABEL=root / ext4 rw,errors=remount-ro 0 1\n", 0o644)
    loop = subprocess.run(["losetup", "-f", "--show", str(root_raw)], check=True, capture_output=True, text=True)
    device = loop.stdout.strip()
    xml = ET.fromstring(domain_xml(name, data, image=guest_image, console_log=workdir / "console.log", root="/dev/vdb"))
    devices = xml.find("devices")
    assert devices is not None
    first = devices.find("disk")
    assert first is not None
    driver = first.find("driver")
    assert driver is not None
    driver.set("type", "raw")
    block = ET.fromstring(
        f"<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{device}'/>"
        "<target dev='vdb' bus='virtio'/></disk>"
    )
    devices.insert(list(devices).index(first) + 1, block)
    conn = libvirt.open(libvirt_uri)
    dom = conn.defineXML(ET.tostring(xml, encoding="unicode"))
    proto = Prototype(name, dom.UUIDString(), root_raw, workdir / "console.log", conn)
    try:
        yield proto, device
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            remove_domain(proto.dom)
        subprocess.run(["losetup", "-d", device], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@dataclasses.dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    @property
    def summary(self) -> dict[str, Any]:
        return self.events[-1]


def no_verify(args: tuple[str, ...] | list[str], verify: bool) -> list[str]:
    """``imgprep create`` arguments with ``--no-verify`` added unless ``verify``: the
    verification boot (on by default for users) costs minutes, so only the tests about
    it (and the main clone test) opt in, with ``verify=True``."""
    args = list(args)
    if args[:1] == ["create"] and not verify and "--verify" not in args and "--no-verify" not in args:
        args.append("--no-verify")
    return args


@pytest.fixture
def imgprep(state_dir: Path) -> Any:
    """Run the real ``imgprep`` command (a subprocess, as a user would). ``create`` runs
    with ``--no-verify`` unless the test passes ``verify=True`` (see ``no_verify``)."""

    def run(*args: str, timeout: float = 900, verify: bool = False) -> CliResult:
        env = {**os.environ, "IMGPREP_STATE_DIR": str(state_dir)}
        proc = subprocess.run(
            [sys.executable, "-m", "imgprep", *no_verify(args, verify)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=REPO,
            check=False,
        )
        sys.stderr.write(proc.stderr)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


# --- the reliability table -------------------------------------------------------------


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Record a fault case's outcome for the reliability table (tests/conftest.py prints it
    at the end of the session, from the reports of passed tests, also under pytest-xdist)."""

    def record(case: str, injected: str, outcome: str) -> None:
        row = {"case": case, "injected": injected, "outcome": outcome, "test": request.node.name}
        request.node.user_properties.append((RELIABILITY_PROPERTY, json.dumps(row)))

    return record
