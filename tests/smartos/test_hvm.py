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
import subprocess
from pathlib import Path

import pytest

from imgprep.artifacts import PREFIX, UNIT_PATH, wants_link
from imgprep.libguestfs import open_guest
from tests.capabilities import requires
from tests.simulator import open_stream, read_volume_stream
from tests.smartos.conftest import Node, events, summary

HVM_ORIGIN = {
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

    code, out, err = hvm.create(uuid, "--name", "hvmimage", "--version", "1.0.0")

    assert code == 0, err
    result = summary(out)
    assert result["execution"] == "succeeded"
    assert [e["state"] for e in events(out) if e["event"] == "guest"] == ["running", "success"]
    # the disk was opened over SFTP by QEMU (never by the node), disk0 only
    assert set(hvm.server.sftp_opens) == {f"/dev/zvol/rdsk/{disk0}"}

    # the boot report, through the V2 client on ttyS1: the script ran before sysinit.target
    # and before every unit with default dependencies
    report = result["boot_report"]
    assert report["script_exit"] == 0
    assert report["late_services"] == []
    assert report["targets"]["sysinit.target"] == "inactive"
    assert report["targets"]["multi-user.target"] == "inactive"

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
