"""The SmartOS backend checks free space again before export, against the size of the
image stream after the prepare boot (``zfs send -nP`` of ``@final``): a zone can fill
its dataset during that boot. The output filesystem's size is faked
(``shutil.disk_usage``); the node is the simulator."""

from __future__ import annotations

import shutil
import types
from pathlib import Path
from typing import Any

import pytest

from imgprep.jobstore import JobStore
from tests.simulator import tree_digest
from tests.smartos.conftest import Node, summary

MiB = 1024 * 1024
# writes 8 MiB of incompressible data into the zone's dataset
FILL = """#!/bin/sh
mkdir -p "$IMGPREP_ROOT/var/tmp"
head -c 8388608 /dev/urandom > "$IMGPREP_ROOT/var/tmp/fill"
"""
QUIET = "#!/bin/sh\ntrue\n"


@pytest.fixture
def small_output(sim: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output filesystem has 6 MiB free: enough for the zone as it is (~1.6 MiB)."""
    real = shutil.disk_usage

    def disk_usage(path: Any) -> Any:
        if Path(path) == sim.output:
            return types.SimpleNamespace(total=64 * MiB, used=58 * MiB, free=6 * MiB)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def _script(sim: Node, text: str) -> str:
    path = sim.tmp / "operator-script"
    path.write_text(text)
    return str(path)


def test_a_zone_filled_during_the_prepare_boot_fails_before_export(sim: Node, small_output: None) -> None:
    uuid = sim.zone()
    before = tree_digest(sim.node.zonepath(uuid))

    code, out, _err = sim.create(uuid, "--script", _script(sim, FILL))

    assert code == 1
    job = JobStore(sim.state_dir).get(summary(out)["job_uuid"])
    assert job["error"]["code"] == "InsufficientSpace"
    assert "after the prepare boot" in job["error"]["message"]
    assert [c for c in sim.node.commands if c[:2] == ["zfs", "send"] and "-nP" not in c] == []
    assert list(sim.output.iterdir()) == []
    assert tree_digest(sim.node.zonepath(uuid)) == before  # rolled back, the filler included
    assert sim.node.snapshot_names(f"zones/{uuid}") == []


def test_control_a_zone_that_does_not_grow_is_exported(sim: Node, small_output: None) -> None:
    uuid = sim.zone()

    code, out, err = sim.create(uuid, "--script", _script(sim, QUIET))

    assert code == 0, err
    assert Path(summary(out)["file"]).exists()
