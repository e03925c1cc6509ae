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
