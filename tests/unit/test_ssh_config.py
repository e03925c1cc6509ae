"""imgprep.ssh_config.plan_route: which hops, users, ports, keys and known_hosts files a
target resolves to, from an OpenSSH client configuration (files in tmp_path only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgprep.errors import InvalidInput
from imgprep.ssh_config import Hop, plan_route

CONFIG = """\
Host cn1
    HostName 10.0.0.7
    Port 2222
    User admin
    IdentityFile ~/.ssh/id_cn
    IdentityFile /keys/second
    CertificateFile /keys/id_cn-cert.pub
    UserKnownHostsFile /kh/triton
    ProxyJump hn

Host cn2
    HostName 10.0.0.8
    ProxyJump operator@bastion:2200,hn

Host cn3
    ProxyCommand nc %h %p

Host cn4
    HostName 10.0.0.9
    ProxyJump none

Host hn
    HostName 10.0.0.1
    User root
    IdentityFile /keys/hn

Host *
    User fallback
"""


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "ssh_config"
    path.write_text(CONFIG)
    return str(path)


def test_an_alias_with_proxyjump(config: str) -> None:
    route = plan_route("cn1", ssh_config=config)
    home = str(Path("~").expanduser())
    assert route == [
        Hop(name="hn", host="10.0.0.1", port=22, user="root", key_files=("/keys/hn",)),
        Hop(
            name="cn1",
            host="10.0.0.7",
            port=2222,
            user="admin",
            key_files=(f"{home}/.ssh/id_cn", "/keys/second"),
            certificate_file="/keys/id_cn-cert.pub",
            known_hosts="/kh/triton",
        ),
    ]
    assert route[1].host_key_name == "[10.0.0.7]:2222"


def test_what_imgprep_was_given_wins_over_the_file(config: str) -> None:
    route = plan_route("cn1", user="ops", port=2022, key_file="/mine", known_hosts="/my_kh", ssh_config=config)
    target = route[-1]
    assert (target.user, target.port, target.key_files, target.known_hosts) == ("ops", 2022, ("/mine",), "/my_kh")
    assert target.certificate_file is None  # the file's CertificateFile belongs to its IdentityFile
    assert route[0].known_hosts == "/my_kh"  # every hop is checked against the same file


def test_several_jumps_in_order_each_with_its_own_block(config: str) -> None:
    route = plan_route("cn2", ssh_config=config)
    assert [(h.name, h.host, h.port, h.user) for h in route] == [
        ("bastion", "bastion", 2200, "operator"),
        ("hn", "10.0.0.1", 22, "root"),
        ("cn2", "10.0.0.8", 22, "fallback"),
    ]


def test_no_config_and_proxyjump_none_are_direct(config: str, tmp_path: Path) -> None:
    assert [h.host for h in plan_route("cn4", ssh_config=config)] == ["10.0.0.9"]
    assert plan_route("cn1", ssh_config="none") == [Hop(name="cn1", host="cn1", port=22, user="root")]


def test_proxycommand_is_refused(config: str) -> None:
    with pytest.raises(InvalidInput, match="ProxyCommand is not supported; use ProxyJump"):
        plan_route("cn3", ssh_config=config)
    assert len(plan_route("cn1", ssh_config=config)) == 2  # the control


def test_a_named_file_that_does_not_exist_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such file"):
        plan_route("cn1", ssh_config=str(tmp_path / "missing"))
