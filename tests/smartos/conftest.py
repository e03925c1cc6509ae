"""Fixtures: a compute-node SIMULATOR behind a real SSH server on 127.0.0.1, and a config
that points imgprep at it (a named host with its own key and known_hosts file)."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from imgprep.backends.smartos import SmartosBackend
from imgprep.cli import main
from tests.capabilities import requires
from tests.simulator import ComputeNode, SshSimulator, write_known_hosts

ORIGIN_IMAGE = {
    "v": 2,
    "uuid": "2f1dc911-6401-4fa4-8e9d-67ea2e39c271",
    "name": "base-64-lts",
    "version": "24.4.0",
    "type": "zone-dataset",
    "os": "smartos",
    "requirements": {"min_ram": 256},
    "users": [{"name": "root"}, {"name": "admin"}],
    "billing_tags": [],
    "generate_passwords": True,
    "description": "not inherited",
}

LX_ORIGIN: dict[str, Any] = {
    "v": 2,
    "uuid": "7b5981c4-1889-11e7-b4c5-3f3bdfc9b88b",
    "name": "debian-12",
    "version": "20250101",
    "type": "lx-dataset",
    "os": "linux",
    "requirements": {"brand": "lx", "min_platform": {"7.0": "20240101T000000Z"}},
    "users": [{"name": "root"}],
}

# Large parts of the guest tree a zone does not need (kernel, modules, docs, apt lists):
# they only make every simulated snapshot and send slower.
LX_EXCLUDES = (
    "./dev/*",
    "./boot/*",
    "./usr/lib/modules",
    "./usr/share/doc",
    "./usr/share/man",
    "./usr/share/locale",
    "./var/lib/apt/lists",
    "./var/cache/apt",
)

# The prototype zone: identity the default cleanup removes, content it keeps, and
# enough data for a stream that can be cut in the middle.
PROTOTYPE_FILES = {
    "etc/motd": b"prototype zone\n",
    "etc/ssh/sshd_config": b"HostKey /var/ssh/ssh_host_ed25519_key\n",
    "var/ssh/ssh_host_ed25519_key": b"PROTOTYPE PRIVATE HOST KEY\n",
    "var/ssh/ssh_host_ed25519_key.pub": b"ssh-ed25519 PROTOTYPE\n",
    "root/.ssh/authorized_keys": b"ssh-ed25519 AAAA operator@laptop\n",
    "root/.bash_history": b"mysql -p'secret'\n",
    "var/log/messages": b"prototype log line\n",
    "tmp/session-leftover": b"x\n",
    "opt/local/lib/app/data.bin": random.Random(109).randbytes(1536 * 1024),
}


def summary(out: str) -> dict[str, Any]:
    """The last line of ``imgprep create --json``: the job's result."""
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def events(out: str) -> list[dict[str, Any]]:
    """The events ``imgprep create --json`` printed before its result."""
    return [json.loads(line) for line in out.splitlines()[:-1]]


@dataclasses.dataclass
class Node:
    """The simulated node and everything a test needs to drive imgprep against it."""

    node: ComputeNode
    server: SshSimulator
    config: Path
    output: Path
    state_dir: Path
    known_hosts: Path
    host_key: paramiko.PKey
    tmp: Path

    def zone(self, **kwargs: Any) -> str:
        kwargs.setdefault("alias", "proto")
        kwargs.setdefault("image_uuid", ORIGIN_IMAGE["uuid"])
        kwargs.setdefault("files", PROTOTYPE_FILES)
        return self.node.create_zone(**kwargs)

    def cli(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(args), out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    def create(self, vm: str, *extra: str, compression: str = "gzip") -> tuple[int, str, str]:
        return self.cli(
            "create",
            "--config",
            str(self.config),
            "--backend",
            "smartos",
            "--host",
            "node1",
            "--vm",
            vm,
            "--compression",
            compression,
            "--output-dir",
            str(self.output),
            "--json",
            *extra,
        )

    def write_config(self, **overrides: Any) -> None:
        host = {
            "host": "127.0.0.1",
            "port": self.server.port,
            "user": "root",
            "key_file": str(self.tmp / "client_key"),
            "known_hosts": str(self.known_hosts),
        }
        config: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "timeouts": {"stop": 10, "boot": 15, "prepare": 30, "shutdown": 15},
            "retry_attempts": 3,
            "retry_max_seconds": 30,
            "hosts": {"node1": host},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        self.config.write_text(json.dumps(config))  # JSON is YAML


@pytest.fixture
def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    requires("node")  # the simulated /usr/node/bin/node is the host's
    monkeypatch.setattr(SmartosBackend, "poll_interval", 0.05)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    node = ComputeNode(tmp_path / "node")
    node.add_image(ORIGIN_IMAGE)
    host_key = paramiko.ECDSAKey.generate()
    client_key = paramiko.ECDSAKey.generate()
    client_key.write_private_key_file(str(tmp_path / "client_key"))
    server = SshSimulator(node, host_key, [client_key])
    known_hosts = tmp_path / "known_hosts"
    write_known_hosts(known_hosts, server.port, host_key)
    output = tmp_path / "out"
    output.mkdir()
    n = Node(node, server, tmp_path / "imgprep.yaml", output, tmp_path / "state", known_hosts, host_key, tmp_path)
    n.write_config()
    try:
        yield n
    finally:
        server.close()
        node.shutdown()


@pytest.fixture(scope="session")
def lx_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Linux tree an lx zone is created from: a trimmed copy of the end-to-end test
    guest's (built on first use and cached, like the end-to-end tests). Needs root and
    systemd-nspawn; with ``IMGPREP_REQUIRE_E2E=1`` a missing piece fails the test
    instead of skipping it."""
    requires("root", "systemd-nspawn", "nsenter", "debootstrap")
    from tests import guestimage

    source = guestimage.build().rootfs
    tree = tmp_path_factory.mktemp("lx") / "tree"
    tree.mkdir()
    excludes = [f"--exclude={pattern}" for pattern in LX_EXCLUDES]
    pack = subprocess.Popen(["tar", "-C", str(source), *excludes, "-cf", "-", "."], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-C", str(tree), "-xf", "-"], stdin=pack.stdout, check=True)
    assert pack.wait() == 0
    # The zone has no NIC in the simulator: nothing to wait for before multi-user.
    (tree / "etc/systemd/system/systemd-networkd-wait-online.service").symlink_to("/dev/null")
    return tree
