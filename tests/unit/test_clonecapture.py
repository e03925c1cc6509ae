"""Clone mode's choices and its job-record state, without a host."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import libvirt
import pytest

from imgprep import pointintime as pit
from imgprep.clonecapture import CloneCapture, CloneState, _view_from_json, choose_consistency
from imgprep.errors import InvalidInput


def test_consistency_defaults_freeze_with_agent_stop_without_shutoff_when_off() -> None:
    assert choose_consistency(None, running=True, agent_answers=True) == "freeze"
    assert choose_consistency(None, running=True, agent_answers=False) == "stop"
    assert choose_consistency("crash", running=True, agent_answers=False) == "crash"
    assert choose_consistency("stop", running=True, agent_answers=False) == "stop"
    assert choose_consistency("crash", running=True, agent_answers=True) == "crash"
    assert choose_consistency("freeze", running=False, agent_answers=False) == "shutoff"


def test_freeze_without_an_agent_is_refused() -> None:
    with pytest.raises(InvalidInput, match="guest agent"):
        choose_consistency("freeze", running=True, agent_answers=False)


def test_stop_with_an_answering_agent_is_refused() -> None:
    with pytest.raises(InvalidInput, match="disconnected") as err:
        choose_consistency("stop", running=True, agent_answers=True)
    assert err.value.code == "AgentWouldDisconnect"


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
        raise libvirt.libvirtError("no domain backup job present")


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
