"""Job records written by imgprep 0.1.0 (record version 1, tests/data/records) are still
read and recovered; recovery never connects anywhere a record names.

The libvirt fixture is recovered against libvirt's in-process test driver
(``test:///default``, shared by the connections of one process), set up as the job had
left it: the VM shut off with the job's checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import libvirt
import pytest

from imgprep.backends.base import CreateRequest
from imgprep.backends.libvirt import LibvirtState
from imgprep.config import Config
from imgprep.errors import InvalidInput
from imgprep.jobs import job_needs_recovery, recover
from imgprep.jobstore import RECORD_VERSION, JobStore, upgrade

RECORDS = Path(__file__).resolve().parents[1] / "data" / "records"
TEST_URI = "test:///default"


def fixture_record(name: str, subs: dict[str, str]) -> dict[str, Any]:
    text = (RECORDS / name).read_text()
    for key, value in subs.items():
        text = text.replace(key, value)
    assert "@" not in "".join(line for line in text.splitlines() if '"@' in line), "a placeholder is left"
    record: dict[str, Any] = json.loads(text)
    return record


def store_raw(store: JobStore, record: dict[str, Any]) -> None:
    """Store the record exactly as the old imgprep wrote it (``save`` would stamp it v2)."""
    store.save(dict(record))
    db = sqlite3.connect(store.path)
    with db:
        db.execute("UPDATE jobs SET record = ? WHERE uuid = ?", (json.dumps(record, sort_keys=True), record["uuid"]))
    db.close()


@pytest.fixture
def test_domain() -> Any:
    conn = libvirt.open(TEST_URI)
    dom = conn.lookupByName("test")
    for name in dom.snapshotListNames():
        dom.snapshotLookupByName(name).delete(0)
    if not dom.isActive():
        dom.create()
    yield dom
    conn.close()


def interrupted_libvirt_job(tmp_path: Path, dom: Any, uri: str) -> tuple[Config, str]:
    job = str(uuid.uuid4())
    record = fixture_record(
        "v1-libvirt-interrupted-after-checkpoint.json",
        {
            "@JOB_UUID@": job,
            "@JOB8@": job[:8],
            "@VM_UUID@": dom.UUIDString(),
            "@IMAGE_UUID@": str(uuid.uuid4()),
            "@OUTPUT_DIR@": str(tmp_path),
            "@LIBVIRT_URI@": uri,
        },
    )
    assert record["v"] == 1
    # what the job had done when it died: stopped the VM, taken its checkpoint
    dom.shutdown()
    dom.snapshotCreateXML(f"<domainsnapshot><name>imgprep-pre-prepare-{job[:8]}</name></domainsnapshot>", 0)
    config = Config(state_dir=tmp_path / "state", output_dir=tmp_path, libvirt_uri=TEST_URI)
    store_raw(JobStore(config.state_dir), record)
    return config, job


def test_a_v1_libvirt_record_is_read_typed_and_recovered(tmp_path: Path, test_domain: Any) -> None:
    config, job = interrupted_libvirt_job(tmp_path, test_domain, TEST_URI)
    record = JobStore(config.state_dir).get(job)
    assert record["v"] == RECORD_VERSION
    request = CreateRequest.from_json(record["request"])
    assert (request.vm, request.backend, request.compression) == ("test", "libvirt", "zstd")
    state = LibvirtState.from_json(record["state"])
    assert state.in_place.checkpoint == f"imgprep-pre-prepare-{job[:8]}"  # a str in v1's flat state
    assert state.was_running is True
    assert job_needs_recovery(config, record)

    recovered = recover(config, job)
    assert recovered["vm_restored"] is True
    assert recovered["execution"] == "failed"
    assert recovered["error"]["code"] == "Interrupted"
    assert [r["name"] for r in recovered["always_results"]] == [
        "discard_verify",
        "restore_disks",
        "delete_checkpoint",
        "restart_vm",
    ]
    assert all(r["error"] is None for r in recovered["always_results"])
    assert [r["name"] for r in recovered["onerror_results"]] == ["discard_output"]  # the image was not finished
    assert test_domain.snapshotListNames() == []
    assert test_domain.isActive()  # it was running: restarted
    assert not job_needs_recovery(config, JobStore(config.state_dir).get(job))


def test_recovery_refuses_a_record_whose_libvirt_uri_differs(tmp_path: Path, test_domain: Any) -> None:
    """A record could say ``qemu+ext:///system?command=...``: recovery must not run it."""
    marker = tmp_path / "ran"
    command = tmp_path / "hostile"
    command.write_text(f"#!/bin/sh\ntouch {marker}\n")
    command.chmod(0o755)
    hostile = f"qemu+ext:///system?command={command}"
    config, job = interrupted_libvirt_job(tmp_path, test_domain, hostile)
    with pytest.raises(InvalidInput, match="recovery uses only the configured connection") as info:
        recover(config, job)
    assert info.value.code == "RecoveryTargetMismatch"
    assert not marker.exists()
    assert test_domain.snapshotListNames() == [f"imgprep-pre-prepare-{job[:8]}"]  # nothing touched
    assert not test_domain.isActive()
    assert job_needs_recovery(config, JobStore(config.state_dir).get(job))
    # control: connecting to that URI does run the command
    with contextlib.suppress(libvirt.libvirtError):
        libvirt.open(hostile)
    assert marker.exists()


def test_a_record_newer_than_this_imgprep_is_refused() -> None:
    with pytest.raises(InvalidInput, match="newer than this imgprep reads"):
        upgrade({"uuid": "x", "v": RECORD_VERSION + 1})
    assert upgrade({"uuid": "x", "v": RECORD_VERSION})["v"] == RECORD_VERSION  # control
