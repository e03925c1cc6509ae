"""imgprep.nbdssh against the simulator's SSH server: QEMU's ``ssh`` block driver opens a
simulated zvol over SFTP only with the node's pinned host key (no boot, no libguestfs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import paramiko
import pytest

from imgprep.errors import ImgprepError
from imgprep.nbdssh import open_remote_disk
from tests.capabilities import requires
from tests.smartos.conftest import Node


def _vm(sim: Node, tmp_path: Path) -> str:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.write(b"IMGPREP-NBDSSH-MARKER")
        f.truncate(4 * 2**20)
    return sim.node.create_hvm(alias="nbd", disk_image=disk, kernel=disk, initrd=disk)


def _open(sim: Node, uuid: str, host_key: paramiko.PKey, *, readonly: bool) -> object:
    return open_remote_disk(
        host="127.0.0.1",
        port=sim.server.port,
        user="root",
        key_file=sim.tmp / "client_key",
        host_key=host_key,
        path=f"/dev/zvol/rdsk/zones/{uuid}-disk0",
        readonly=readonly,
    )


def test_the_pinned_key_opens_the_zvol_and_writes_reach_it(sim: Node, tmp_path: Path) -> None:
    requires("qemu-nbd", "qemu-io", "ssh-agent")
    uuid = _vm(sim, tmp_path)
    with _open(sim, uuid, sim.host_key, readonly=False) as sock:  # type: ignore[attr-defined]
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x41 1048576 4096", f"nbd+unix:///?socket={sock}"],
            check=True,
            capture_output=True,
        )
    volume = sim.node.volume(f"zones/{uuid}-disk0").read_bytes()
    assert volume.startswith(b"IMGPREP-NBDSSH-MARKER")
    assert volume[2**20 : 2**20 + 4096] == b"A" * 4096
    assert sim.server.sftp_opens == [f"/dev/zvol/rdsk/zones/{uuid}-disk0"]


def test_another_host_key_is_refused_by_qemu(sim: Node, tmp_path: Path) -> None:
    requires("qemu-nbd", "ssh-agent")
    uuid = _vm(sim, tmp_path)
    impostor = paramiko.ECDSAKey.generate()
    with pytest.raises(ImgprepError) as caught, _open(sim, uuid, impostor, readonly=True):  # type: ignore[attr-defined]
        pass
    assert caught.value.code == "RemoteDiskFailed"
    assert sim.server.sftp_opens == []  # refused before any file was opened
    with _open(sim, uuid, sim.host_key, readonly=True):  # type: ignore[attr-defined]  # the control
        pass
    assert sim.server.sftp_opens == [f"/dev/zvol/rdsk/zones/{uuid}-disk0"]
