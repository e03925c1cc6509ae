"""The SmartOS backend through the HTTP API: a real ``imgprep serve`` process (the
installed command, unchanged) with ``serve.backend: smartos``, driving two simulated
compute nodes (tests/simulator) over real SSH.

One server and two nodes are shared by the module (starting them is the slow part);
every test makes its own zones, so the tests do not depend on each other's order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import subprocess
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paramiko
import pytest
import yaml

from tests.api.conftest import (
    Server,
    assert_error,
    create,
    generated_token,
    nothing_created,
    read_listening_line,
    spawn,
    wait_for,
    wait_job,
)
from tests.capabilities import requires
from tests.simulator import ComputeNode, SshSimulator
from tests.smartos.conftest import ORIGIN_IMAGE, PROTOTYPE_FILES

PROTOTYPE = {k: v for k, v in PROTOTYPE_FILES.items() if k != "opt/local/lib/app/data.bin"}  # small: fast
TIMEOUTS = {"stop": 10, "boot": 15, "prepare": 30, "shutdown": 15}


@dataclasses.dataclass
class Cluster:
    nodes: dict[str, ComputeNode]  # config name -> node
    sims: list[SshSimulator]
    client_key: Path
    tmp: Path

    def zone(self, name: str) -> str:
        return self.nodes[name].create_zone(alias="proto", image_uuid=str(ORIGIN_IMAGE["uuid"]), files=PROTOTYPE)

    def host_entry(self, sim: SshSimulator, known_hosts: Path) -> dict[str, Any]:
        return {
            "host": "127.0.0.1",
            "port": sim.port,
            "key_file": str(self.client_key),
            "known_hosts": str(known_hosts),
        }

    def start(self, name: str, hosts: dict[str, dict[str, Any]], serve: dict[str, Any]) -> Server:
        state = self.tmp / f"state-{name}"
        state.mkdir()
        config = self.tmp / f"{name}.yaml"
        config.write_text(
            yaml.safe_dump(
                {"timeouts": TIMEOUTS, "retry_attempts": 2, "retry_max_seconds": 5, "hosts": hosts, "serve": serve}
            )
        )
        proc, stderr = spawn(state, "--listen", "127.0.0.1:0", config=config)
        url = read_listening_line(proc, stderr)
        return Server(proc, url, state, stderr, generated_token(state))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    requires("node")  # the simulated /usr/node/bin/node is the host's
    tmp = tmp_path_factory.mktemp("smartos-api")
    client_key = paramiko.ECDSAKey.generate()
    client_key.write_private_key_file(str(tmp / "client_key"))
    nodes: dict[str, ComputeNode] = {}
    sims: list[SshSimulator] = []
    lines = []
    for name in ("cn1", "cn2"):
        node = ComputeNode(tmp / name)
        node.add_image(ORIGIN_IMAGE)
        host_key = paramiko.ECDSAKey.generate()
        sim = SshSimulator(node, host_key, [client_key])
        nodes[name] = node
        sims.append(sim)
        lines.append(f"[127.0.0.1]:{sim.port} {host_key.get_name()} {host_key.get_base64()}\n")
    (tmp / "known_hosts").write_text("".join(lines))
    try:
        yield Cluster(nodes, sims, tmp / "client_key", tmp)
    finally:
        for sim in sims:
            sim.close()
        for node in nodes.values():
            node.shutdown()


@pytest.fixture(scope="module")
def server(cluster: Cluster) -> Iterator[Server]:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SSH_AUTH_SOCK", raising=False)  # the server authenticates with the host entry's key only
        hosts = {
            name: cluster.host_entry(sim, cluster.tmp / "known_hosts")
            for name, sim in zip(cluster.nodes, cluster.sims, strict=True)
        }
        srv = cluster.start("main", hosts, {"backend": "smartos", "workers": 2})
    try:
        yield srv
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def open_connections(cluster: Cluster) -> list[paramiko.Transport]:
    return [t for sim in cluster.sims for t in sim._transports if t.is_active()]


def vm_gets(node: ComputeNode, vm: str) -> int:
    return sum(1 for c in node.commands if c == ["vmadm", "get", vm])


def test_create_poll_get_image_and_file(cluster: Cluster, client: httpx.Client) -> None:
    vm = cluster.zone("cn1")
    response = create(client, vm, {"name": "web", "version": "1.0.0"})
    assert response.status_code == 200, response.text
    image_uuid, job_uuid = response.json()["image_uuid"], response.json()["job_uuid"]

    job = wait_job(client, job_uuid, "succeeded", "failed", "canceled")
    assert job["execution"] == "succeeded", job.get("error")
    assert job["params"]["backend"] == "smartos"
    assert job["params"]["host"] == "cn1"
    assert job["target"] == f"/vms/{vm}"
    assert job["state"]["ssh"]["accept_new_host_key"] is False

    manifest = client.get(f"/images/{image_uuid}").json()
    assert manifest["state"] == "active"
    assert manifest["name"] == "web"
    assert manifest["type"] == "zone-dataset"
    assert manifest["os"] == "smartos"
    assert manifest["files"][0]["compression"] == "gzip"  # the SmartOS backend's default

    file = client.get(f"/images/{image_uuid}/file")
    assert file.status_code == 200
    assert len(file.content) == manifest["files"][0]["size"]
    assert hashlib.sha1(file.content).hexdigest() == manifest["files"][0]["sha1"]
    assert file.headers["etag"] == manifest["files"][0]["sha1"]
    # the zone is as before, and the other node was never involved
    assert cluster.nodes["cn1"].state(vm) == "stopped"
    assert cluster.nodes["cn1"].snapshot_names(f"zones/{vm}") == []
    assert vm_gets(cluster.nodes["cn2"], vm) == 0


def test_vm_on_the_second_node_is_found(cluster: Cluster, client: httpx.Client) -> None:
    vm = cluster.zone("cn2")
    response = create(client, vm)
    assert response.status_code == 200, response.text
    job = wait_job(client, response.json()["job_uuid"], "succeeded", "failed", "canceled")
    assert job["execution"] == "succeeded", job.get("error")
    assert job["params"]["host"] == "cn2"
    assert vm_gets(cluster.nodes["cn1"], vm) == 1  # asked first, does not have it
    assert client.get(f"/images/{response.json()['image_uuid']}").json()["state"] == "active"
    # the server keeps no SSH connection: neither the lookup's on cn1 nor the job's on cn2
    wait_for("the server's SSH connections to close", lambda: not any(open_connections(cluster)))


def test_unknown_vm_is_422_on_vm_uuid(cluster: Cluster, client: httpx.Client) -> None:
    vm = str(uuidlib.uuid4())
    before = client.get("/images", params={"state": "all"}).json()
    body = assert_error(create(client, vm), 422, "InvalidParameter")
    assert body["errors"][0]["field"] == "vm_uuid"
    assert "cn1, cn2" in body["message"]
    assert all(vm_gets(node, vm) == 1 for node in cluster.nodes.values())  # every node asked
    assert client.get("/images", params={"state": "all"}).json() == before


def test_host_parameter_names_only_configured_nodes(cluster: Cluster, client: httpx.Client) -> None:
    vm = cluster.zone("cn2")
    body = assert_error(create(client, vm, host="127.0.0.1"), 422, "InvalidParameter")
    assert body["errors"][0]["field"] == "host"
    assert_error(create(client, vm, host="root@127.0.0.1:22"), 422, "InvalidParameter")
    # narrowed to cn1: the VM (on cn2) is not found, and cn2 is not asked
    body = assert_error(create(client, vm, host="cn1"), 422, "InvalidParameter")
    assert body["errors"][0]["field"] == "vm_uuid"
    assert vm_gets(cluster.nodes["cn2"], vm) == 0


def test_unreachable_and_unknown_key_nodes_are_503_and_no_key_is_accepted(cluster: Cluster) -> None:
    """A node that cannot be asked is not "no such VM"; an unknown host key is never accepted."""
    with socketless_port() as dead_port:
        empty_known_hosts = cluster.tmp / "known_hosts_empty"
        empty_known_hosts.write_text("")
        hosts = {
            "down": {**cluster.host_entry(cluster.sims[0], cluster.tmp / "known_hosts"), "port": dead_port},
            "stranger": cluster.host_entry(cluster.sims[0], empty_known_hosts),
        }
        srv = cluster.start("unreachable", hosts, {"backend": "smartos", "hosts": ["down", "stranger"]})
        try:
            with srv.client() as c:
                vm = cluster.zone("cn1")
                body = assert_error(create(c, vm), 503, "ServiceUnavailableError")
                assert "down, stranger" in body["message"]
                assert nothing_created(c)
        finally:
            srv.stop()
    assert empty_known_hosts.read_text() == ""
    assert "unknown host key" in srv.stderr()


@contextlib.contextmanager
def socketless_port() -> Iterator[int]:
    """A loopback port nothing listens on (bound, never listening: connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
