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

    def ID(self) -> int:
        return 7


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
    assert view.domain_id == 7  # check_running tells a restarted prototype by its new ID
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


# --- a running prototype's view ends ----------------------------------------------------


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    """A libvirtError carrying ``code`` (as libvirt sets it from its last error)."""
    exc = libvirt.libvirtError(message)
    exc.err = (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, -1)
    return exc


BACKUP_OF = "<domainbackup mode='pull'><server transport='unix' socket='{}'/></domainbackup>"


class Prototype:
    """A running prototype as check_running and end_backup see it."""

    def __init__(self, *, active: bool = True, dom_id: int = 7, socket: str | None = "/j/nbd.sock") -> None:
        self.active = active
        self.dom_id = dom_id
        self.socket = socket  # the backup job's socket (None: no job)
        self.broken: libvirt.libvirtError | None = None  # every backup query fails so
        self.paused_reason: int | None = None
        self.calls: list[str] = []

    def isActive(self) -> bool:
        return self.active

    def ID(self) -> int:
        return self.dom_id if self.active else -1

    def backupGetXMLDesc(self, _flags: int) -> str:
        if self.broken is not None:
            raise self.broken
        if not self.active:
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID, "domain is not running")
        if self.socket is None:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN_BACKUP, "no domain backup job present")
        return BACKUP_OF.format(self.socket)

    def abortJob(self) -> None:
        self.calls.append("abort")
        self.socket = None  # (libvirt ends it asynchronously; here at once)

    def state(self) -> list[int]:
        if self.paused_reason is not None:
            return [libvirt.VIR_DOMAIN_PAUSED, self.paused_reason]
        return [libvirt.VIR_DOMAIN_RUNNING, 1]

    def resume(self) -> None:
        self.calls.append("resume")
        self.paused_reason = None


FILES = pit.ViewFiles(Path("/j"))


def backup_view(domain_id: int | None = 7) -> pit.View:
    return pit.View("backup", "freeze", (), 1.0, domain_id=domain_id)


def test_a_running_prototype_with_its_backup_job_passes_the_check() -> None:
    pit.check_running(Prototype(), backup_view(), FILES)
    pit.check_running(Prototype(), backup_view(domain_id=None), FILES)  # a record from before the ID was kept


@pytest.mark.parametrize(
    ("proto", "error", "words"),
    [
        (Prototype(active=False, socket=None), pit.PrototypeStopped, "the prototype stopped during the job"),
        (Prototype(dom_id=8), pit.PrototypeStopped, "does not start the prototype again"),  # stopped, started again
        (Prototype(socket=None), pit.ViewEnded, "backup job ended during the job"),
        (Prototype(socket="/other/nbd.sock"), pit.ViewEnded, "aborted outside imgprep"),  # someone else's job
    ],
    ids=["shut-off", "restarted", "job-gone", "foreign-job"],
)
def test_a_view_that_ended_fails_the_check(proto: Prototype, error: type[pit.ViewEnded], words: str) -> None:
    with pytest.raises(error, match=words) as err:
        pit.check_running(proto, backup_view(), FILES)
    assert type(err.value) is error


def test_a_lost_connection_says_nothing_about_the_view() -> None:
    proto = Prototype()
    proto.broken = libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, "End of file while reading data")
    with pytest.raises(libvirt.libvirtError, match="End of file"):
        pit.check_running(proto, backup_view(), FILES)
    with pytest.raises(libvirt.libvirtError, match="End of file"):
        pit.our_backup_job(proto, FILES)


def test_a_shut_off_view_is_not_checked_for_a_backup_job() -> None:
    view = pit.View("qemu-nbd", "shutoff", (), 1.0)
    pit.check_running(Prototype(active=False, socket=None), view, FILES)


def test_end_backup_aborts_only_our_job() -> None:
    ours, foreign, none = Prototype(), Prototype(socket="/other/nbd.sock"), Prototype(socket=None)
    assert pit.end_backup(ours, FILES) is True
    assert ours.calls == ["abort"]
    assert pit.end_backup(foreign, FILES) is False
    assert pit.end_backup(none, FILES) is False
    assert foreign.calls == none.calls == []


def test_only_a_pause_on_a_write_error_is_resumed() -> None:
    proto = Prototype()
    assert pit.resume_after_write_error(proto) is False  # running
    proto.paused_reason = libvirt.VIR_DOMAIN_PAUSED_USER  # its owner paused it
    assert pit.resume_after_write_error(proto) is False
    assert proto.calls == []
    proto.paused_reason = libvirt.VIR_DOMAIN_PAUSED_IOERROR
    assert pit.resume_after_write_error(proto) is True
    assert proto.calls == ["resume"]
