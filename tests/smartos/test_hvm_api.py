"""A bhyve VM through the HTTP API: the API suite's simulated cluster (tests/api/
test_smartos_api.py) with a real QEMU boot of the test guest (tests/smartos/test_hvm.py),
served by a real ``imgprep serve`` with timeouts long enough for a TCG boot."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tests.api.test_smartos_api as smartos_api
from tests.api.conftest import Server, create, wait_for
from tests.api.test_smartos_api import Cluster, cluster
from tests.smartos.test_hvm import HVM_ORIGIN, raw_guest, sha256_file

__all__ = ["cluster", "raw_guest"]  # fixtures, imported to be used here


@pytest.fixture(scope="module")
def hvm_server(cluster: Cluster) -> Iterator[Server]:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SSH_AUTH_SOCK", raising=False)
        mp.setattr(smartos_api, "TIMEOUTS", {"stop": 60, "boot": 300, "prepare": 300, "shutdown": 60})
        hosts = {
            name: cluster.host_entry(sim, cluster.tmp / "known_hosts")
            for name, sim in zip(cluster.nodes, cluster.sims, strict=True)
        }
        srv = cluster.start("hvm", hosts, {"backend": "smartos", "workers": 1})
    try:
        yield srv
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.stop()


def test_bhyve_vm_through_the_api(cluster: Cluster, hvm_server: Server, raw_guest: tuple[Path, Path, Path]) -> None:
    node = cluster.nodes["cn2"]  # found after cn1 said no
    node.add_image(HVM_ORIGIN)
    disk, kernel, initrd = raw_guest
    vm = node.create_hvm(alias="hvmapi", disk_image=disk, kernel=kernel, initrd=initrd, image_uuid=HVM_ORIGIN["uuid"])
    before = {d: sha256_file(node.volume(d)) for d in (f"zones/{vm}-disk0", f"zones/{vm}-disk1")}

    with hvm_server.client() as client:
        client.timeout = httpx.Timeout(60)
        response = create(client, vm, {"name": "hvm", "version": "1.0.0"})
        assert response.status_code == 200, response.text
        image_uuid = response.json()["image_uuid"]
        job_uuid = response.json()["job_uuid"]

        def finished() -> dict[str, Any] | None:
            job: dict[str, Any] = client.get(f"/jobs/{job_uuid}").json()
            return job if job["execution"] in ("succeeded", "failed", "canceled") else None

        job = wait_for(f"job {job_uuid} to finish", finished, timeout=900)

        assert job["execution"] == "succeeded", job.get("error")
        manifest = client.get(f"/images/{image_uuid}").json()
        assert manifest["type"] == "zvol"
        assert manifest["requirements"]["brand"] == "bhyve"
        assert manifest["requirements"]["bootrom"] == "uefi"
        file = client.get(f"/images/{image_uuid}/file")
        assert hashlib.sha1(file.content).hexdigest() == manifest["files"][0]["sha1"]
    for d, digest in before.items():
        assert node.snapshot_names(d) == []
        assert sha256_file(node.volume(d)) == digest
    assert node.state(vm) == "stopped"
