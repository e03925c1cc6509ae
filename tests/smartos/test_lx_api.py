"""An lx zone through the HTTP API: the API suite's simulated cluster and server
(tests/api/test_smartos_api.py) with a real lx zone (its systemd in systemd-nspawn), so
it needs what the lx tests need (root, systemd-nspawn) and lives with them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from tests.api.conftest import create, wait_job
from tests.api.test_smartos_api import Cluster, client, cluster, server
from tests.simulator import tree_digest
from tests.smartos.conftest import LX_ORIGIN, lx_tree

__all__ = ["client", "cluster", "lx_tree", "server"]  # fixtures, imported to be used here


def test_lx_zone_through_the_api(cluster: Cluster, client: httpx.Client, lx_tree: Path) -> None:
    """An lx zone (its real systemd in systemd-nspawn, tests/simulator) through the API:
    the Linux cleanup by default, an lx-dataset manifest, the file's sha1, the rollback."""
    node = cluster.nodes["cn1"]
    node.add_image(LX_ORIGIN)
    vm = node.create_zone(alias="lxproto", brand="lx", image_uuid=str(LX_ORIGIN["uuid"]), tree=lx_tree)
    before = tree_digest(node.zonepath(vm))

    response = create(client, vm, {"name": "lx", "version": "1.0.0"})
    assert response.status_code == 200, response.text
    image_uuid = response.json()["image_uuid"]
    # a real systemd boot in nspawn and a zfs send of the whole tree: minutes on a loaded host
    job = wait_job(client, response.json()["job_uuid"], "succeeded", "failed", "canceled", timeout=900)

    assert job["execution"] == "succeeded", job.get("error")
    assert job["params"]["script_name"] == "linux-prepare-image"
    manifest = client.get(f"/images/{image_uuid}").json()
    assert manifest["type"] == "lx-dataset"
    assert manifest["os"] == "linux"
    assert manifest["requirements"]["brand"] == "lx"
    file = client.get(f"/images/{image_uuid}/file")
    assert hashlib.sha1(file.content).hexdigest() == manifest["files"][0]["sha1"]
    assert node.state(vm) == "stopped"
    assert node.snapshot_names(f"zones/{vm}") == []
    assert tree_digest(node.zonepath(vm)) == before
