"""The HVM parts of the SmartOS backend that need no node: the manifest fields imgadm
writes for bhyve/kvm, the disks read from ``vmadm get``, QEMU's pinned ssh spec."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import paramiko
import pytest

from imgprep.backends.smartos.hvm import disks, learn
from imgprep.nbdssh import ssh_json

VM: dict[str, Any] = {
    "brand": "bhyve",
    "bootrom": "uefi",
    "disks": [{"zfs_filesystem": "zones/u-disk0", "size": 10240}, {"zfs_filesystem": "zones/u-disk1", "size": 64}],
}


def test_bhyve_manifest_fields_as_imgadm_writes_them() -> None:
    inherited = {"type": "zone-dataset", "os": "smartos", "requirements": {"min_platform": {"7.0": "x"}, "min_ram": 1}}
    learned = learn(VM, "bhyve", inherited)
    assert learned["type"] == "zvol"
    assert learned["os"] == "linux"
    assert learned["requirements"] == {"brand": "bhyve", "bootrom": "uefi", "min_ram": 1}
    assert learned["image_size"] == 10240


def test_kvm_has_no_bootrom() -> None:
    learned = learn({**VM, "brand": "kvm"}, "kvm", {"os": "linux"})
    assert learned["requirements"] == {"brand": "kvm"}


@pytest.mark.parametrize(
    "zvol", ["../etc/passwd", "zones/u-disk0@snap", "zones/../x", "", 7, "-o", "zones/u disk0"], ids=repr
)
def test_a_hostile_disk_dataset_is_a_problem(zvol: object) -> None:
    problems: list[str] = []
    assert disks({"disks": [{"zfs_filesystem": zvol}]}, "vm", problems) == []
    assert problems == ["VM vm: disk 0 has no usable zfs_filesystem (a zvol)"]
    problems = []
    assert disks(VM, "vm", problems) == ["zones/u-disk0", "zones/u-disk1"]  # the control
    assert problems == []


def test_no_disks_is_a_problem() -> None:
    problems: list[str] = []
    assert disks({"disks": []}, "vm", problems) == []
    assert problems == ["VM vm: vmadm reports no disks"]


def test_the_ssh_spec_pins_the_verified_key() -> None:
    key = paramiko.ECDSAKey.generate()
    spec = json.loads(ssh_json(host="cn1", port=22, user="root", path="/dev/zvol/rdsk/z", host_key=key)[5:])
    assert spec["file"]["host-key-check"] == {
        "mode": "hash",
        "type": "sha256",
        "hash": hashlib.sha256(key.asbytes()).hexdigest(),
    }
    assert spec["file"]["server"] == {"host": "cn1", "port": "22"}
