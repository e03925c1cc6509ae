"""The job store: versioned JSON records and images in SQLite, updated atomically."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from imgprep.errors import InvalidInput
from imgprep.jobstore import RECORD_VERSION, JobStore, Record
from imgprep.workflow import new_record

VM_A = "aaaaaaaa-0000-0000-0000-000000000001"
VM_B = "bbbbbbbb-0000-0000-0000-000000000002"


def record_for(vm_uuid: str, created_at: str, image_uuid: str | None = None) -> Record:
    record = new_record(
        name=f"create-from-vm-{vm_uuid}",
        params={"vm_uuid": vm_uuid, "backend": "libvirt", "image_uuid": image_uuid},
        chain=["validate", "export"],
        onerror=["restore_disks"],
        timeout=1200,
    )
    record["created_at"] = created_at
    return record


def test_round_trip_adds_the_record_version(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state")
    record = record_for(VM_A, "2024-01-01T00:00:00.000Z", image_uuid="cccccccc-0000-0000-0000-000000000003")
    record["state"] = {"nested": {"list": [1, 2, 3]}, "unicode": "é✓"}
    store.save(record)
    got = store.get(record["uuid"])
    assert got == record
    assert got["v"] == RECORD_VERSION
    assert got is not record


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b"
    store = JobStore(state)
    assert store.path == state / "imgprep.sqlite"
    assert store.path.exists()
    assert state.stat().st_mode & 0o777 == 0o700


def test_unusable_state_dir_is_invalid_input(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InvalidInput, match="cannot use it"):
        JobStore(blocker / "state")


def test_unknown_job_is_resource_not_found(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    with pytest.raises(InvalidInput, match="no job nope") as info:
        store.get("nope")
    assert info.value.code == "ResourceNotFound"


def test_list_jobs_all_and_by_vm_in_creation_order(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    late_a = record_for(VM_A, "2024-03-01T00:00:00.000Z")
    early_a = record_for(VM_A, "2024-01-01T00:00:00.000Z")
    b = record_for(VM_B, "2024-02-01T00:00:00.000Z")
    for r in (late_a, early_a, b):
        store.save(r)
    assert [r["uuid"] for r in store.list_jobs()] == [early_a["uuid"], b["uuid"], late_a["uuid"]]
    assert [r["uuid"] for r in store.list_jobs(vm_uuid=VM_A)] == [early_a["uuid"], late_a["uuid"]]
    assert [r["uuid"] for r in store.list_jobs(vm_uuid=VM_B)] == [b["uuid"]]
    assert store.list_jobs(vm_uuid="no-such-vm") == []


def test_save_updates_in_place(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    record = record_for(VM_A, "2024-01-01T00:00:00.000Z")
    store.save(record)
    record["execution"] = "running"
    record["chain_results"].append({"name": "validate", "result": None})
    store.save(record)
    assert len(store.list_jobs()) == 1
    got = store.get(record["uuid"])
    assert got["execution"] == "running"
    assert got["chain_results"] == [{"name": "validate", "result": None}]
    # the indexed columns follow the record
    with sqlite3.connect(store.path) as db:
        row = db.execute("SELECT execution, vm_uuid FROM jobs WHERE uuid = ?", (record["uuid"],)).fetchone()
    assert row == ("running", VM_A)


def test_a_failed_update_leaves_the_previous_record_intact(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    record = record_for(VM_A, "2024-01-01T00:00:00.000Z")
    store.save(record)
    record["execution"] = "running"
    record["state"]["unserialisable"] = object()
    with pytest.raises(TypeError):
        store.save(record)
    got = store.get(record["uuid"])
    assert got["execution"] == "queued"
    assert "unserialisable" not in got["state"]


def test_a_second_store_on_the_same_dir_sees_committed_records(tmp_path: Path) -> None:
    writer = JobStore(tmp_path)
    reader = JobStore(tmp_path)
    record = record_for(VM_A, "2024-01-01T00:00:00.000Z")
    writer.save(record)
    assert reader.get(record["uuid"])["uuid"] == record["uuid"]
    # the file on disk holds the JSON text with its version
    with sqlite3.connect(writer.path) as db:
        (text,) = db.execute("SELECT record FROM jobs").fetchone()
    assert json.loads(text)["v"] == RECORD_VERSION


def test_images_table(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    image, other = "cccccccc-0000-0000-0000-000000000003", "dddddddd-0000-0000-0000-000000000004"
    store.save_image(image, "job-1", "creating", {"uuid": image, "state": "creating"}, None)
    store.save_image(other, "job-2", "active", {"uuid": other, "state": "active"}, "/images/other.qcow2")
    assert store.get_image(image) == ({"uuid": image, "state": "creating"}, None, "job-1")
    store.save_image(image, "job-1", "active", {"uuid": image, "state": "active"}, "/images/x.qcow2")
    assert store.get_image(image) == ({"uuid": image, "state": "active"}, "/images/x.qcow2", "job-1")
    assert sorted(m["uuid"] for m in store.list_images()) == [image, other]
    store.delete_image(other)
    assert [m["uuid"] for m in store.list_images()] == [image]
    with pytest.raises(InvalidInput) as info:
        store.get_image(other)
    assert info.value.code == "ResourceNotFound"
