"""Jobs through the API: create, poll, fetch; failures; the queue; restarts and SIGTERM.

These run a real server process whose only difference from production is the FAKE
backend (tests/api/fakebackend.py): each fake "guest" reports only once the test
opens its gate, so which job is queued or running is decided by the test, not by time.
"""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import hashlib
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx

from imgprep.jobstore import JobStore
from tests.api.conftest import StartServer, assert_error, create, wait_for, wait_job
from tests.api.fakebackend import add_vm, disk_content, open_gate

NODE_WORKFLOW_KEYS = {
    "uuid",
    "name",
    "execution",
    "params",
    "chain",
    "onerror",
    "chain_results",
    "onerror_results",
    "always",
    "always_results",
    "created_at",
    "started",
    "elapsed",
    "timeout",
}
ONERROR = ["discard_output"]
ALWAYS = ["restore_disks", "delete_checkpoint", "restart_vm"]


def new_vm(world: Path, name: str = "proto", *, fail: str | None = None, gate: bool = False) -> str:
    vm = str(uuid.uuid4())
    add_vm(world, vm, name, fail=fail)
    if gate:
        open_gate(world, vm)
    return vm


def start_job(client: httpx.Client, vm: str, manifest: dict[str, Any] | None = None) -> tuple[str, str]:
    response = create(client, vm, manifest)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["job_uuid"], body["image_uuid"]


def job_touched_vm(client: httpx.Client, job_uuid: str) -> bool:
    job = client.get(f"/jobs/{job_uuid}").json()
    return bool(job["execution"] == "running" and job["vm_touched"])


def test_create_poll_fetch_delete(start_server: StartServer, world: Path) -> None:
    server = start_server()
    vm = new_vm(world)
    with server.client() as client:
        response = create(client, vm, {"name": "web", "version": "1.2.3", "description": "a web server"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"image_uuid", "job_uuid"}
        job_uuid, image_uuid = body["job_uuid"], body["image_uuid"]
        assert str(uuid.UUID(job_uuid)) == job_uuid
        assert response.headers["workflow-api"] == server.url

        # the image and the job exist at once
        image = client.get(f"/images/{image_uuid}").json()
        assert image["state"] == "creating"
        assert (image["uuid"], image["name"], image["version"]) == (image_uuid, "web", "1.2.3")
        job = client.get(f"/jobs/{job_uuid}").json()
        assert set(job) >= NODE_WORKFLOW_KEYS
        assert job["uuid"] == job_uuid
        assert job["execution"] in ("queued", "running")
        assert job["params"]["image_uuid"] == image_uuid
        assert job["params"]["vm_uuid"] == vm
        chain = [step["name"] for step in job["chain"]]
        assert chain[0] == "validate"
        assert "export" in chain
        assert [step["name"] for step in job["onerror"]] == ONERROR
        assert [step["name"] for step in job["always"]] == ALWAYS
        assert client.get("/images").json() == []  # ListImages defaults to active images
        assert [i["uuid"] for i in client.get("/images", params={"state": "creating"}).json()] == [image_uuid]

    open_gate(world, vm)
    # poll as IMGAPI's client does: GET /jobs/:uuid on the workflow-api URL
    with httpx.Client(base_url=response.headers["workflow-api"], timeout=30) as workflow:
        job = wait_job(workflow, job_uuid, "succeeded", "failed", "canceled")
    assert job["execution"] == "succeeded", job
    assert [r["name"] for r in job["chain_results"]] == chain
    assert all(r["error"] is None and r["result"] == "OK" and r["finished_at"] for r in job["chain_results"])
    assert job["onerror_results"] == []
    assert [r["name"] for r in job["always_results"]] == ALWAYS  # a finally: after success too

    with server.client() as client:
        image = client.get(f"/images/{image_uuid}").json()
        assert image["state"] == "active"
        assert image["published_at"]
        assert image["description"] == "a web server"
        assert image["type"] == "zvol"
        (file_info,) = image["files"]
        assert file_info["compression"] == "gzip"

        download = client.get(f"/images/{image_uuid}/file")
        assert download.status_code == 200
        assert download.headers["content-type"] == "application/octet-stream"
        assert int(download.headers["content-length"]) == file_info["size"] == len(download.content)
        assert hashlib.sha1(download.content, usedforsecurity=False).hexdigest() == file_info["sha1"]
        md5 = base64.b64encode(hashlib.md5(download.content, usedforsecurity=False).digest()).decode()
        assert download.headers["content-md5"] == md5
        assert download.headers["etag"] == file_info["sha1"]
        assert gzip.decompress(download.content) == disk_content("proto")

        assert [i["uuid"] for i in client.get("/images").json()] == [image_uuid]
        assert [i["uuid"] for i in client.get("/images", params={"name": "~we"}).json()] == [image_uuid]
        assert [i["uuid"] for i in client.get("/images", params={"version": "1.2.3"}).json()] == [image_uuid]
        assert client.get("/images", params={"name": "other"}).json() == []
        assert client.get("/images", params={"state": "failed"}).json() == []
        assert client.get("/images", params={"account": str(uuid.uuid4())}).json() == []  # private, not theirs

        jobs = client.get(f"/images/{image_uuid}/jobs").json()
        assert [j["uuid"] for j in jobs] == [job_uuid]
        assert client.get(f"/images/{image_uuid}/jobs", params={"execution": "failed"}).json() == []
        assert client.get(f"/images/{image_uuid}/jobs", params={"task": "import-remote-image"}).json() == []

        image_dir = server.state_dir / "images"
        assert sorted(p.name for p in image_dir.iterdir()) == [f"{image_uuid}.imgmanifest", f"{image_uuid}.raw.gz"]
        deleted = client.delete(f"/images/{image_uuid}")
        assert deleted.status_code == 204
        assert deleted.content == b""
        assert_error(client.get(f"/images/{image_uuid}"), 404, "ResourceNotFound")
        assert_error(client.get(f"/images/{image_uuid}/file"), 404, "ResourceNotFound")
        assert list(image_dir.iterdir()) == []
        assert client.get(f"/jobs/{job_uuid}").json()["execution"] == "succeeded"  # the job record stays


def test_failed_job_fails_the_image_with_the_error(start_server: StartServer, world: Path) -> None:
    server = start_server()
    vm = new_vm(world, "broken", fail="prepare", gate=True)
    with server.client() as client:
        job_uuid, image_uuid = start_job(client, vm)
        job = wait_job(client, job_uuid, "succeeded", "failed", "canceled")
        assert job["execution"] == "failed"
        assert job["error"]["code"] == "PrepareImageError"
        # IMGAPI's client reports a failed job from the error of the last chain result
        assert job["chain_results"][-1]["name"] == "wait_result"
        assert job["chain_results"][-1]["error"]["code"] == "PrepareImageError"
        assert [r["name"] for r in job["onerror_results"]] == ONERROR
        assert [r["name"] for r in job["always_results"]] == ALWAYS
        assert all(r["error"] is None for r in job["onerror_results"] + job["always_results"])
        assert job["vm_restored"] is True

        image = client.get(f"/images/{image_uuid}").json()
        assert image["state"] == "failed"
        assert image["error"]["code"] == "PrepareImageError"
        assert "operator script failed" in image["error"]["message"]
        assert "files" not in image
        assert_error(client.get(f"/images/{image_uuid}/file"), 404, "ResourceNotFound")
        assert [i["uuid"] for i in client.get("/images", params={"state": "failed"}).json()] == [image_uuid]
        assert client.delete(f"/images/{image_uuid}").status_code == 204


def test_jobs_beyond_the_pool_wait_queued_and_one_job_per_vm(start_server: StartServer, world: Path) -> None:
    server = start_server(workers=1)
    vm_a, vm_b = new_vm(world, "a"), new_vm(world, "b")
    with server.client() as client:
        job_a, image_a = start_job(client, vm_a)
        wait_job(client, job_a, "running")
        job_b, image_b = start_job(client, vm_b)
        assert client.get(f"/jobs/{job_b}").json()["execution"] == "queued"  # the only worker is busy with A
        assert client.get(f"/images/{image_b}").json()["state"] == "creating"

        busy = assert_error(create(client, vm_a), 409, "VmBusy")
        assert job_a in busy["message"]
        assert_error(create(client, vm_b), 409, "VmBusy")  # a queued job holds its VM too
        assert_error(client.delete(f"/images/{image_a}"), 409, "ImageBusy")
        assert len(client.get("/images", params={"state": "all"}).json()) == 2

        open_gate(world, vm_a)
        assert wait_job(client, job_a, "succeeded", "failed")["execution"] == "succeeded"
        open_gate(world, vm_b)
        assert wait_job(client, job_b, "succeeded", "failed")["execution"] == "succeeded"
        again, _ = start_job(client, vm_a)  # the VM is free again
        assert wait_job(client, again, "succeeded", "failed")["execution"] == "succeeded"


def test_pool_runs_jobs_side_by_side(start_server: StartServer, world: Path) -> None:
    server = start_server(workers=2)
    vms = [new_vm(world, "a"), new_vm(world, "b")]
    with server.client() as client:
        jobs = [start_job(client, vm)[0] for vm in vms]
        for job in jobs:
            wait_job(client, job, "running")  # both at once: neither can finish before its gate opens
        for vm in vms:
            open_gate(world, vm)
        assert [wait_job(client, job, "succeeded", "failed")["execution"] for job in jobs] == ["succeeded"] * 2


def test_concurrent_creates_for_one_vm_start_one_job(start_server: StartServer, world: Path) -> None:
    server = start_server()
    vm = new_vm(world)

    def attempt(_: int) -> int:
        with server.client() as client:
            return create(client, vm).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(attempt, range(8)))
    assert statuses == [200] + [409] * 7
    with server.client() as client:
        assert len(client.get("/images", params={"state": "all"}).json()) == 1


def test_restart_recovers_interrupted_jobs_and_keeps_finished_ones(start_server: StartServer, world: Path) -> None:
    server = start_server(workers=1)
    vm_done, vm_running, vm_queued = new_vm(world, "done", gate=True), new_vm(world, "run"), new_vm(world, "wait")
    with server.client() as client:
        job_done, image_done = start_job(client, vm_done)
        assert wait_job(client, job_done, "succeeded", "failed")["execution"] == "succeeded"
        sha1 = client.get(f"/images/{image_done}").json()["files"][0]["sha1"]
        job_running, image_running = start_job(client, vm_running)
        wait_for("the job to stop its VM", lambda: job_touched_vm(client, job_running))
        job_queued, image_queued = start_job(client, vm_queued)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL  # a crash: nothing rolled back

    store = JobStore(server.state_dir)
    assert store.get(job_running)["execution"] == "running"
    assert store.get(job_queued)["execution"] == "queued"

    server = start_server(workers=1, state_dir=server.state_dir)
    with server.client() as client:
        # the VM the crashed job had stopped is rolled back in the background; the
        # recovery's entry is its last write (the VM is restored and the image settled first)
        job = wait_for("the recovery", lambda: (j := client.get(f"/jobs/{job_running}").json()).get("recovery") and j)
        assert job["vm_restored"] is True
        assert job["execution"] == "failed"
        assert job["error"]["code"] == "Interrupted"
        assert job["recovery"][-1]["result"] == "restored"
        assert [r["name"] for r in job["onerror_results"]] == ONERROR
        assert [r["name"] for r in job["always_results"]] == ALWAYS
        assert job["state"]["fake_restored"] is True
        image = client.get(f"/images/{image_running}").json()
        assert (image["state"], image["error"]["code"]) == ("failed", "Interrupted")

        # the queued job never touched its VM: failed, not re-run
        queued = client.get(f"/jobs/{job_queued}").json()
        assert (queued["execution"], queued["error"]["code"]) == ("failed", "Interrupted")
        assert queued["chain_results"] == []
        image = client.get(f"/images/{image_queued}").json()
        assert (image["state"], image["error"]["code"]) == ("failed", "Interrupted")

        # finished work is still served
        assert client.get(f"/jobs/{job_done}").json()["execution"] == "succeeded"
        download = client.get(f"/images/{image_done}/file")
        assert download.status_code == 200
        assert hashlib.sha1(download.content, usedforsecurity=False).hexdigest() == sha1

        # and the recovered VM takes new jobs
        open_gate(world, vm_running)
        again, _ = start_job(client, vm_running)
        assert wait_job(client, again, "succeeded", "failed")["execution"] == "succeeded"


def test_sigterm_cancels_running_jobs_which_roll_back(start_server: StartServer, world: Path) -> None:
    server = start_server(workers=1)
    vm_running, vm_queued = new_vm(world, "run"), new_vm(world, "wait")
    with server.client() as client:
        job_running, image_running = start_job(client, vm_running)
        wait_for("the job to stop its VM", lambda: job_touched_vm(client, job_running))
        job_queued, image_queued = start_job(client, vm_queued)
    assert server.stop(signal.SIGTERM) == 0
    assert "stopped (SIGTERM)" in server.output()

    store = JobStore(server.state_dir)
    job = store.get(job_running)
    assert job["execution"] == "canceled"
    assert job["error"]["code"] == "Canceled"
    assert [r["name"] for r in job["onerror_results"]] == ONERROR
    assert [r["name"] for r in job["always_results"]] == ALWAYS
    assert all(r["error"] is None for r in job["onerror_results"] + job["always_results"])
    assert job["vm_restored"] is True
    assert store.get_image(image_running)[0]["state"] == "failed"
    queued = store.get(job_queued)
    assert (queued["execution"], queued["error"]["code"]) == ("failed", "Interrupted")
    assert store.get_image(image_queued)[0]["state"] == "failed"

    server = start_server(workers=1, state_dir=server.state_dir)
    with server.client() as client:
        served = client.get(f"/jobs/{job_running}").json()
        assert served["execution"] == "canceled"
        assert "recovery" not in served  # rolled back before the stop: nothing left to recover
