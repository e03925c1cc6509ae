"""`imgprep serve` end to end, driven only over HTTP the way an IMGAPI client drives IMGAPI.

Real libvirtd, real QEMU (TCG), the real Debian test guest, the real ``imgprep serve``
process with the libvirt backend. The client below knows nothing of imgprep: it uses
only IMGAPI's documented CreateImageFromVm / GetImage / GetImageFile calls and polls
the job at the ``workflow-api`` URL as node-sdc-clients' ``createImageFromVmAndWait``
does (``GET /jobs/:uuid`` until ``succeeded`` or ``failed``, then the last chain
result's error), checking the Content-MD5 header as its ``getImageFile`` does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.api.conftest import REPO, imgprep_command, read_listening_line
from tests.e2e.conftest import Prototype

pytestmark = pytest.mark.e2e
JOB_TIMEOUT = 900.0
POLL_SECONDS = 2.0


class ImgapiClient:
    """The IMGAPI calls an image pipeline makes, per IMGAPI's documentation."""

    def __init__(self, url: str, token: str) -> None:
        # IMGAPI's client sends HTTP Basic; the workflow poll below sends nothing
        self.http = httpx.Client(base_url=url, timeout=60, auth=("imgapi", token))

    def create_image_from_vm(self, vm_uuid: str, manifest: dict[str, Any]) -> tuple[dict[str, Any], str]:
        response = self.http.post("/images", params={"action": "create-from-vm", "vm_uuid": vm_uuid}, json=manifest)
        assert response.status_code == 200, response.text
        return response.json(), response.headers["workflow-api"]

    @staticmethod
    def wait_for_job(workflow_api: str, job_uuid: str) -> dict[str, Any]:
        deadline = time.monotonic() + JOB_TIMEOUT
        with httpx.Client(base_url=workflow_api, timeout=60) as workflow:
            while True:
                job: dict[str, Any] = workflow.get(f"/jobs/{job_uuid}").json()
                if job["execution"] in ("succeeded", "failed"):
                    return job
                if time.monotonic() > deadline:  # a bound on the wait, not a speed check
                    pytest.fail(f"job still {job['execution']} after {JOB_TIMEOUT}s")
                time.sleep(POLL_SECONDS)

    def get_image(self, image_uuid: str) -> dict[str, Any]:
        response = self.http.get(f"/images/{image_uuid}")
        assert response.status_code == 200, response.text
        image: dict[str, Any] = response.json()
        return image

    def get_image_file(self, image_uuid: str, target: Path) -> tuple[httpx.Headers, str]:
        """Stream the file to ``target``; fail on a Content-MD5 mismatch. Returns (headers, sha1)."""
        sha1 = hashlib.sha1(usedforsecurity=False)
        md5 = hashlib.md5(usedforsecurity=False)
        with self.http.stream("GET", f"/images/{image_uuid}/file") as response, target.open("wb") as out:
            assert response.status_code == 200
            for chunk in response.iter_bytes(1 << 20):
                sha1.update(chunk)
                md5.update(chunk)
                out.write(chunk)
            headers = response.headers
        assert headers["content-md5"] == base64.b64encode(md5.digest()).decode()
        return headers, sha1.hexdigest()


def test_imgapi_client_creates_an_image_through_imgprep_serve(
    prototype: Prototype, libvirt_uri: str, state_dir: Path, output_dir: Path, tmp_path: Path
) -> None:
    prototype.start()
    config = tmp_path / "imgprep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "libvirt_uri": libvirt_uri,
                "libguestfs_tcg": True,
                "verify": False,  # not this test's subject (tests/e2e/test_verify.py is)
                "timeouts": {"boot": 300, "prepare": 180, "shutdown": 120, "stop": 180},
                "serve": {"workers": 1, "image_dir": str(output_dir)},
            }
        )
    )
    stderr_path = tmp_path / "serve.stderr"
    env = {**os.environ, "IMGPREP_STATE_DIR": str(state_dir)}
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [*imgprep_command(), "serve", "--listen", "127.0.0.1:0", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        url = read_listening_line(proc, stderr_path)
        client = ImgapiClient(url, (state_dir / "serve.token").read_text().strip())
        wanted_uuid = str(uuid.uuid4())
        owner = str(uuid.uuid4())
        manifest = {"name": "e2e-api", "version": "1.0.0", "uuid": wanted_uuid, "owner": owner}

        created, workflow_api = client.create_image_from_vm(prototype.uuid, manifest)
        assert created["image_uuid"] == wanted_uuid
        assert client.get_image(wanted_uuid)["state"] == "creating"

        job = client.wait_for_job(workflow_api, created["job_uuid"])
        last = job["chain_results"][-1]
        assert job["execution"] == "succeeded", json.dumps(job, indent=2)
        assert not last["error"], last

        image = client.get_image(wanted_uuid)
        assert image["state"] == "active"
        assert (image["name"], image["version"], image["owner"]) == ("e2e-api", "1.0.0", owner)
        assert image["type"] == "zvol"
        assert image["os"] == "linux"
        (file_info,) = image["files"]

        target = tmp_path / "downloaded.img"
        headers, sha1 = client.get_image_file(wanted_uuid, target)
        assert sha1 == file_info["sha1"]
        assert int(headers["content-length"]) == file_info["size"] == target.stat().st_size
        info = json.loads(
            subprocess.run(["qemu-img", "info", "--output=json", str(target)], capture_output=True, check=True).stdout
        )
        assert info["format"] == "qcow2"
        assert "backing-filename" not in info

        # the prototype is back as it was: running, no checkpoint left
        assert prototype.is_running()
        assert prototype.snapshots() == []
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(600)
        print(stderr_path.read_text())
    assert returncode == 0
