"""Point-in-time views and the clone, for real: libvirtd, QEMU (TCG), libguestfs, the
Debian test guest. Nothing mocked.

The test guest runs ``imgprep-test-writer``: a counter appended with fsync five times a
second. A view of a running prototype must hold a *prefix* of the prototype's file (a
point in time), and the prototype's own file must have no gap (it kept running).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from imgprep import pointintime as pit
from imgprep.clonexml import clone_name, clone_xml
from imgprep.libguestfs import open_guest
from tests.e2e.conftest import BOOT_TIMEOUT, VM_ROOT, Prototype
from tests.guestimage import GuestImage, domain_xml, remove_domain

pytestmark = pytest.mark.e2e

COUNTER = "/var/lib/imgprep-test-writer/counter.log"
MARKER = "/root/imgprep-overlay-marker"


def agent_read(dom: Any, path: str) -> bytes:
    """A file of the running guest, through its agent (bounded: 10 s per call)."""

    def call(cmd: str, **args: Any) -> Any:
        return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": cmd, "arguments": args}), 10, 0))[
            "return"
        ]

    handle = call("guest-file-open", path=path, mode="r")
    data = b""
    try:
        while True:
            chunk = call("guest-file-read", handle=handle, count=1 << 20)
            data += base64.b64decode(chunk["buf-b64"])
            if chunk["eof"]:
                return data
    finally:
        call("guest-file-close", handle=handle)


def counters(text: bytes) -> list[int]:
    lines = text.decode().splitlines()
    for line in lines:
        assert len(line.split()) == 2, f"torn or foreign line in the counter file: {line!r}"
    return [int(line.split()[0]) for line in lines]


def wait_for(what: str, check: Callable[[], bool], timeout: float = BOOT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


def guest_channel(path: Path) -> ET.Element:
    serial = ET.Element("serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": str(path)})
    ET.SubElement(serial, "target", {"port": "1"})
    return serial


def counter_lines(dom: Any) -> int:
    """Entries in the running guest's counter file (0 while it does not exist yet)."""
    try:
        return len(agent_read(dom, COUNTER).splitlines())
    except libvirt.libvirtError:
        return 0


def imgprep_leftovers(conn: Any, files: pit.ViewFiles, clone: str | None) -> list[str]:
    """The clone domain, processes using the view directory, the directory itself."""
    found = [d.name() for d in conn.listAllDomains() if d.name() == clone]
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and str(files.directory).encode() in (proc / "cmdline").read_bytes():
                found.append(f"process {proc.name}")
    return found + ([str(files.directory)] if files.directory.exists() else [])


def test_running_prototype_with_agent_freeze_view_and_clone(make_prototype: Callable[..., Prototype]) -> None:
    proto = make_prototype()
    proto.start()
    wait_for("the agent", lambda: pit.agent_answers(proto.dom))
    wait_for("the writer", lambda: counter_lines(proto.dom) >= 10)
    conn = proto.conn
    dom_id = proto.dom.ID()
    persistent = proto.persistent_xml()
    job = uuid.uuid4().hex
    files = pit.ViewFiles(VM_ROOT / proto.name / f"view-{job[:8]}")
    owner = pit.qemu_owner(conn)
    files.create(owner)
    name = clone_name(job, proto.name)
    try:
        disks = pit.SourceDisk.from_xml(persistent)
        view = pit.capture_running(proto.dom, files, disks, "freeze")
        assert view.freeze is not None
        assert view.freeze.frozen >= 1
        assert view.freeze.thaw_attempts == 1
        print(f"freeze window {view.freeze.window_ms} ms")
        assert pit.our_backup_job(proto.dom, files)
        pit.make_overlays(view)
        overlays = {d.target: d.overlay for d in view.disks}

        with open_guest([(p, "qcow2") for p in overlays.values()], readonly=False, force_tcg=True) as g:
            assert g.root_drive_index() == 0
            in_view = g.read(COUNTER)
            g.write(MARKER, b"written into the overlay only\n", 0o644)
        view_counts = counters(in_view)
        assert view_counts == list(range(1, len(view_counts) + 1))

        clone = clone_xml(
            proto.persistent_xml(),
            name=name,
            uuid=str(uuid.uuid4()),
            overlays=overlays,
            job_dir=files.directory,
            channel=guest_channel(files.directory / "channel.log"),
            nvram=None,
        )
        assert "org.qemu.guest_agent.0" not in clone.xml
        clone_dom = conn.createXML(clone.xml, 0)
        console = files.directory / "chardev0.log"
        wait_for(
            "the clone's login prompt", lambda: console.exists() and "login:" in console.read_text(errors="replace")
        )
        live = ET.fromstring(clone_dom.XMLDesc(0))
        assert live.find("./devices/interface") is None
        assert live.findtext("name") == name
        assert live.findtext("uuid") != proto.uuid
        backing = live.find("./devices/disk/backingStore/source")
        assert backing is not None
        assert backing.get("protocol") == "nbd"
        clone_dom.destroy()

        # the prototype kept running: same domain, no gap, and the view is a strict prefix
        assert proto.dom.ID() == dom_id
        assert proto.is_running()
        wait_for("more counter entries", lambda: counter_lines(proto.dom) > len(view_counts) + 10)
        proto_log = agent_read(proto.dom, COUNTER)
        proto_counts = counters(proto_log)
        assert proto_counts == list(range(1, len(proto_counts) + 1))
        assert proto_log.startswith(in_view)
        assert len(proto_counts) > len(view_counts)
        with pytest.raises(libvirt.libvirtError):  # the marker went to the overlay only
            agent_read(proto.dom, MARKER)
        # for docs/capture.md: what the view cost on the host (allocated bytes)
        scratch = sum(p.stat().st_blocks * 512 for p in files.directory.glob("*.scratch.qcow2"))
        overlay = sum(p.stat().st_blocks * 512 for p in files.directory.glob("*.overlay.qcow2"))
        print(f"scratch {scratch} bytes, overlays {overlay} bytes")
    finally:
        first = pit.cleanup(conn, proto.uuid, files, name)
    assert "ended the backup job" in first
    assert pit.cleanup(conn, proto.uuid, files, name) == []
    assert not pit.our_backup_job(proto.dom, files)
    with pytest.raises(libvirt.libvirtError):
        proto.dom.backupGetXMLDesc(0)
    assert imgprep_leftovers(conn, files, name) == []
    assert proto.persistent_xml() == persistent
    assert proto.dom.ID() == dom_id


def test_shut_off_raw_and_block_disks_view_and_start_detection(
    block_and_raw_prototype: tuple[Prototype, str],
) -> None:
    proto, device = block_and_raw_prototype
    conn, persistent = proto.conn, proto.persistent_xml()
    files = pit.ViewFiles(VM_ROOT / proto.name / "view-off")
    owner = pit.qemu_owner(conn)
    files.create(owner)
    try:
        disks = pit.SourceDisk.from_xml(persistent)
        assert [(d.target, d.type, d.format) for d in disks] == [("vda", "file", "raw"), ("vdb", "block", "raw")]
        view = pit.capture_shutoff(proto.dom, files, disks, owner)
        pit.make_overlays(view)
        with open_guest([(d.overlay, "qcow2") for d in view.disks], readonly=False, force_tcg=True) as g:
            # the root filesystem is on the second disk, and inspection says so
            assert g.root_drive_index() == 1
            assert g.read("/etc/hostname") == b"imgprep-proto\n"
            g.write(MARKER, b"overlay only\n", 0o644)
        pit.check_unchanged(proto.dom, view)  # control: nothing happened yet
        # the prototype is never blocked: it starts while the view is open...
        proto.dom.create()
        assert proto.is_running()
        # ...and the view notices that it is no longer a point in time
        with pytest.raises(pit.PrototypeChanged):
            pit.check_unchanged(proto.dom, view)
        proto.dom.destroy()
    finally:
        pit.cleanup(conn, proto.uuid, files, None)
    assert pit.cleanup(conn, proto.uuid, files, None) == []
    assert imgprep_leftovers(conn, files, None) == []
    assert proto.persistent_xml() == persistent
    # nothing was written into the prototype's root disk by the view
    with open_guest([(Path(device), "raw")], readonly=True, force_tcg=True) as g:
        assert not g.exists(MARKER)


def test_shut_off_backing_chain_view_is_the_chains_content(guest_image: GuestImage, libvirt_uri: str) -> None:
    """A qcow2 disk over a backing file: the view shows the flattened chain, and the
    overlay over it leaves both layers untouched."""
    name = f"imgprep-e2e-{uuid.uuid4().hex[:8]}"
    workdir = VM_ROOT / name
    workdir.mkdir(parents=True)
    base, top = workdir / "base.qcow2", workdir / "top.qcow2"
    shutil.copyfile(guest_image.disk, base)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top)], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 64k", str(top)], check=True, capture_output=True)
    conn = libvirt.open(libvirt_uri)
    dom = conn.defineXML(domain_xml(name, top, image=guest_image, console_log=workdir / "console.log"))
    files = pit.ViewFiles(workdir / "view")
    owner = pit.qemu_owner(conn)
    try:
        persistent = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        sums = [subprocess.run(["sha1sum", str(p)], check=True, capture_output=True).stdout for p in (base, top)]
        files.create(owner)
        view = pit.capture_shutoff(dom, files, pit.SourceDisk.from_xml(persistent), owner)
        pit.make_overlays(view)
        (disk,) = view.disks
        # the view is the chain's content (top's write and base's data), read through NBD
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", disk.uri, str(top)], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 0xa5 1M 64k", str(disk.overlay)], check=True, capture_output=True)
        # control: the overlay now differs from the prototype's disk, which did not change
        differ = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(disk.overlay), str(top)], check=False
        )
        assert differ.returncode == 1
        assert [
            subprocess.run(["sha1sum", str(p)], check=True, capture_output=True).stdout for p in (base, top)
        ] == sums
        pit.check_unchanged(dom, view)
    finally:
        pit.cleanup(conn, dom.UUIDString(), files, None)
        remove_domain(dom)
    assert imgprep_leftovers(conn, files, None) == []
    conn.close()
    shutil.rmtree(workdir, ignore_errors=True)
