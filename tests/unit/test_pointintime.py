"""Point-in-time logic that needs no host: disk parsing, the backup XML, freeze/thaw
ordering and retries (a fake domain stands in for libvirt's)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from imgprep import pointintime as pit
from imgprep.errors import NotSupported

DOMAIN = """<domain type='qemu'><name>p</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/a.qcow2'/>
    <target dev='vda'/></disk>
  <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/var'/>
    <target dev='vdb'/></disk>
  <disk type='file' device='cdrom'><source file='/iso'/><target dev='sda'/></disk>
</devices></domain>"""


def test_source_disks_file_and_block() -> None:
    assert pit.SourceDisk.from_xml(DOMAIN) == [
        pit.SourceDisk("vda", "file", "qcow2", "/v/a.qcow2"),
        pit.SourceDisk("vdb", "block", "raw", "/dev/vg/var"),
    ]


def test_source_disks_refuses_network_and_other_formats_all_at_once() -> None:
    xml = """<domain><devices>
      <disk type='network' device='disk'><source protocol='rbd' name='p/i'/><target dev='vda'/></disk>
      <disk type='file' device='disk'><driver type='vmdk'/><source file='/x.vmdk'/><target dev='vdb'/></disk>
    </devices></domain>"""
    with pytest.raises(NotSupported) as err:
        pit.SourceDisk.from_xml(xml)
    assert "vda is a network disk" in err.value.message
    assert "vdb is vmdk" in err.value.message


def test_backup_xml_pull_mode_unix_socket_scratch_per_disk() -> None:
    files = pit.ViewFiles(Path("/j"))
    root = ET.fromstring(pit.backup_xml(files, pit.SourceDisk.from_xml(DOMAIN)))
    assert root.get("mode") == "pull"
    server = root.find("server")
    assert server is not None
    assert server.attrib == {"transport": "unix", "socket": "/j/nbd.sock"}
    scratches = {d.get("name"): d.find("scratch").get("file") for d in root.findall("disks/disk")}  # type: ignore[union-attr]
    assert scratches == {"vda": "/j/vda.scratch.qcow2", "vdb": "/j/vdb.scratch.qcow2"}


class FakeDom:
    """Records the agent and backup calls; fails them on request."""

    def __init__(self, freeze_fails: bool = False, thaw_failures: int = 0, begin_fails: bool = False) -> None:
        self.calls: list[str] = []
        self.freeze_fails = freeze_fails
        self.thaw_failures = thaw_failures
        self.begin_fails = begin_fails

    def agentSetResponseTimeout(self, timeout: int) -> None:
        self.calls.append(f"timeout {timeout}")

    def fsFreeze(self) -> int:
        self.calls.append("freeze")
        if self.freeze_fails:
            raise libvirt.libvirtError("guest agent is not responding")
        return 2

    def fsThaw(self) -> int:
        self.calls.append("thaw")
        if self.thaw_failures:
            self.thaw_failures -= 1
            raise libvirt.libvirtError("guest agent is not responding")
        return 2

    def backupBegin(self, xml: str, checkpoint: Any, flags: int) -> None:
        self.calls.append("begin")
        if self.begin_fails:
            raise libvirt.libvirtError("no space left on device")


def quick_thaw(dom: Any) -> int:
    return pit.thaw(dom, attempts=3, delay=0)


def capture(dom: FakeDom) -> pit.View:
    disks = pit.SourceDisk.from_xml(DOMAIN)
    return pit.capture_running(dom, pit.ViewFiles(Path("/j")), disks, "freeze", agent_timeout=7, thaw_fn=quick_thaw)


def test_freeze_then_backup_then_thaw() -> None:
    dom = FakeDom()
    view = capture(dom)
    assert dom.calls == ["timeout 7", "freeze", "begin", "thaw"]
    assert view.freeze is not None
    assert view.freeze.frozen == 2
    assert view.freeze.thaw_attempts == 1
    assert view.how == "backup"
    assert [d.uri for d in view.disks] == ["nbd+unix:///vda?socket=/j/nbd.sock", "nbd+unix:///vdb?socket=/j/nbd.sock"]


def test_a_failed_thaw_is_retried() -> None:
    dom = FakeDom(thaw_failures=2)
    view = capture(dom)
    assert dom.calls == ["timeout 7", "freeze", "begin", "thaw", "thaw", "thaw"]
    assert view.freeze is not None
    assert view.freeze.thaw_attempts == 3


def test_a_thaw_that_never_succeeds_is_reported_loudly() -> None:
    dom = FakeDom(thaw_failures=10)
    with pytest.raises(pit.ThawFailed, match="FROZEN"):
        capture(dom)
    assert dom.calls.count("thaw") == 3


def test_a_failed_freeze_captures_nothing_and_thaws_what_it_may_have_frozen() -> None:
    dom = FakeDom(freeze_fails=True)
    with pytest.raises(pit.FreezeFailed):
        capture(dom)
    assert dom.calls == ["timeout 7", "freeze", "thaw"]


def test_a_failed_backup_still_thaws() -> None:
    dom = FakeDom(begin_fails=True)
    with pytest.raises(libvirt.libvirtError, match="no space"):
        capture(dom)
    assert dom.calls == ["timeout 7", "freeze", "begin", "thaw"]


def test_qemu_nbd_options_lock_nothing_and_refuse_commas() -> None:
    opts = pit._qemu_nbd_image_opts(pit.SourceDisk("vdb", "block", "raw", "/dev/loop3"))
    assert opts == "driver=raw,file.driver=host_device,file.filename=/dev/loop3,file.locking=off"
    with pytest.raises(NotSupported, match="comma"):
        pit._qemu_nbd_image_opts(pit.SourceDisk("vda", "file", "qcow2", "/v/a,b.qcow2"))


def test_cleanup_never_kills_a_process_that_is_not_our_qemu_nbd(tmp_path: Path) -> None:
    pidfile = tmp_path / "nbd-vda.pid"
    pidfile.write_text("1\n")  # pid 1 is not a qemu-nbd serving our socket
    assert pit._stop_qemu_nbd(pidfile, tmp_path / "nbd-vda.sock") is None
    pidfile.write_text("not a pid")
    assert pit._stop_qemu_nbd(pidfile, tmp_path / "nbd-vda.sock") is None
