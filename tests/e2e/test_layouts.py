"""`imgprep create` on the guest layouts real fleets run (tests/layouts.py).

Each layout boots through its own bootloader (SeaBIOS or OVMF, GRUB from the disk),
with the test guest's daemons (``ConditionFirstBoot=no``, so a fresh prototype has
never started them). Per layout: ``imgprep create`` (clone mode) succeeds, the image is
clean by the same inspection as tests/e2e/test_create.py, and the prototype is as
before. Where the layout is the point, the prototype is shut off (no boot of its own
beyond the one that gives it an NVRAM and a machine-id) and "as before" is exact: its
persistent definition, its disk and its NVRAM are byte-identical afterwards.

``uefi-btrfs``: shut off (the NVRAM, the definition and the disk unchanged), and running
(frozen through its agent, never stopped). ``cloud``: never booted, under each firmware
it carries (under UEFI the prototype has no NVRAM yet, and still has none afterwards);
its NoCloud meta-data comes from the SMBIOS serial (``ds=nocloud;h=...;i=...``), as a
user gives a cloud image its seed without a seed disk, so cloud-init has a datasource
at once and never waits for a network one.

SELinux: the libvirt backend labels what it injects with the guest's own policy
(``selinux_label``). ``test_selinux_labels_make_the_injection_run`` writes imgprep's
injection plan offline both ways: unlabelled, Debian's default policy still lets
systemd run it (recorded, so that a policy that starts refusing it shows up);
labelled, the unit and runner get the policy's types and the runner runs under
enforcing and reports over its channel.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import json
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imgprep import artifacts
from imgprep import pointintime as pit
from imgprep.libguestfs import open_guest, selinux_label
from tests import layouts
from tests.e2e.conftest import BOOT_TIMEOUT, LIBVIRT_URI, VM_ROOT, Prototype
from tests.e2e.test_clone import leftovers
from tests.e2e.test_create import DEMO_STARTED, TIMEOUTS, inspect_disk, sha1_of
from tests.e2e.test_pointintime import wait_for
from tests.guestimage import GuestImage

pytestmark = [pytest.mark.e2e, pytest.mark.layouts]

LOGIN = "login:"
MakeLayout = Callable[..., Prototype]


def _undefine(dom: Any) -> None:
    import libvirt

    if dom.isActive():
        dom.destroy()
    for snap in dom.snapshotListNames():
        dom.snapshotLookupByName(snap).delete(0)
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


@pytest.fixture
def make_layout_prototype(guest_image: GuestImage, request: pytest.FixtureRequest) -> Iterator[MakeLayout]:
    """Factory: a defined domain on a private copy of layout ``name`` (its own firmware)."""
    import libvirt

    conn = libvirt.open(LIBVIRT_URI)
    made: list[tuple[Prototype, Path]] = []

    def make(name: str, firmware: str | None = None, nocloud: bool = False) -> Prototype:
        """``firmware``: one the layout boots with (default: its first); ``nocloud``: a
        NoCloud meta-data in the SMBIOS serial, as a user gives a cloud image its seed."""
        layout = layouts.build(name)
        firmware = firmware or layout.firmware
        assert firmware in layout.firmwares, (name, firmware)
        vm = f"imgprep-e2e-{name}-{uuid.uuid4().hex[:6]}"
        workdir = VM_ROOT / vm
        workdir.mkdir(parents=True, exist_ok=True)
        disk = workdir / "disk.qcow2"
        console = workdir / "console.log"
        shutil.copyfile(layout.disk, disk)
        xml = layouts.domain_xml(
            vm,
            disk,
            firmware=firmware,
            console_log=console,
            nvram=workdir / "VARS.fd",
            smbios_serial=f"ds=nocloud;h={vm};i=iid-{vm}" if nocloud else None,
        )
        dom = conn.defineXML(xml)
        # libvirt orders implicit controllers differently when it parses its own output
        # (as on a snapshot revert): start from its normalised form, as a real VM does.
        dom = conn.defineXML(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        proto = Prototype(vm, dom.UUIDString(), disk, console, conn)
        made.append((proto, workdir))
        return proto

    yield make
    try:
        for proto, _ in made:
            _undefine(proto.dom)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        report = getattr(request.node, "rep_call", None)
        if report is None or report.passed:
            for _, workdir in made:
                shutil.rmtree(workdir, ignore_errors=True)


def _canonical(xml: str) -> str:
    """The definition with its controllers in one order: libvirt reorders its implicit
    controllers when it re-parses a definition (the same devices, the same addresses)."""
    root = ET.fromstring(xml)
    devices = root.find("devices")
    assert devices is not None
    controllers = [d for d in devices if d.tag == "controller"]
    for c in controllers:
        devices.remove(c)
    for c in sorted(controllers, key=lambda c: (c.get("type", ""), c.get("index", ""))):
        devices.append(c)
    return ET.tostring(root, encoding="unicode")


def _create(proto: Prototype, imgprep: Any, output_dir: Path) -> dict[str, Any]:
    """``imgprep create`` (clone mode, the default) succeeded, the early service ran first."""
    result = imgprep("create", "--vm", proto.uuid, "--output-dir", str(output_dir), "--json", *TIMEOUTS)
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = result.summary
    assert summary["execution"] == "succeeded"
    assert summary["capture"]["capture"] == "clone"
    assert [e["state"] for e in result.events if e.get("event") == "guest"] == ["running", "success"]
    report = summary["boot_report"]
    assert report["late_services"] == []
    assert report["targets"]["sysinit.target"] == "inactive"
    return summary


def _assert_clean(image: Path, *, cloud_init: bool) -> None:
    """The image is clean, by the same inspection as tests/e2e/test_create.py."""
    facts = inspect_disk(image)
    assert facts["ssh_host_keys"] == []
    assert facts["machine_id"] == "uninitialized\n"
    assert facts["demo_identity"] is False
    assert not any("member" in f for f in facts["etcd_files"]), facts["etcd_files"]
    assert facts["redis_files"] == []
    # imgprep-test-writer is a test fixture of the guest, not an imgprep trace
    assert [t for t in facts["traces"] if "imgprep-test-writer" not in t] == []
    # cloud-init regenerates host keys itself; otherwise the first-boot unit does. (The
    # layouts' tree has cloud-init installed and enabled, like most cloud images.)
    assert facts["firstboot_keygen"] is not cloud_init


def _create_and_check(proto: Prototype, imgprep: Any, output_dir: Path, *, cloud_init: bool) -> dict[str, Any]:
    proto.start(LOGIN)
    # a running prototype with an agent channel is frozen through its agent: wait until
    # it answers (clone mode refuses a silent agent rather than stopping the prototype)
    wait_for("the agent", lambda: pit.agent_answers(proto.dom))
    assert DEMO_STARTED not in proto.console_text(), "the prototype's first boot must not start the daemons"
    definition_before = proto.persistent_xml()

    summary = _create(proto, imgprep, output_dir)

    # The prototype is as before.
    assert proto.is_running()
    assert proto.snapshots() == []
    definition_after = proto.persistent_xml()
    assert _canonical(definition_after) == _canonical(definition_before), "".join(
        difflib.unified_diff(definition_before.splitlines(True), definition_after.splitlines(True))
    )
    _assert_clean(Path(summary["file"]), cloud_init=cloud_init)
    return summary


def _nvram(proto: Prototype) -> Path:
    path = ET.fromstring(proto.persistent_xml()).findtext("./os/nvram")
    assert path, "a UEFI prototype has an <nvram>"
    return Path(path)


def _untouched(proto: Prototype) -> dict[str, Any]:
    """What a clone job must leave exactly as it was on a shut-off prototype: its
    persistent definition, its disk and its UEFI variable store (or their absence)."""
    nvram = _nvram(proto) if ET.fromstring(proto.persistent_xml()).find("./os/nvram") is not None else None
    return {
        "running": proto.is_running(),
        "definition": proto.persistent_xml(),
        "disk": sha1_of(proto.disk),
        "nvram": (sha1_of(nvram) if nvram.exists() else "absent") if nvram else None,
        "snapshots": proto.snapshots(),
    }


def test_bios_gpt_lvm_xfs_with_var_on_its_own_lv(
    make_layout_prototype: MakeLayout, imgprep: Any, output_dir: Path
) -> None:
    proto = make_layout_prototype("bios-lvm-xfs")
    _create_and_check(proto, imgprep, output_dir, cloud_init=True)


def test_uefi_shut_off_prototype_in_clone_mode(
    make_layout_prototype: MakeLayout, imgprep: Any, output_dir: Path
) -> None:
    """UEFI (OVMF) + GRUB on the ESP, root and /var on btrfs subvolumes. libvirt 9.0
    refuses internal snapshots of pflash VMs (in place cannot work); the clone boots a
    private copy of the NVRAM, and the prototype's NVRAM, definition and disk stay
    byte-identical."""
    proto = make_layout_prototype("uefi-btrfs")
    proto.start(LOGIN)  # a prototype has booted before: its NVRAM exists, its machine-id is committed
    proto.shutdown()
    before = _untouched(proto)
    assert before["nvram"] not in (None, "absent"), before

    summary = _create(proto, imgprep, output_dir)

    assert summary["capture"]["consistency"] == "shutoff"
    nvram_copy = [r for r in summary["capture"]["removed"] if r.startswith("<nvram> replaced by the copy ")]
    assert nvram_copy, summary["capture"]["removed"]
    assert str(_nvram(proto)) not in nvram_copy[0]
    assert _untouched(proto) == before
    _assert_clean(Path(summary["file"]), cloud_init=True)
    assert leftovers(proto.conn, summary["job_uuid"], proto) == []
    record = json.loads(imgprep("jobs", "get", summary["job_uuid"]).stdout)
    assert record["state"]["clone"]["root_target"] == "vda"  # found on a btrfs subvolume
    assert record["needs_recovery"] is False


def test_uefi_running_prototype_frozen_through_its_agent(
    make_layout_prototype: MakeLayout, imgprep: Any, output_dir: Path
) -> None:
    """A running UEFI prototype: the point in time under an agent freeze (btrfs root and
    /var frozen), the prototype never stops, its definition unchanged, the image clean."""
    proto = make_layout_prototype("uefi-btrfs")
    proto.start(LOGIN)
    wait_for("the agent", lambda: pit.agent_answers(proto.dom))
    dom_id = proto.dom.ID()
    definition = proto.persistent_xml()

    summary = _create(proto, imgprep, output_dir)

    assert summary["capture"]["consistency"] == "freeze"
    assert summary["capture"]["thaw_attempts"] == 1
    assert proto.is_running()
    assert proto.dom.ID() == dom_id
    assert proto.persistent_xml() == definition
    assert proto.snapshots() == []
    _assert_clean(Path(summary["file"]), cloud_init=True)
    assert leftovers(proto.conn, summary["job_uuid"], proto) == []


@pytest.mark.parametrize("firmware", ["efi", "bios"])
def test_cloud_image_never_booted(
    make_layout_prototype: MakeLayout, imgprep: Any, output_dir: Path, firmware: str
) -> None:
    """A cloud image as Debian's image builder lays it out, never booted before the job
    (empty machine-id, no host keys), given its NoCloud meta-data in the SMBIOS serial.
    Under UEFI the never-started prototype has no NVRAM yet: the clone boots a copy of
    the template and the prototype still has none afterwards."""
    proto = make_layout_prototype("cloud", firmware=firmware, nocloud=True)
    before = _untouched(proto)
    assert before["nvram"] == ("absent" if firmware == "efi" else None), before

    summary = _create(proto, imgprep, output_dir)

    assert summary["capture"]["consistency"] == "shutoff"
    assert _untouched(proto) == before
    _assert_clean(Path(summary["file"]), cloud_init=True)
    assert leftovers(proto.conn, summary["job_uuid"], proto) == []


def _power_off(proto: Prototype) -> None:
    """Off, whether or not the guest powered itself off meanwhile."""
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        if proto.is_running():
            proto.dom.destroy()


def _boot(proto: Prototype, done: Callable[[str], bool], timeout: float = BOOT_TIMEOUT) -> str:
    """Start the domain and return the console text of this boot once ``done`` holds or
    the guest is off (libvirt truncates a file-backed console when the domain starts)."""
    offset = len(proto.console_text())
    proto.dom.create()
    deadline = time.monotonic() + timeout
    while True:
        text = proto.console_text()
        if len(text) < offset:
            offset = 0
        if done(text[offset:]) or not proto.is_running():
            return proto.console_text()[offset:]
        if time.monotonic() > deadline:
            raise AssertionError(f"{proto.name}: nothing conclusive on the console in {timeout}s")
        time.sleep(1)


def _inject_over_console(disk: Path, *, label: bool) -> dict[str, str]:
    """imgprep's injection plan written offline, its channel the serial console (so the
    runner's messages land in the console log). Returns the file_contexts used."""
    files = artifacts.linux_injection(
        mode="early",
        script=b"#!/bin/sh\necho prepared\n",
        script_timeout=120,
        channel="/dev/ttyS0",
        wants_dir_exists=True,
    )
    with open_guest([(disk, "qcow2")], readonly=False, force_tcg=True) as g:
        g.mkdir_p(artifacts.PREFIX, 0o700)
        for f in files:
            if f.link:
                g.symlink(f.link, f.path)
            else:
                g.write(f.path, f.data, f.mode)
        if label:
            spec = selinux_label(g, [artifacts.PREFIX, artifacts.UNIT_PATH, artifacts.wants_link("early")])
            assert spec == "/etc/selinux/default/contexts/files/file_contexts"
        labels = {}
        for path in (artifacts.UNIT_PATH, f"{artifacts.PREFIX}/runner"):
            names = [x["attrname"] for x in g.g.lgetxattrs(path)]
            if "security.selinux" in names:
                labels[path] = g.g.lgetxattr(path, "security.selinux").rstrip(b"\0").decode()
        return labels


def _message(state: str) -> str:
    return f"IMGPREP1 state {base64.b64encode(state.encode()).decode()}"


def test_selinux_labels_make_the_injection_run(make_layout_prototype: MakeLayout) -> None:
    proto = make_layout_prototype("selinux")
    proto.start(LOGIN)  # a prototype has booted (and committed a machine-id) before
    proto.shutdown()
    reference = proto.disk.with_name("reference.qcow2")
    subprocess.run(["cp", "--sparse=always", str(proto.disk), str(reference)], check=True)

    # Unlabelled (what the libvirt backend injects today). Debian's default policy lets
    # systemd run the unlabelled unit and runner: recorded here, so that a policy change
    # that starts refusing them shows up.
    assert _inject_over_console(proto.disk, label=False) == {}
    text = _boot(proto, lambda t: LOGIN in t or _message("success") in t)
    assert "Successfully loaded SELinux policy" in text
    assert _message("success") in text, text[-3000:]
    _power_off(proto)

    # Labelled with the guest's own policy: the runner runs, reports, powers off.
    shutil.copyfile(reference, proto.disk)
    labels = _inject_over_console(proto.disk, label=True)
    assert ":systemd_unit_t:" in labels[artifacts.UNIT_PATH], labels
    assert ":var_lib_t:" in labels[f"{artifacts.PREFIX}/runner"], labels
    text = _boot(proto, lambda t: LOGIN in t)
    assert _message("running") in text, text[-3000:]
    assert _message("success") in text, text[-3000:]
    with open_guest([(proto.disk, "qcow2")], readonly=True, force_tcg=True) as g:
        assert [p for p in (artifacts.PREFIX, artifacts.UNIT_PATH) if g.exists(p)] == []
