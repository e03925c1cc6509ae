"""The HTTP API against real server processes: shapes, status codes, auth, traversal, bad input."""

from __future__ import annotations

import base64
import http.client
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from imgprep.jobstore import JobStore
from tests.api.conftest import Server, StartServer, assert_error, create, nothing_created, spawn, write_config
from tests.api.fakebackend import add_vm

UUID = str(uuid.uuid4())


@pytest.fixture
def real_server(start_server: StartServer) -> Server:
    return start_server(fake=False)


@pytest.fixture
def fake_server(start_server: StartServer, world: Path) -> Server:
    return start_server(fake=True)


# --- basics -------------------------------------------------------------------------


def test_ping_has_imgapi_shape(real_server: Server) -> None:
    with real_server.client() as client:
        response = client.get("/ping")
    assert response.status_code == 200
    body = response.json()
    assert body["ping"] == "pong"
    assert body["imgapi"] is True
    assert isinstance(body["pid"], int)
    assert body["pid"] == real_server.proc.pid
    assert body["version"]


def test_unknown_routes_and_methods_answer_imgapi_errors(real_server: Server) -> None:
    with real_server.client() as client:
        assert_error(client.get("/nope"), 404, "ResourceNotFound")
        assert_error(client.put("/images"), 405, "MethodNotAllowed")
        assert_error(client.get(f"/images/{UUID}"), 404, "ResourceNotFound")
        assert_error(client.get(f"/images/{UUID}/file"), 404, "ResourceNotFound")
        assert_error(client.get(f"/images/{UUID}/jobs"), 404, "ResourceNotFound")
        assert_error(client.delete(f"/images/{UUID}"), 404, "ResourceNotFound")
        assert_error(client.get(f"/jobs/{UUID}"), 404, "ResourceNotFound")
        assert_error(client.get("/jobs/not-a-uuid"), 404, "ResourceNotFound")
        assert client.get("/images").json() == []


# --- create: validation, nothing touched ---------------------------------------------


@pytest.mark.parametrize(
    ("query", "status", "code", "field"),
    [
        ({"action": "create-from-vm"}, 422, "ValidationFailed", "vm_uuid"),
        ({"action": "create-from-vm", "vm_uuid": "not-a-uuid"}, 422, "InvalidParameter", "vm_uuid"),
        ({"vm_uuid": UUID}, 422, "InvalidParameter", "action"),
        ({"action": "import", "vm_uuid": UUID}, 422, "InvalidParameter", "action"),
        ({"action": "create-from-vm", "vm_uuid": UUID, "incremental": "true"}, 422, "InvalidParameter", "incremental"),
        ({"action": "create-from-vm", "vm_uuid": UUID, "incremental": "maybe"}, 422, "InvalidParameter", "incremental"),
        (
            {"action": "create-from-vm", "vm_uuid": UUID, "max_origin_depth": "deep"},
            422,
            "InvalidParameter",
            "max_origin_depth",
        ),
        (
            {"action": "create-from-vm", "vm_uuid": UUID, "max_origin_depth": "1"},
            422,
            "InvalidParameter",
            "max_origin_depth",
        ),
        ({"action": "create-from-vm", "vm_uuid": UUID, "account": "bob"}, 422, "InvalidParameter", "account"),
        ({"action": "create-from-vm", "vm_uuid": UUID, "channel": "dev"}, 422, "InvalidParameter", "channel"),
    ],
)
def test_create_rejects_bad_query(
    fake_server: Server, query: dict[str, str], status: int, code: str, field: str
) -> None:
    with fake_server.client() as client:
        body = assert_error(client.post("/images", params=query, json={"name": "x"}), status, code)
        assert [e["field"] for e in body["errors"]] == [field]
        assert nothing_created(client)


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "InvalidContent"),
        (b"\xff\xfe", 400, "InvalidContent"),
        (b"", 422, "ValidationFailed"),
        (b"[1, 2]", 422, "ValidationFailed"),
        (b'"a string"', 422, "ValidationFailed"),
        (b"[" * 100_000, 400, "InvalidContent"),
        (b'{"name": "x", "version": ' + b"9" * 5000 + b"}", 400, "InvalidContent"),
        (b'{"requirements": {"min_ram": ' + b"1" * 5000 + b"}}", 400, "InvalidContent"),
        (b"9" * 5000, 400, "InvalidContent"),
        (b'{"a":' * 5000, 400, "InvalidContent"),
        (b'{"name": NaN}', 400, "InvalidContent"),
        (b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}', 413, "RequestEntityTooLarge"),
    ],
)
def test_create_rejects_malformed_bodies(
    fake_server: Server, world: Path, content: bytes, status: int, code: str
) -> None:
    vm = str(uuid.uuid4())
    add_vm(world, vm, "proto")
    with fake_server.client() as client:
        params = {"action": "create-from-vm", "vm_uuid": vm}
        response = client.post("/images", params=params, content=content, headers={"content-type": "application/json"})
        assert_error(response, status, code)
        assert nothing_created(client)


def test_create_reports_every_manifest_problem(fake_server: Server, world: Path) -> None:
    vm = str(uuid.uuid4())
    add_vm(world, vm, "proto")
    manifest = {"name": "bad name!", "version": "1", "state": "active", "os": "plan9", "colour": "blue"}
    with fake_server.client() as client:
        body = assert_error(create(client, vm, manifest), 422, "ValidationFailed")
        assert sorted(e["field"] for e in body["errors"]) == ["colour", "name", "os", "state"]
        assert nothing_created(client)


def test_create_refuses_owner_other_than_account(fake_server: Server, world: Path) -> None:
    vm = str(uuid.uuid4())
    add_vm(world, vm, "proto")
    with fake_server.client() as client:
        body = {"name": "img", "version": "1", "owner": str(uuid.uuid4())}
        response = create(client, vm, body, account=str(uuid.uuid4()))
        assert assert_error(response, 422, "InvalidParameter")["errors"][0]["field"] == "owner"
        assert nothing_created(client)


def test_create_for_unknown_vm_is_invalid_parameter(fake_server: Server) -> None:
    with fake_server.client() as client:
        body = assert_error(create(client, str(uuid.uuid4())), 422, "InvalidParameter")
        assert body["errors"][0]["field"] == "vm_uuid"
        assert "no VM" in body["message"]
        assert nothing_created(client)


def test_create_refuses_existing_image_uuid(fake_server: Server, world: Path) -> None:
    image_uuid = str(uuid.uuid4())
    JobStore(fake_server.state_dir).save_image(image_uuid, "j", "active", {"uuid": image_uuid, "state": "active"}, None)
    vm = str(uuid.uuid4())
    add_vm(world, vm, "proto")
    with fake_server.client() as client:
        response = create(client, vm, {"name": "img", "version": "1", "uuid": image_uuid})
        assert_error(response, 409, "ImageUuidAlreadyExists")
        assert client.get(f"/images/{image_uuid}").json()["state"] == "active"


@pytest.mark.parametrize(
    "spelling",
    [
        lambda u: "urn:uuid:{" + u.upper() + "}",
        lambda u: u.upper(),
        lambda u: u.replace("-", ""),
    ],
)
def test_create_refuses_non_canonical_image_uuid(fake_server: Server, world: Path, spelling: Any) -> None:
    image_uuid = str(uuid.uuid4())
    vm = str(uuid.uuid4())
    add_vm(world, vm, "proto")
    with fake_server.client() as client:
        body = assert_error(
            create(client, vm, {"name": "img", "version": "1", "uuid": spelling(image_uuid)}), 422, "ValidationFailed"
        )
        assert "canonical" in body["message"]
        assert nothing_created(client)
        # control: the canonical spelling of the same UUID is accepted
        assert create(client, vm, {"name": "img", "version": "1", "uuid": image_uuid}).status_code == 200


def test_paths_with_non_canonical_uuids_are_not_found(fake_server: Server) -> None:
    image_uuid = str(uuid.uuid4())
    JobStore(fake_server.state_dir).save_image(image_uuid, "j", "active", {"uuid": image_uuid, "state": "active"}, None)
    with fake_server.client() as client:
        assert client.get(f"/images/{image_uuid}").status_code == 200  # control
        assert_error(client.get(f"/images/{image_uuid.upper()}"), 404, "ResourceNotFound")


# --- authentication and exposure ------------------------------------------------------


def test_token_is_required_and_compared(start_server: StartServer) -> None:
    server = start_server(fake=False, token="s3cret-token")
    with server.client(auth=False) as anonymous:
        assert anonymous.get("/ping").status_code == 200  # liveness stays open
        response = anonymous.get("/images")
        assert_error(response, 401, "UnauthorizedError")
        assert response.headers["www-authenticate"].startswith("Bearer")
        for header in (
            "Bearer wrong",
            "Bearer s3cret-token-and-more",
            "Bearer  s3cret-token-",
            "s3cret-token",
            "Token s3cret-token",
            "Basic " + base64.b64encode(b"admin:wrong").decode(),
            "Basic not-base64!",
        ):
            assert_error(anonymous.get("/images", headers={"Authorization": header}), 401, "UnauthorizedError")
            assert_error(anonymous.post("/images", headers={"Authorization": header}), 401, "UnauthorizedError")
        basic = "Basic " + base64.b64encode(b"admin:s3cret-token").decode()
        assert anonymous.get("/images", headers={"Authorization": basic}).status_code == 200
    with server.client() as client:
        assert client.get("/images").status_code == 200
        assert_error(client.get(f"/jobs/{UUID}"), 404, "ResourceNotFound")


def test_refuses_non_loopback_without_token(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    proc, stderr_path = spawn(state, "--listen", "0.0.0.0:0")
    assert proc.wait(30) == 2
    assert "serve.token" in stderr_path.read_text()
    assert not (state / "serve.lock").exists()


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:http", "127.0.0.1:70000", ":8080"])
def test_refuses_bad_listen_address(tmp_path: Path, listen: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    proc, stderr_path = spawn(state, "--listen", listen)
    assert proc.wait(30) == 2
    assert "listen address" in stderr_path.read_text()


def test_listens_beyond_loopback_with_token(start_server: StartServer) -> None:
    server = start_server(fake=False, token="tok", listen="0.0.0.0:0")
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
        assert_error(client.get("/images"), 401, "UnauthorizedError")
        assert client.get("/images", headers={"Authorization": "Bearer tok"}).status_code == 200


def test_one_server_per_state_directory(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(fake=False)
    config = write_config(tmp_path / "second.yaml", {"workers": 1})
    proc, stderr_path = spawn(server.state_dir, "--listen", "127.0.0.1:0", config=config)
    assert proc.wait(30) == 2
    assert "another imgprep serve" in stderr_path.read_text()
    with server.client() as client:
        assert client.get("/ping").status_code == 200


# --- paths: nothing outside the image directory ----------------------------------------


def raw_get(server: Server, path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (httpx would normalise ``..``)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        if server.token:
            conn.putheader("Authorization", f"Bearer {server.token}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_url_traversal_attempts_are_not_found(real_server: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    rel = f"../../../../../../..{secret}"
    for path in (
        f"/images/{rel}/file",
        f"/images/{rel}",
        f"/images/{rel.replace('/', '%2F')}/file",
        f"/images/{rel.replace('.', '%2e')}/file",
        "/images/..%2f..%2f..%2fetc%2fpasswd/file",
        "/images/%2e%2e/%2e%2e/etc/passwd",
        f"/jobs/{rel}",
        "/images/" + "a" * 5000 + "/file",
        "/images/\x00/file".replace("\x00", "%00"),
    ):
        status, body = raw_get(real_server, path)
        assert status in (400, 404), (path, status)
        assert b"TOPSECRET" not in body
        assert b"root:" not in body


def test_stored_paths_outside_the_image_directory_are_never_served(real_server: Server, tmp_path: Path) -> None:
    """Even a job store pointing outside the image directory (or a symlink out of it) serves nothing."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    image_dir = real_server.state_dir / "images"
    link = image_dir / "link.raw.gz"
    link.symlink_to(secret)
    inside = image_dir / "ok.raw.gz"
    inside.write_bytes(b"fine")
    store = JobStore(real_server.state_dir)
    cases = {
        "absolute": str(secret),
        "dotdot": str(image_dir / ".." / ".." / "secret.txt"),
        "symlink": str(link),
        "directory": str(image_dir),
        "inside": str(inside),
    }
    uuids = {}
    for name, file_path in cases.items():
        image_uuid = str(uuid.uuid4())
        manifest = {"uuid": image_uuid, "state": "active", "files": [{"sha1": "0" * 40, "size": 4}]}
        store.save_image(image_uuid, "job", "active", manifest, file_path)
        uuids[name] = image_uuid
    with real_server.client() as client:
        for name in ("absolute", "dotdot", "symlink", "directory"):
            response = client.get(f"/images/{uuids[name]}/file")
            assert_error(response, 404, "ResourceNotFound")
            assert "TOPSECRET" not in response.text
        control = client.get(f"/images/{uuids['inside']}/file")
        assert control.status_code == 200
        assert control.content == b"fine"


def test_listing_validates_filters(real_server: Server) -> None:
    with real_server.client() as client:
        assert_error(client.get("/images", params={"state": "bogus"}), 422, "InvalidParameter")
        assert_error(client.get("/images", params={"limit": "0"}), 422, "InvalidParameter")
        assert_error(client.get("/images", params={"limit": "lots"}), 422, "InvalidParameter")
        assert_error(client.get("/images", params={"public": "perhaps"}), 422, "InvalidParameter")
        assert_error(client.get("/images", params={"marker": UUID}), 422, "InvalidParameter")
        assert_error(client.get(f"/images/{UUID}/jobs", params={"execution": "exploded"}), 422, "InvalidParameter")


def test_server_exits_cleanly_on_sigterm(real_server: Server) -> None:
    assert real_server.stop() == 0
    assert "stopped (SIGTERM)" in real_server.output()
    with pytest.raises(httpx.ConnectError), httpx.Client(base_url=real_server.url, timeout=5) as client:
        client.get("/ping")


def test_config_errors_exit_2(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "bad.yaml"
    config.write_text("serve:\n  workers: 0\n  colour: blue\n")
    proc, stderr_path = spawn(state, "--listen", "127.0.0.1:0", config=config)
    assert proc.wait(30) == 2
    text = stderr_path.read_text()
    assert "serve.workers" in text
    assert "serve.colour" in text
