"""Clone mode's choices and its job-record state, without a host."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import libvirt
import pytest

from imgprep import pointintime as pit
from imgprep.clonecapture import CloneCapture, CloneState, _view_from_json, choose_consistency, nvram_of
from imgprep.errors import InvalidInput, NotSupported
from imgprep.guestagent import AgentProbe
from imgprep.scratchguard import ScratchGuard
from tests.unit.test_pointintime import Prototype, backup_view, libvirt_error

ANSWERS = AgentProbe("answers", "connected", 0.1)
ABSENT = AgentProbe("absent", None, 0.0)
HUNG = AgentProbe("silent", "connected", 10.0)
STOPPED = AgentProbe("silent", "disconnected", 10.0)


def test_consistency_defaults_freeze_with_agent_stop_without_a_channel_shutoff_when_off() -> None:
    assert choose_consistency(None, running=True, agent=ANSWERS) == "freeze"
    assert choose_consistency(None, running=True, agent=ABSENT) == "stop"
    assert choose_consistency("crash", running=True, agent=None) == "crash"  # crash never asks the agent
    assert choose_consistency("crash", running=True, agent=HUNG) == "crash"
    assert choose_consistency("stop", running=True, agent=ABSENT) == "stop"
    assert choose_consistency("crash", running=True, agent=ANSWERS) == "crash"
    assert choose_consistency("freeze", running=True, agent=ANSWERS) == "freeze"
    assert choose_consistency("freeze", running=False, agent=None) == "shutoff"
    assert choose_consistency(None, running=False, agent=None) == "shutoff"


@pytest.mark.parametrize("silent", [HUNG, STOPPED], ids=["hung", "stopped"])
def test_auto_with_a_silent_agent_is_refused_not_turned_into_a_stop(silent: AgentProbe) -> None:
    with pytest.raises(InvalidInput) as err:
        choose_consistency(None, running=True, agent=silent)
    assert err.value.code == "AgentUnavailable"
    (message,) = err.value.problems
    assert "--consistency auto" in message
    assert "--consistency stop" in message
    assert "crash" in message
    assert "within 10s" in message
    assert ("not running in the guest" if silent is STOPPED else "hung or busy") in message
    assert "\n" not in message


@pytest.mark.parametrize("agent", [HUNG, STOPPED, ABSENT], ids=["hung", "stopped", "no-channel"])
def test_freeze_without_an_answering_agent_is_refused(agent: AgentProbe) -> None:
    with pytest.raises(InvalidInput, match="--consistency freeze needs the QEMU guest agent") as err:
        choose_consistency("freeze", running=True, agent=agent)
    assert err.value.code == "AgentUnavailable"
    assert "--consistency stop" in err.value.problems[0]


def test_an_explicit_stop_with_a_silent_agent_is_the_operators_choice() -> None:
    assert choose_consistency("stop", running=True, agent=HUNG) == "stop"
    assert choose_consistency("stop", running=True, agent=STOPPED) == "stop"


def test_stop_with_an_answering_agent_is_refused() -> None:
    with pytest.raises(InvalidInput, match="disconnected") as err:
        choose_consistency("stop", running=True, agent=ANSWERS)
    assert err.value.code == "AgentWouldDisconnect"


UEFI_XML = """<domain type='qemu'><name>p</name><os><type>hvm</type>
<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
<nvram template='{template}'>{nvram}</nvram></os><devices/></domain>"""


def test_the_nvram_and_its_template_from_the_definition() -> None:
    xml = UEFI_XML.format(template="/usr/share/OVMF/OVMF_VARS_4M.fd", nvram="/var/lib/libvirt/qemu/nvram/p_VARS.fd")
    assert nvram_of(xml) == (Path("/var/lib/libvirt/qemu/nvram/p_VARS.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd"))
    assert nvram_of("<domain><os><type>hvm</type></os><devices/></domain>") == (None, None)


def test_the_clone_copies_the_nvram_or_for_a_never_started_vm_its_template(tmp_path: Path) -> None:
    template, nvram = tmp_path / "VARS.fd", tmp_path / "p_VARS.fd"
    template.write_bytes(b"template")
    files = pit.ViewFiles(tmp_path / "view")
    files.directory.mkdir()
    owner = (os.getuid(), os.getgid())
    # never started: libvirt has not created the store yet; the clone gets the template's
    # bytes and the prototype still has no store
    assert pit.copy_nvram(nvram, template, files, owner).read_bytes() == b"template"
    assert not nvram.exists()
    # started before (the control): its own store, not the template
    nvram.write_bytes(b"the prototype's variables")
    assert pit.copy_nvram(nvram, template, files, owner).read_bytes() == b"the prototype's variables"
    assert nvram.read_bytes() == b"the prototype's variables"


def test_a_missing_nvram_without_a_template_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotSupported, match="does not exist and its definition names no readable template"):
        pit.nvram_source(tmp_path / "p_VARS.fd", None)
    with pytest.raises(NotSupported, match="no readable template"):
        pit.nvram_source(tmp_path / "p_VARS.fd", tmp_path / "missing-template.fd")


def test_view_survives_the_job_record() -> None:
    source = pit.SourceDisk("vdb", "block", "raw", "/dev/loop3")
    view = pit.View(
        "qemu-nbd",
        "shutoff",
        (pit.ViewDisk("vdb", "nbd+unix:///vdb?socket=/j/nbd-vdb.sock", Path("/j/vdb.overlay.qcow2"), source),),
        1.5,
        pit.FreezeReport(2, 80.5, 1),
        None,
        {"state": 5, "reason": 1, "disks": {"vdb": {"rdev": "7:3", "sectors_written": 8}}},
    )
    assert _view_from_json(json.loads(json.dumps(view.as_json()))) == view
    running = pit.View("backup", "freeze", view.disks, 2.5, domain_id=12)
    assert _view_from_json(json.loads(json.dumps(running.as_json()))) == running


class FakeDom:
    def __init__(self, state: int) -> None:
        self._state = state
        self.calls: list[str] = []

    def state(self) -> list[int]:
        return [self._state, 0]

    def resume(self) -> None:
        self.calls.append("resume")

    def create(self) -> None:
        self.calls.append("create")

    def isActive(self) -> bool:
        return bool(self._state != libvirt.VIR_DOMAIN_SHUTOFF)

    def backupGetXMLDesc(self, _flags: int) -> str:
        raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN_BACKUP, "no domain backup job present")


class FakeConn:
    def __init__(self, dom: FakeDom) -> None:
        self.dom = dom

    def lookupByUUIDString(self, _uuid: str) -> FakeDom:
        return self.dom

    def lookupByName(self, name: str) -> Any:
        raise libvirt.libvirtError(f"no domain {name}")


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (libvirt.VIR_DOMAIN_SHUTOFF, ["create"]),
        (libvirt.VIR_DOMAIN_PAUSED, ["resume"]),
        (libvirt.VIR_DOMAIN_RUNNING, []),
    ],
)
def test_an_unfinished_stop_capture_leaves_the_prototype_running(
    tmp_path: Path, state: int, expected: list[str]
) -> None:
    dom = FakeDom(state)
    saved: list[str] = []
    capture = CloneCapture(
        conn=lambda: FakeConn(dom),
        vm_uuid="u",
        vm_name="web1",
        job_uuid="1234abcd",
        view_root=tmp_path,
        state=CloneState(view_dir=str(tmp_path / "missing"), consistency="stop", clone_name="imgprep-1234abcd-web1"),
        persist=lambda: saved.append("persist"),
    )
    capture.discard()
    assert dom.calls == expected
    assert saved


class RunningDom(FakeDom):
    def __init__(self) -> None:
        super().__init__(libvirt.VIR_DOMAIN_RUNNING)

    def XMLDesc(self, _flags: int) -> str:
        return "<domain><devices/></domain>"


def test_a_silent_agent_fails_the_capture_before_anything_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent answered at validation and went silent before the capture: nothing is
    created (no view directory), nothing of the prototype is asked but the agent."""
    dom = RunningDom()
    waited: list[float] = []

    def silent(_dom: Any, wait: float) -> AgentProbe:
        waited.append(wait)
        return HUNG

    monkeypatch.setattr("imgprep.clonecapture.probe", silent)
    state = CloneState()
    capture = CloneCapture(
        conn=lambda: FakeConn(dom),
        vm_uuid="u",
        vm_name="web1",
        job_uuid="1234abcd",
        view_root=tmp_path / "views",
        state=state,
        persist=lambda: None,
        agent_timeout=7,
    )
    with pytest.raises(InvalidInput) as err:
        capture.capture()
    assert err.value.code == "AgentUnavailable"
    assert waited == [7]
    assert not (tmp_path / "views").exists()
    assert state.consistency is None
    assert state.view is None
    assert dom.calls == []


class ProtoConn:
    def __init__(self, dom: Prototype) -> None:
        self.dom = dom

    def lookupByUUIDString(self, _uuid: str) -> Prototype:
        return self.dom


def running_capture(tmp_path: Path, dom: Prototype, saved: list[str]) -> CloneCapture:
    capture = CloneCapture(
        conn=lambda: ProtoConn(dom),
        vm_uuid="u",
        vm_name="web1",
        job_uuid="1234abcd",
        view_root=tmp_path,
        state=CloneState(view_dir="/j", consistency="freeze", view=backup_view().as_json()),
        persist=lambda: saved.append("persist"),
    )
    return capture


def test_check_view_fails_once_the_prototype_stopped(tmp_path: Path) -> None:
    dom = Prototype()
    capture = running_capture(tmp_path, dom, [])
    capture.check_view()  # control: running, its backup job there
    dom.active = False
    with pytest.raises(pit.PrototypeStopped):
        capture.check_view()


def test_check_view_reports_the_scratch_guard_and_records_it(tmp_path: Path) -> None:
    dom = Prototype()
    saved: list[str] = []
    capture = running_capture(tmp_path, dom, saved)
    guard = ScratchGuard(Path("/j"), 100, lambda: (True, False), free=lambda _p: 10)
    capture._guard = guard
    capture.check_view()  # control: the guard has not looked yet
    assert guard.poll() is not None
    with pytest.raises(pit.ScratchSpaceLow, match="ended the backup job") as err:
        capture.check_view()
    assert err.value.code == "ScratchSpaceLow"
    assert capture.state.scratch_trip is not None
    assert capture.state.scratch_trip["ended"] is True
    assert saved == ["persist"]


def test_the_guard_ends_our_backup_job_on_its_own_connection_and_resumes_a_paused_prototype(tmp_path: Path) -> None:
    dom = Prototype(socket=str(pit.SOCKET_ROOT / "1234abcd" / "nbd.sock"))
    dom.paused_reason = libvirt.VIR_DOMAIN_PAUSED_IOERROR  # a scratch write failed before the guard acted
    closed: list[bool] = []

    class GuardConn(ProtoConn):
        def close(self) -> None:
            closed.append(True)

    capture = CloneCapture(
        conn=lambda: pytest.fail("the guard must not use the job's connection"),
        vm_uuid="u",
        vm_name="web1",
        job_uuid="1234abcd",
        view_root=tmp_path,
        state=CloneState(view_dir=str(tmp_path / "1234abcd"), socket_dir=str(pit.SOCKET_ROOT / "1234abcd")),
        persist=lambda: None,
        socket_root=pit.SOCKET_ROOT,
        scratch_reserve=1,
        guard_connect=lambda: GuardConn(dom),
    )
    assert capture._end_view_now() == (True, True)
    assert dom.calls == ["abort", "resume"]
    assert closed == [True]
