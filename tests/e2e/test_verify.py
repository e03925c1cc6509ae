"""The verification boot fails an image that is broken (real libvirtd, QEMU, libguestfs,
the Debian test guest; nothing mocked).

The operator script here "prepares" the image by breaking it: it enables a unit that
fails on every boot, and it leaves the prototype's identities (machine-id, SSH host
keys) in place. The verification must fail the job (exit 1, ``VerificationFailed``
naming what failed), discard the image and leave nothing behind; with
``--keep-unverified`` the image file stays and the record says it is unverified.
The control is tests/e2e/test_clone.py's main test: the default script's image passes
the same verification.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Prototype
from tests.e2e.test_clone import leftovers
from tests.e2e.test_create import TIMEOUTS

pytestmark = pytest.mark.e2e

BREAK_THE_IMAGE = """#!/bin/sh
# breaks the image on purpose: a unit that fails on every boot; identities kept
set -eu
cat > /etc/systemd/system/e2e-broken.service <<'EOF'
[Unit]
Description=fails on purpose (imgprep's verification test)

[Service]
Type=oneshot
ExecStart=/bin/false

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/e2e-broken.service /etc/systemd/system/multi-user.target.wants/e2e-broken.service
"""


def test_a_broken_image_fails_its_verification_and_is_discarded(
    prototype: Prototype, imgprep: Any, output_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "break-the-image"
    script.write_text(BREAK_THE_IMAGE)
    prototype.start()  # its first boot commits the machine-id the image keeps

    result = imgprep(
        "create", "--vm", prototype.uuid, "--script", str(script), "--output-dir", str(output_dir),
        "--json", *TIMEOUTS, verify=True,
    )  # fmt: skip
    print("verification", json.dumps(result.summary.get("verification"), indent=1))

    assert result.returncode == 1, result.stderr
    summary = result.summary
    assert summary["execution"] == "failed"
    assert summary["error"]["code"] == "VerificationFailed"
    message = summary["error"]["message"]
    assert "failed units: e2e-broken.service" in message
    assert "machine-id equals the prototype's" in message
    assert "SSH host keys equal the prototype's" in message
    assert "error: VerificationFailed: verification of the image failed" in result.stderr
    verification = summary["verification"]
    assert verification["status"] == "failed"
    assert verification["image"] == "discarded"
    assert verification["report"]["failed"] == ["e2e-broken.service"]
    failed = {c["name"] for c in verification["checks"] if c["status"] == "failed"}
    assert {"failed-units", "machine-id", "ssh-host-keys"} <= failed, verification["checks"]
    assert list(output_dir.iterdir()) == [], "a failed verification leaves no image"
    assert leftovers(prototype.conn, summary["job_uuid"], prototype) == []
    record = json.loads(imgprep("jobs", "get", summary["job_uuid"]).stdout)
    assert record["needs_recovery"] is False
    assert [r["name"] for r in record["always_results"]] == ["discard_verify", "discard_clone"]
    assert all(r["error"] is None for r in record["always_results"] + record["onerror_results"])

    # --keep-unverified: the same failure, but the image file stays (and says so)
    kept = imgprep(
        "create", "--vm", prototype.uuid, "--script", str(script), "--output-dir", str(output_dir),
        "--json", "--keep-unverified", *TIMEOUTS, verify=True,
    )  # fmt: skip
    assert kept.returncode == 1, kept.stderr
    assert kept.summary["error"]["code"] == "VerificationFailed"
    image_uuid = kept.summary["image_uuid"]
    assert kept.summary["verification"]["image"] == f"kept unverified: {output_dir / f'{image_uuid}.qcow2'}"
    assert [p.name for p in output_dir.iterdir()] == [f"{image_uuid}.qcow2"]  # no manifest: not published
    assert leftovers(prototype.conn, kept.summary["job_uuid"], prototype) == []
