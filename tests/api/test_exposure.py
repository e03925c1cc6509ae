"""What the API gives whom: a token by default, the open workflow poll, jobs per account."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.api.conftest import StartServer, assert_error, create, wait_job
from tests.api.fakebackend import add_vm, open_gate

# what the public job view must never carry (host paths, URIs, SSH targets, guest output)
PRIVATE_KEYS = ("state", "prepare", "boot_report", "vm_touched", "manifest")


def new_vm(world: Path) -> str:
    vm = str(uuid.uuid4())
    add_vm(world, vm, "proto")
    open_gate(world, vm)
    return vm


def test_a_token_is_generated_on_first_start_and_required(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(fake=True)
    token_file = server.state_dir / "serve.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert server.token == token
    vm = new_vm(tmp_path / "world")
    image = str(uuid.uuid4())
    with server.client(auth=False) as anonymous:
        assert anonymous.get("/ping").status_code == 200
        params = {"action": "create-from-vm", "vm_uuid": vm}
        assert_error(anonymous.post("/images", params=params, json={"name": "x"}), 401, "UnauthorizedError")
        assert_error(anonymous.get("/images"), 401, "UnauthorizedError")
        assert_error(anonymous.get(f"/images/{image}"), 401, "UnauthorizedError")
        assert_error(anonymous.get(f"/images/{image}/file"), 401, "UnauthorizedError")
        assert_error(anonymous.get(f"/images/{image}/jobs"), 401, "UnauthorizedError")
        assert_error(anonymous.delete(f"/images/{image}"), 401, "UnauthorizedError")
    with server.client() as client:  # control: the same requests with the token
        assert client.get("/images").status_code == 200
        assert create(client, vm).status_code == 200
    # a restart reads the same token back
    server.stop()
    again = start_server(fake=True, state_dir=server.state_dir)
    assert again.token == token
    with again.client() as client:
        assert client.get("/images").status_code == 200


def test_a_token_file_others_can_read_is_refused(start_server: StartServer) -> None:
    server = start_server(fake=True)
    server.stop()
    (server.state_dir / "serve.token").chmod(0o644)
    with pytest.raises(AssertionError, match="readable or writable by others"):  # did not start: stderr says why
        start_server(fake=True, state_dir=server.state_dir)


def test_the_workflow_poll_without_credentials_sees_only_the_public_view(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server(fake=True)
    vm = new_vm(tmp_path / "world")
    with server.client() as client:
        response = create(client, vm, {"name": "img", "version": "1.0"})
        job_uuid = response.json()["job_uuid"]
        full = wait_job(client, job_uuid, "succeeded", "failed")
        assert "state" in full  # control: the operator sees the whole record
    with server.client(auth=False) as anonymous:
        public = anonymous.get(f"/jobs/{job_uuid}")
        assert public.status_code == 200
        job = public.json()
        assert job["execution"] == full["execution"]
        assert job["uuid"] == job_uuid
        assert [r["name"] for r in job["chain_results"]] == [r["name"] for r in full["chain_results"]]
        assert [r["error"] for r in job["chain_results"]] == [r["error"] for r in full["chain_results"]]
        for key in PRIVATE_KEYS:
            assert key not in job, key
        assert str(server.state_dir) not in json.dumps(job)
        assert_error(anonymous.get(f"/jobs/{uuid.uuid4()}"), 404, "ResourceNotFound")


def test_job_records_do_not_cross_accounts(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(fake=True)
    vm = new_vm(tmp_path / "world")
    owner, other = str(uuid.uuid4()), str(uuid.uuid4())
    with server.client() as client:
        response = create(client, vm, {"name": "img", "version": "1.0", "public": True}, account=owner)
        assert response.status_code == 200, response.text
        job_uuid, image_uuid = response.json()["job_uuid"], response.json()["image_uuid"]
        wait_job(client, job_uuid, "succeeded")
        # the image is public: the other account sees it, but not the job that made it
        assert client.get(f"/images/{image_uuid}", params={"account": other}).status_code == 200
        assert client.get(f"/images/{image_uuid}/jobs", params={"account": other}).json() == []
        assert_error(client.get(f"/jobs/{job_uuid}", params={"account": other}), 404, "ResourceNotFound")
        # the owner sees its job, in the public view
        mine = client.get(f"/images/{image_uuid}/jobs", params={"account": owner}).json()
        assert [j["uuid"] for j in mine] == [job_uuid]
        own = client.get(f"/jobs/{job_uuid}", params={"account": owner}).json()
        for view in (*mine, own):
            for key in PRIVATE_KEYS:
                assert key not in view, key
        # control: without an account (the operator) the whole records
        assert "state" in client.get(f"/images/{image_uuid}/jobs").json()[0]
