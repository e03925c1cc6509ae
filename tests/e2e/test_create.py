"""`imgprep create` end to end: real libvirtd, QEMU (TCG), a debootstrapped Debian guest.

The test guest's application daemons (demo-identity, etcd, redis, nginx) are enabled
but do not run on the image's very first boot (see tests/guestimage.py), so a freshly
booted prototype has never started them. ``test_control_*`` shows that the same
guest, booted normally a second time, does start them and does write their state:
that is what makes "no state in the image" meaningful.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from imgprep import artifacts
from imgprep.libguestfs import open_guest
from tests.e2e.conftest import Prototype
from tests.guestimage import FIXTURE_UNITS

pytestmark = pytest.mark.e2e

TIMEOUTS = ["--boot-timeout", "300", "--prepare-timeout", "180", "--shutdown-timeout", "120", "--stop-timeout", "180"]
DEMO_STARTED = "demo-identity: created node-id"
TRACES = (
    artifacts.PREFIX,
    artifacts.UNIT_PATH,
    artifacts.wants_link("early"),
    artifacts.wants_link("legacy"),
)


def inspect_disk(path: Path, fmt: str = "qcow2", more: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Everything the tests assert about a guest disk, from one appliance launch
    (``more``: the guest's other qcow2 disks, which its fstab mounts; without them what
    is not on these disks is not mounted)."""
    disks = [(path, fmt), *((p, "qcow2") for p in more)]
    with open_guest(disks, readonly=True, force_tcg=True, partial=not more) as g:

        def files_under(directory: str) -> list[str]:
            if not g.is_dir(directory):
                return []
            return sorted(p for p in g.find(directory) if not g.is_dir(f"{directory}/{p}"))

        return {
            "ssh_host_keys": sorted(p for p in g.ls("/etc/ssh") if p.startswith("ssh_host_")),
            "machine_id": g.read("/etc/machine-id").decode(),
            "demo_identity": g.exists("/var/lib/demo-identity/node-id"),
            "etcd_files": files_under("/var/lib/etcd"),
            "redis_files": files_under("/var/lib/redis"),
            "traces": [p for p in TRACES if g.exists(p)]
            + [
                f"/etc/systemd/system/{p}"
                for p in g.find("/etc/systemd/system")
                if "imgprep" in p and Path(p).name not in FIXTURE_UNITS
            ],
            "firstboot_keygen": g.exists("/etc/systemd/system/ssh-hostkeys-firstboot.service"),
        }


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_control_second_normal_boot_starts_daemons_and_writes_state(prototype: Prototype) -> None:
    """Control: booted normally (not first boot), the guest's daemons run and leave state."""
    prototype.start()
    assert DEMO_STARTED not in prototype.console_text(), "first boot must not start the app daemons"
    prototype.shutdown()
    first_boot = inspect_disk(prototype.disk)
    assert first_boot["demo_identity"] is False
    assert first_boot["ssh_host_keys"], "the prototype has SSH host keys to remove"
    assert first_boot["machine_id"].strip() not in ("", "uninitialized"), "the first boot commits a machine-id"

    prototype.start()
    assert DEMO_STARTED in prototype.console_text()
    prototype.shutdown()
    second_boot = inspect_disk(prototype.disk)
    assert second_boot["demo_identity"] is True
    assert any("member" in f for f in second_boot["etcd_files"]), second_boot["etcd_files"]
    assert second_boot["redis_files"], "redis writes its dump on a clean stop"


def test_create_from_running_prototype(prototype: Prototype, imgprep: Any, output_dir: Path) -> None:
    prototype.start()
    assert DEMO_STARTED not in prototype.console_text()
    definition_before = prototype.persistent_xml()

    result = imgprep("create", "--vm", prototype.uuid, "--output-dir", str(output_dir), "--json", *TIMEOUTS)

    assert result.returncode == 0, result.stderr
    summary = result.summary
    assert summary["execution"] == "succeeded"
    assert summary["error"] is None
    guest_states = [e["state"] for e in result.events if e.get("event") == "guest"]
    assert guest_states == ["running", "success"]

    # The prototype: running again, checkpoint gone, definition untouched.
    assert prototype.is_running()
    assert prototype.snapshots() == []
    assert prototype.persistent_xml() == definition_before

    # The manifest describes the file.
    manifest = json.loads(Path(summary["manifest"]).read_text())
    image = Path(summary["file"])
    assert image.name == f"{summary['image_uuid']}.qcow2"
    assert manifest["uuid"] == summary["image_uuid"]
    assert manifest["v"] == 2
    assert manifest["state"] == "active"
    assert manifest["type"] == "zvol"
    assert manifest["files"][0]["size"] == image.stat().st_size
    assert manifest["files"][0]["sha1"] == sha1_of(image)
    info = json.loads(
        subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True, check=True).stdout
    )
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info

    # The image: identity wiped, no daemon state, no imgprep trace, keys will be regenerated.
    facts = inspect_disk(image)
    assert facts["ssh_host_keys"] == []
    assert facts["machine_id"] == "uninitialized\n"
    assert facts["demo_identity"] is False
    assert not any("member" in f for f in facts["etcd_files"]), facts["etcd_files"]
    assert facts["redis_files"] == []
    assert facts["traces"] == []
    assert facts["firstboot_keygen"] is True

    # The boot report: the script ran before anything with default dependencies.
    report = summary["boot_report"]
    assert report["late_services"] == []
    assert report["targets"]["sysinit.target"] == "inactive"
    assert report["targets"]["multi-user.target"] == "inactive"
    assert "systemd-journald.service" in report["services"]
    t = report["timeline_ms"]
    assert 0 < t["kernel_to_userspace"] <= t["unit_start"] <= t["script_start"] <= t["script_end"] <= t["finish"]

    # The job record, as `imgprep jobs get` shows it.
    job = imgprep("jobs", "get", summary["job_uuid"])
    record = json.loads(job.stdout)
    assert record["execution"] == "succeeded"
    assert [r["name"] for r in record["chain_results"]] == [c["name"] for c in record["chain"]]
    assert all(r["result"] == "OK" and r["error"] is None for r in record["chain_results"])
    assert record["onerror_results"] == []
    assert [r["name"] for r in record["always_results"]] == [s["name"] for s in record["always"]]  # a finally
    assert all(r["result"] == "OK" for r in record["always_results"])
    assert record["boot_report"] == report
    assert record["needs_recovery"] is False


def test_failing_script_restores_the_exact_disk(
    prototype: Prototype, imgprep: Any, output_dir: Path, tmp_path: Path, reliability: Callable[..., None]
) -> None:
    script = tmp_path / "failing-prepare"
    script.write_text("#!/bin/sh\necho 'cleaning up...'\necho 'boom: cannot clean /var/lib/app' >&2\nexit 3\n")
    reference = tmp_path / "before.qcow2"
    subprocess.run(["cp", "--sparse=always", str(prototype.disk), str(reference)], check=True)
    definition_before = prototype.persistent_xml()

    # in place (the prototype itself is prepared): a failure reverts its disk exactly
    result = imgprep(
        "create", "--vm", prototype.name, "--capture", "in-place", "--script", str(script),
        "--output-dir", str(output_dir), "--json", *TIMEOUTS,
    )  # fmt: skip

    assert result.returncode == 1, result.stderr
    summary = result.summary
    assert summary["execution"] == "failed"
    assert summary["error"]["code"] == "PrepareImageError"
    assert "boom: cannot clean /var/lib/app" in summary["error"]["message"]
    record = json.loads(imgprep("jobs", "get", summary["job_uuid"]).stdout)
    assert "boom: cannot clean /var/lib/app" in record["prepare"]["error"]
    assert record["prepare"]["state"] == "error"
    assert [r["name"] for r in record["onerror_results"]] == [s["name"] for s in record["onerror"]]
    assert [r["name"] for r in record["always_results"]] == [s["name"] for s in record["always"]]
    assert all(r["error"] is None for r in record["onerror_results"] + record["always_results"])
    assert record["vm_restored"] is True
    assert record["needs_recovery"] is False
    assert list(output_dir.iterdir()) == []

    # The prototype is exactly as before: same blocks, same definition, still off, no checkpoint.
    assert not prototype.is_running()
    assert prototype.snapshots() == []
    assert prototype.persistent_xml() == definition_before
    compare = subprocess.run(
        ["qemu-img", "compare", str(reference), str(prototype.disk)], capture_output=True, text=True, check=False
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    reliability(
        "operator script exits non-zero",
        "exit 3 with a message",
        "PrepareImageError with the output tail; exit 1; restored",
    )


def test_partitioned_guest_with_var_on_a_second_disk(
    make_prototype: Callable[..., Prototype], imgprep: Any, output_dir: Path, tmp_path: Path
) -> None:
    """Not only the test guest's layout: root on a partition, /var (where imgprep's runner
    is injected) on a second qcow2 disk. Both disks are in the clone; neither is written."""
    proto = make_prototype(split=True)
    proto.start()  # its first boot commits a machine-id, like any prototype
    proto.shutdown()
    references = []
    for i, disk in enumerate((proto.disk, *proto.more_disks)):
        reference = tmp_path / f"before-{i}.qcow2"
        subprocess.run(["cp", "--sparse=always", str(disk), str(reference)], check=True)
        references.append((reference, disk))

    result = imgprep("create", "--vm", proto.uuid, "--output-dir", str(output_dir), "--json", *TIMEOUTS)

    assert result.returncode == 0, result.stderr
    report = result.summary["boot_report"]
    assert report["late_services"] == []
    assert report["targets"]["sysinit.target"] == "inactive"
    # the exported disk holds root; its fstab mounts /var from the second disk (not exported)
    facts = inspect_disk(Path(result.summary["file"]), more=proto.more_disks)
    assert facts["ssh_host_keys"] == []
    assert facts["machine_id"] == "uninitialized\n"
    assert facts["traces"] == []
    assert not proto.is_running()
    assert proto.snapshots() == []
    for reference, disk in references:
        compare = subprocess.run(
            ["qemu-img", "compare", str(reference), str(disk)], capture_output=True, text=True, check=False
        )
        assert compare.returncode == 0, (disk, compare.stdout + compare.stderr)
