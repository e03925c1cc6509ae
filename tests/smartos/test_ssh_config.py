"""SSH as Triton operators use it, against real servers on 127.0.0.1: ``~/.ssh/config``
(``Host`` alias, ``HostName``, ``Port``, ``User``, ``IdentityFile``), ``ProxyJump``
through a real OpenSSH ``sshd`` (the "headnode") to the compute-node simulator, host
keys verified at every hop, and OpenSSH user certificates checked by a real ``sshd``
with ``TrustedUserCAKeys``."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from imgprep.ssh import HostKeyRefused, SshClient, SshTarget
from tests.simulator.sshd import SSHD, OpenSshServer
from tests.smartos.conftest import Node, summary

pytestmark = pytest.mark.skipif(not SSHD.exists(), reason="needs OpenSSH's sshd (scripts/setup-host)")


def _pub(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}\n"


@pytest.fixture
def headnode(sim: Node) -> Iterator[OpenSshServer]:
    client_key = paramiko.ECDSAKey.from_private_key_file(str(sim.tmp / "client_key"))
    server = OpenSshServer(sim.tmp / "headnode", _pub(client_key))
    yield server
    server.close()


def _write_ssh_config(sim: Node, headnode: OpenSshServer) -> Path:
    path = sim.tmp / "ssh_config"
    path.write_text(
        f"""Host cn1
    HostName 127.0.0.1
    Port {sim.server.port}
    IdentityFile {sim.tmp / "client_key"}
    ProxyJump hn

Host hn
    HostName 127.0.0.1
    Port {headnode.port}
    User root
    IdentityFile {sim.tmp / "client_key"}
"""
    )
    return path


def _known_hosts(sim: Node, *lines: str) -> Path:
    path = sim.tmp / "known_hosts_route"
    path.write_text("".join(lines))
    return path


def _node_line(sim: Node) -> str:
    return f"[127.0.0.1]:{sim.server.port} {sim.host_key.get_name()} {sim.host_key.get_base64()}\n"


def test_proxyjump_through_a_real_sshd_to_the_node(sim: Node, headnode: OpenSshServer) -> None:
    config = _write_ssh_config(sim, headnode)
    known = _known_hosts(sim, headnode.host_key_line, _node_line(sim))
    client = SshClient(SshTarget(host="cn1", ssh_config=str(config), known_hosts=str(known)))
    try:
        result = client.run(["sysinfo"])
    finally:
        client.close()
    assert '"Hostname": "simulated-cn"' in result.stdout
    assert ["sysinfo"] in sim.node.commands
    # the node was reached through the headnode: sshd opened the direct-tcpip channel
    assert f"server_request_direct_tcpip: originator 127.0.0.1 port 0, target 127.0.0.1 port {sim.server.port}" in (
        headnode.log()
    )


def test_a_changed_host_key_of_the_jump_host_is_refused_before_the_node(sim: Node, headnode: OpenSshServer) -> None:
    config = _write_ssh_config(sim, headnode)
    impostor = paramiko.ECDSAKey.generate()
    wrong = f"[127.0.0.1]:{headnode.port} {impostor.get_name()} {impostor.get_base64()}\n"
    known = _known_hosts(sim, wrong, _node_line(sim))
    client = SshClient(SshTarget(host="cn1", ssh_config=str(config), known_hosts=str(known)))
    with pytest.raises(HostKeyRefused) as info:
        client.run(["sysinfo"])
    assert info.value.code == "HostKeyChanged"
    assert f"127.0.0.1:{headnode.port}" in str(info.value)
    assert sim.node.commands == []  # nothing reached the node
    assert known.read_text() == wrong + _node_line(sim)  # and nothing was "fixed"


def test_an_unknown_host_key_behind_the_jump_is_refused(sim: Node, headnode: OpenSshServer) -> None:
    config = _write_ssh_config(sim, headnode)
    known = _known_hosts(sim, headnode.host_key_line)  # the headnode is known, the node is not
    client = SshClient(SshTarget(host="cn1", ssh_config=str(config), known_hosts=str(known)))
    with pytest.raises(HostKeyRefused) as info:
        client.run(["sysinfo"])
    assert info.value.code == "HostKeyUnknown"
    assert "via root@127.0.0.1" in str(info.value)  # the second hop, reached through the first
    assert sim.node.commands == []


def test_imgprep_create_through_the_headnode(sim: Node, headnode: OpenSshServer) -> None:
    config = _write_ssh_config(sim, headnode)
    known = _known_hosts(sim, headnode.host_key_line, _node_line(sim))
    sim.write_config(hosts={"node1": {"host": "cn1", "ssh_config": str(config), "known_hosts": str(known)}})
    uuid = sim.zone()
    code, out, err = sim.create(uuid)
    assert code == 0, err
    assert summary(out)["execution"] == "succeeded"
    assert ["vmadm", "get", uuid] in sim.node.commands
    assert f"target 127.0.0.1 port {sim.server.port}" in headnode.log()


# --- OpenSSH certificates, checked by a real sshd --------------------------------------------


@pytest.fixture
def certified(tmp_path: Path) -> Iterator[tuple[OpenSshServer, Path]]:
    """An sshd that trusts a user CA and has no authorized key: only a certificate gets in."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("ca", "id_user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    server = OpenSshServer(tmp_path / "sshd", "", trusted_ca=(keys / "ca.pub").read_text())
    yield server, keys
    server.close()


def _sign(keys: Path) -> Path:
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-s",
            str(keys / "ca"),
            "-I",
            "operator",
            "-n",
            "root",
            "-V",
            "-5m:+1h",
            str(keys / "id_user.pub"),
        ],
        check=True,
    )
    return keys / "id_user-cert.pub"


def _cert_config(tmp_path: Path, server: OpenSshServer, identity: Path, certificate: Path | None) -> Path:
    path = tmp_path / "ssh_config"
    cert = f"    CertificateFile {certificate}\n" if certificate else ""
    path.write_text(
        f"Host cn-cert\n    HostName 127.0.0.1\n    Port {server.port}\n    IdentityFile {identity}\n{cert}"
    )
    (tmp_path / "known_hosts").write_text(server.host_key_line)
    return path


def _run(tmp_path: Path, config: Path) -> str:
    client = SshClient(SshTarget(host="cn-cert", ssh_config=str(config), known_hosts=str(tmp_path / "known_hosts")))
    try:
        return client.run(["echo", "certified"]).stdout
    finally:
        client.close()


def test_a_key_without_its_certificate_is_refused(tmp_path: Path, certified: tuple[OpenSshServer, Path]) -> None:
    server, keys = certified
    config = _cert_config(tmp_path, server, keys / "id_user", None)
    with pytest.raises(Exception, match="authentication failed") as info:
        _run(tmp_path, config)
    assert getattr(info.value, "code", None) == "SshAuthFailed"


def test_a_certificate_next_to_the_key_is_used(tmp_path: Path, certified: tuple[OpenSshServer, Path]) -> None:
    server, keys = certified
    _sign(keys)  # id_user-cert.pub, found by name next to id_user
    config = _cert_config(tmp_path, server, keys / "id_user", None)
    assert _run(tmp_path, config) == "certified\n"
    log = server.log()
    assert "Accepted publickey for root" in log
    assert "ED25519-CERT" in log


def test_a_certificate_file_elsewhere_is_used(tmp_path: Path, certified: tuple[OpenSshServer, Path]) -> None:
    server, keys = certified
    elsewhere = tmp_path / "certs" / "operator.pub"
    elsewhere.parent.mkdir()
    _sign(keys).rename(elsewhere)
    config = _cert_config(tmp_path, server, keys / "id_user", elsewhere)
    assert _run(tmp_path, config) == "certified\n"
    assert "ED25519-CERT" in server.log()
