"""The capture options: --capture, --consistency, --disk, the YAML keys, old records."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgprep.backends.base import CreateRequest
from imgprep.cli import format_capture
from imgprep.config import Config, load_config
from imgprep.errors import InvalidInput
from imgprep.jobs import build_request, chain_names


def test_clone_is_the_default_capture(tmp_path: Path) -> None:
    request = build_request(Config(), vm="x", output_dir=tmp_path)
    assert (request.capture, request.consistency, request.disk) == ("clone", "auto", None)
    assert request.index()["capture"] == "clone"


def test_capture_and_consistency_from_the_config_unless_given(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("capture: in-place\n")
    config = load_config(config_file)
    assert build_request(config, vm="x", output_dir=tmp_path).capture == "in-place"
    assert build_request(config, vm="x", output_dir=tmp_path, capture="clone").capture == "clone"
    config_file.write_text("consistency: crash\n")
    assert build_request(load_config(config_file), vm="x", output_dir=tmp_path).consistency == "crash"


def test_bad_capture_values_are_refused(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("capture: snapshot\nconsistency: maybe\n")
    with pytest.raises(InvalidInput) as exc:
        load_config(config_file)
    assert len(exc.value.problems) == 2
    with pytest.raises(InvalidInput) as exc:
        build_request(Config(), vm="x", output_dir=tmp_path, capture="in-place", consistency="freeze", disk="../x")
    assert len(exc.value.problems) == 2  # a consistency in place; a disk that is not a target


def test_smartos_keeps_its_own_capture(tmp_path: Path) -> None:
    request = build_request(Config(), vm="x", output_dir=tmp_path, backend="smartos", host="h")
    assert request.capture == "in-place"
    with pytest.raises(InvalidInput, match="apply to the libvirt backend"):
        build_request(Config(), vm="x", output_dir=tmp_path, backend="smartos", host="h", capture="clone")


def test_a_record_from_before_clone_mode_captured_in_place(tmp_path: Path) -> None:
    data = build_request(Config(), vm="x", output_dir=tmp_path).to_json()
    assert CreateRequest.from_json(data).capture == "clone"
    del data["capture"]
    assert CreateRequest.from_json(data).capture == "in-place"


def test_each_capture_has_its_own_chain() -> None:
    clone = chain_names(Config(), "libvirt", "clone")
    in_place = chain_names(Config(), "libvirt", "in-place")
    assert clone["create"][:3] == ["validate", "capture", "overlays"]
    assert clone["always"] == ["discard_verify", "discard_clone"]
    assert in_place["create"][:3] == ["validate", "stop_vm", "checkpoint"]
    assert in_place["always"] == ["discard_verify", "restore_disks", "delete_checkpoint", "restart_vm"]
    assert clone["create"][3:] == in_place["create"][3:]  # inject .. write_manifest shared
    assert clone["create"][-3:] == ["export", "verify", "write_manifest"]


def test_the_capture_line_names_the_cost() -> None:
    freeze = {"capture": "clone", "consistency": "freeze", "freeze_window_ms": 312.4}
    assert format_capture(freeze) == "capture: clone, consistency freeze, filesystems frozen for 312 ms"
    stop = {"capture": "clone", "consistency": "stop", "downtime_s": 14.25}
    assert format_capture(stop).endswith("prototype down for 14.2 s")


def test_the_clone_state_survives_the_record() -> None:
    from imgprep.backends.libvirt import LibvirtState

    state = LibvirtState(vm_uuid="u")
    state.clone.view_dir = "/var/lib/imgprep-views/j"
    state.clone.socket_dir = "/run/imgprep/views/j"
    state.clone.root_target = "vdb"
    state.in_place.downtime_s = 12.5
    again = LibvirtState.from_json(state.to_json())
    assert again.clone == state.clone
    assert again.in_place == state.in_place
    assert LibvirtState.from_json({"vm_uuid": "u"}).clone.view_dir is None  # a record from before clone mode
