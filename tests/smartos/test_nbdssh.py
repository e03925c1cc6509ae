"""imgprep.nbdssh against the simulator's SSH server: QEMU's ``ssh`` block driver opens a
simulated zvol over SFTP only with the node's pinned host key (no boot, no libguestfs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import paramiko
import pytest

from imgprep.errors import ImgprepError
from imgprep.nbdssh import open_remote_disk
from imgprep.ssh import SshClient, SshTarget
from tests.capabilities import requires
from tests.simulator.sshd import SSHD, OpenSshServer
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


def test_through_a_proxyjump_headnode(sim: Node, tmp_path: Path) -> None:
    """QEMU reaches the node through a real OpenSSH headnode: a direct-tcpip channel of
    imgprep's verified connection to it; the pin is still the node's key."""
    requires("qemu-nbd", "qemu-io", "ssh-agent")
    if not SSHD.exists():
        pytest.skip("needs OpenSSH's sshd (scripts/setup-host)")
    client_key = paramiko.ECDSAKey.from_private_key_file(str(sim.tmp / "client_key"))
    headnode = OpenSshServer(sim.tmp / "headnode", f"{client_key.get_name()} {client_key.get_base64()}\n")
    try:
        config = sim.tmp / "ssh_config"
        config.write_text(
            f"Host cn1\n    HostName 127.0.0.1\n    Port {sim.server.port}\n    IdentityFile {sim.tmp / 'client_key'}\n"
            f"    ProxyJump hn\n\nHost hn\n    HostName 127.0.0.1\n    Port {headnode.port}\n    User root\n"
            f"    IdentityFile {sim.tmp / 'client_key'}\n"
        )
        known = sim.tmp / "known_hosts_route"
        known.write_text(
            headnode.host_key_line
            + f"[127.0.0.1]:{sim.server.port} {sim.host_key.get_name()} {sim.host_key.get_base64()}\n"
        )
        client = SshClient(SshTarget(host="cn1", ssh_config=str(config), known_hosts=str(known)))
        try:
            host_key = client.connect().get_remote_server_key()
            via = client.jump_transport()
            assert via is not None
            uuid = _vm(sim, tmp_path)
            with open_remote_disk(
                host="127.0.0.1",
                port=sim.server.port,
                user="root",
                key_file=sim.tmp / "client_key",
                host_key=host_key,
                path=f"/dev/zvol/rdsk/zones/{uuid}-disk0",
                via=via,
            ) as sock:
                subprocess.run(
                    ["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 512", f"nbd+unix:///?socket={sock}"],
                    check=True,
                    capture_output=True,
                )
        finally:
            client.close()
        assert sim.node.volume(f"zones/{uuid}-disk0").read_bytes()[:512] == b"B" * 512
        target = f"target 127.0.0.1 port {sim.server.port}"
        assert headnode.log().count(target) == 2  # imgprep's own connection, then QEMU's
    finally:
        headnode.close()
