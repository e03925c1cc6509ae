"""bhyve VMs through the real CLI, against the compute-node SIMULATOR.

The simulated bhyve VM's disk0 "zvol" is a raw copy of the end-to-end test guest's
disk (Debian, systemd, etcd, redis, nginx); ``vmadm start`` boots it for real in QEMU
(TCG) with its second serial port on the simulator's Metadata V2 service. What is real
here: imgprep opening disk0 over SSH with QEMU's ``ssh`` block driver (host key pinned)
and libguestfs writing the early unit, the order systemd gives it, the runner, its V2
client on ``/dev/ttyS1``, the Linux cleanup script. What is simulated: the compute node
(vmadm, zfs, the zvols as sparse files, the ``zfs send`` stream format, bhyve itself:
QEMU boots the kernel directly instead of a UEFI bootrom).

Needs root, QEMU, qemu-nbd, libguestfs and the cached test guest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest

from imgprep.artifacts import PREFIX, UNIT_PATH, wants_link
from imgprep.jobstore import JobStore
from imgprep.libguestfs import open_guest
from tests.capabilities import requires
from tests.simulator import open_stream, read_volume_stream
from tests.smartos.conftest import Node, events, summary

REPO = Path(__file__).resolve().parents[2]
HVM_ORIGIN: dict[str, Any] = {
    "v": 2,
    "uuid": "5a2b6a84-1b0f-4f7e-9d4f-6f1c3b1e8e11",
    "name": "debian-12-bhyve",
    "version": "20250101",
    "type": "zvol",
    "os": "linux",
    "requirements": {"brand": "bhyve", "bootrom": "uefi"},
    "users": [{"name": "root"}],
    "nic_driver": "virtio",
    "disk_driver": "virtio",
    "cpu_type": "host",
}
IMGPREP_PATHS = (UNIT_PATH, wants_link("early"), PREFIX)


@pytest.fixture(scope="session")
def raw_guest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(raw disk, kernel, initrd) of the test guest: the qcow2 converted to a sparse raw file."""
    requires("root", "libguestfs", "qemu-img", "qemu-nbd", "qemu-system-x86_64", "ssh-agent", "debootstrap")
    from tests import guestimage

    image = guestimage.build()
    raw = tmp_path_factory.mktemp("hvm") / "disk0.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image.disk), str(raw)], check=True)
    return raw, image.kernel, image.initrd


@pytest.fixture
def hvm(sim: Node, raw_guest: tuple[Path, Path, Path]) -> Node:
    sim.node.add_image(HVM_ORIGIN)
    sim.write_config(timeouts={"stop": 60, "boot": 300, "prepare": 300, "shutdown": 60})
    return sim


def bhyve_vm(sim: Node, raw_guest: tuple[Path, Path, Path]) -> str:
    disk, kernel, initrd = raw_guest
    return sim.node.create_hvm(
        alias="hvmproto", disk_image=disk, kernel=kernel, initrd=initrd, image_uuid=HVM_ORIGIN["uuid"]
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def test_bhyve_vm_early_unit_image_report_and_rollback(
    hvm: Node, raw_guest: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    uuid = bhyve_vm(hvm, raw_guest)
    disk0, disk1 = f"zones/{uuid}-disk0", f"zones/{uuid}-disk1"
    before = {d: sha256_file(hvm.node.volume(d)) for d in (disk0, disk1)}
    meta_before = hvm.node.metadata(uuid)
    hvm.node.faults.send_drops = 1  # the first zfs send is cut mid-stream: retried, the image whole

    code, out, err = hvm.create(uuid, "--name", "hvmimage", "--version", "1.0.0")

    assert code == 0, err
    result = summary(out)
    assert result["execution"] == "succeeded"
    assert [e["state"] for e in events(out) if e["event"] == "guest"] == ["running", "success"]
    assert len([c for c in hvm.node.commands if c[:2] == ["zfs", "send"] and "-nP" not in c]) == 2
    # the disk was opened over SFTP by QEMU (never by the node), disk0 only
    assert set(hvm.server.sftp_opens) == {f"/dev/zvol/rdsk/{disk0}"}

    # the boot report, through the V2 client on ttyS1: the script ran before sysinit.target
    # and before every unit with default dependencies
    report = result["boot_report"]
    assert report["script_exit"] == 0
    assert report["late_services"] == []
    assert report["targets"]["sysinit.target"] == "inactive"
    assert report["targets"]["multi-user.target"] == "inactive"
    assert report["services"]  # the control: the report does list what was up (early units)
    code, shown, shown_err = hvm.cli("jobs", "--config", str(hvm.config), "get", result["job_uuid"])
    assert code == 0, shown_err
    assert json.loads(shown)["boot_report"] == JobStore(hvm.state_dir).get(result["job_uuid"])["boot_report"]

    # the manifest: what imgadm writes for a bhyve VM's image
    image = Path(result["file"])
    manifest = json.loads(Path(result["manifest"]).read_text())
    data = image.read_bytes()
    assert manifest["files"][0]["sha1"] == hashlib.sha1(data).hexdigest()
    assert manifest["files"][0]["size"] == len(data)
    assert manifest["files"][0]["compression"] == "gzip"
    assert manifest["type"] == "zvol"
    assert manifest["os"] == "linux"
    assert manifest["requirements"]["brand"] == "bhyve"
    assert manifest["requirements"]["bootrom"] == "uefi"
    assert "min_platform" not in manifest["requirements"]
    assert manifest["image_size"] == hvm.node.volume(disk0).stat().st_size // 2**20
    assert manifest["nic_driver"] == "virtio"  # inherited from the origin image, as imgadm does

    # the image: the stream of disk0@final, cleaned, with no imgprep trace
    raw = tmp_path / "image.raw"
    with open_stream(image) as f:
        header = read_volume_stream(f, raw)
    assert header["snapshot"] == f"{disk0}@final"
    with open_guest([(raw, "raw")], readonly=True, force_tcg=True) as guest:
        assert guest.read("/etc/machine-id") in (b"", b"uninitialized\n")
        assert [p for p in IMGPREP_PATHS if guest.exists(p)] == []
        assert guest.exists("/etc/systemd/system")  # the control: the filesystem is there

    # every disk rolled back byte for byte, the metadata too, no snapshot left
    for d in (disk0, disk1):
        assert hvm.node.snapshot_names(d) == []
        assert sha256_file(hvm.node.volume(d)) == before[d]
    assert hvm.node.snapshot_names(f"zones/{uuid}") == []
    assert hvm.node.metadata(uuid) == meta_before
    assert hvm.node.state(uuid) == "stopped"  # it was stopped: not restarted
    assert len(hvm.node.boots(uuid)) == 1  # the prepare boot, which powered itself off


def test_bhyve_script_error_is_reported_and_every_disk_restored(hvm: Node, raw_guest: tuple[Path, Path, Path]) -> None:
    uuid = bhyve_vm(hvm, raw_guest)
    disks = [f"zones/{uuid}-disk0", f"zones/{uuid}-disk1"]
    before = {d: sha256_file(hvm.node.volume(d)) for d in disks}
    script = hvm.tmp / "operator-script"
    script.write_text("#!/bin/sh\necho cleaning up\necho 'cannot remove /opt/thing' >&2\nexit 3\n")

    code, out, _err = hvm.create(uuid, "--script", str(script))

    assert code == 1
    job = JobStore(hvm.state_dir).get(summary(out)["job_uuid"])
    assert job["execution"] == "failed"
    assert job["error"]["code"] == "PrepareImageError"
    assert "cannot remove /opt/thing" in job["error"]["message"]
    assert job["prepare"]["state"] == "error"
    assert job["vm_restored"] is True
    assert list(hvm.output.iterdir()) == []
    for d in disks:
        assert hvm.node.snapshot_names(d) == []
        assert sha256_file(hvm.node.volume(d)) == before[d]
    assert hvm.node.state(uuid) == "stopped"


def test_an_unknown_filesystem_is_refused_naming_mode_legacy_and_restored(hvm: Node, tmp_path: Path) -> None:
    disk = tmp_path / "garbage.raw"
    disk.write_bytes(random.Random(9).randbytes(8 * 2**20))
    uuid = hvm.node.create_hvm(alias="garbage", disk_image=disk, kernel=disk, initrd=disk)
    before = sha256_file(hvm.node.volume(f"zones/{uuid}-disk0"))

    code, out, err = hvm.create(uuid)

    assert code != 0
    assert "--mode legacy" in err
    job = JobStore(hvm.state_dir).get(summary(out)["job_uuid"])
    assert job["error"]["code"] == "NotSupported"
    assert job["vm_restored"] is True
    assert sha256_file(hvm.node.volume(f"zones/{uuid}-disk0")) == before
    assert hvm.node.snapshot_names(f"zones/{uuid}-disk0") == []
    assert hvm.node.boots(uuid) == []  # never booted


def test_mode_legacy_puts_the_script_in_internal_metadata_with_a_warning(
    hvm: Node, raw_guest: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    # The guest has no guest tools: nothing runs the late operator-script, so no state
    # comes within the (short) timeout; what is checked is the classic placement, the
    # warning in the record, and the rollback of the metadata.
    _, kernel, initrd = raw_guest
    disk = tmp_path / "empty.raw"
    with disk.open("wb") as f:
        f.truncate(64 * 2**20)  # no filesystem: the kernel boots and finds no root
    uuid = hvm.node.create_hvm(alias="legacy", disk_image=disk, kernel=kernel, initrd=initrd)
    meta_before = hvm.node.metadata(uuid)
    hvm.write_config(timeouts={"stop": 30, "boot": 20, "prepare": 20, "shutdown": 20})
    seen: list[dict[str, Any]] = []
    original = hvm.node._start

    def start(zone: Any) -> None:
        seen.append(json.loads((hvm.node.zonepath(zone.uuid) / "config" / "metadata.json").read_text()))
        original(zone)

    hvm.node._start = start  # type: ignore[method-assign]

    code, _, err = hvm.create(uuid, "--mode", "legacy")
    assert code == 2
    assert "pass --script" in err  # a classic prepare-image script, not imgprep's runner's
    assert hvm.node.mutating_commands() == []
    script = tmp_path / "prepare-image"
    script.write_text("#!/bin/sh\nmdata-put prepare-image:state running\n")

    code, out, _err = hvm.create(uuid, "--mode", "legacy", "--script", str(script))

    assert code == 1
    job = JobStore(hvm.state_dir).get(summary(out)["job_uuid"])
    assert job["error"]["code"] == "PrepareImageDidNotRun"
    assert any("after the guest's daemons have started" in w for w in job.get("warnings", []))
    assert seen[0]["internal_metadata"]["operator-script"] == script.read_text()  # what the prepare boot had
    assert hvm.node.metadata(uuid) == meta_before  # rolled back
    assert hvm.node.snapshot_names(f"zones/{uuid}") == []
    assert set(hvm.server.sftp_opens) == set()  # the legacy path never opens the disk


def test_jobs_recover_after_the_cli_was_killed_in_the_prepare_boot(
    hvm: Node, raw_guest: tuple[Path, Path, Path]
) -> None:
    uuid = bhyve_vm(hvm, raw_guest)
    disks = [f"zones/{uuid}-disk0", f"zones/{uuid}-disk1"]
    before = {d: sha256_file(hvm.node.volume(d)) for d in disks}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SSH_AUTH_SOCK", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgprep", "create", "--config", str(hvm.config), "--backend", "smartos",
         "--host", "node1", "--vm", uuid, "--compression", "gzip", "--output-dir", str(hvm.output)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while hvm.node.state(uuid) != "running":  # QEMU started: the prepare boot
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            if time.monotonic() > deadline:  # a bound on the wait, not a speed check
                pytest.fail("the prepare boot never started")
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)  # no cleanup: the VM is left in its prepare boot
    finally:
        proc.kill()
        proc.wait()
    assert hvm.node.snapshot_names(disks[0]) != []

    code, out, _ = hvm.cli("jobs", "--config", str(hvm.config), "list", "--json")
    (row,) = json.loads(out)
    assert row["needs_recovery"] is True
    code, out, err = hvm.cli("jobs", "--config", str(hvm.config), "recover", row["uuid"])
    assert code == 0, err
    job = JobStore(hvm.state_dir).get(row["uuid"])
    assert job["vm_restored"] is True
    assert job["error"]["code"] == "Interrupted"
    assert hvm.node.state(uuid) == "stopped"
    for d in disks:
        assert hvm.node.snapshot_names(d) == []
        assert sha256_file(hvm.node.volume(d)) == before[d]
    assert hvm.node.snapshot_names(f"zones/{uuid}") == []


def test_a_changed_host_key_is_refused_before_any_command(hvm: Node, raw_guest: tuple[Path, Path, Path]) -> None:
    uuid = bhyve_vm(hvm, raw_guest)
    disks = [f"zones/{uuid}-disk0", f"zones/{uuid}-disk1"]
    before = {d: sha256_file(hvm.node.volume(d)) for d in disks}
    hvm.node.commands.clear()
    hvm.server.set_host_key(paramiko.ECDSAKey.generate())

    code, _, err = hvm.create(uuid)

    assert code == 2
    assert "HOST KEY CHANGED" in err
    assert hvm.node.commands == []  # nothing ran on the node, not even vmadm get
    for d in disks:
        assert sha256_file(hvm.node.volume(d)) == before[d]
    assert hvm.node.boots(uuid) == []


def test_no_state_within_the_timeout_is_did_not_run_and_every_disk_restored(
    hvm: Node, raw_guest: tuple[Path, Path, Path]
) -> None:
    # The same guest reports within the normal timeouts (the happy path above, the
    # control); here the boot stage allows it 1 s, far less than its boot takes.
    uuid = bhyve_vm(hvm, raw_guest)
    disks = [f"zones/{uuid}-disk0", f"zones/{uuid}-disk1"]
    before = {d: sha256_file(hvm.node.volume(d)) for d in disks}
    hvm.write_config(timeouts={"stop": 60, "boot": 1, "prepare": 300, "shutdown": 60})

    code, out, _err = hvm.create(uuid)

    assert code == 1
    job = JobStore(hvm.state_dir).get(summary(out)["job_uuid"])
    assert job["error"]["code"] == "PrepareImageDidNotRun"
    assert job["vm_restored"] is True
    assert len(hvm.node.boots(uuid)) == 1  # it was booted, and halted by imgprep
    assert hvm.node.state(uuid) == "stopped"
    assert list(hvm.output.iterdir()) == []
    for d in disks:
        assert hvm.node.snapshot_names(d) == []
        assert sha256_file(hvm.node.volume(d)) == before[d]
