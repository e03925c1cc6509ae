"""Configuration: every key, precedence, and every error reported at once with file:line."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from imgprep.config import Config, ServeConfig, SmartosHost, Timeouts, load_config
from imgprep.errors import InvalidInput

FULL = """\
libvirt_uri: qemu+ssh://root@kvm1/system
state_dir: /srv/imgprep/state
output_dir: /srv/images
script: /srv/scripts/prepare
compression: xz
force_stop: true
strict: true
libguestfs_tcg: true
retry_attempts: 7
retry_max_seconds: 12.5
scratch_reserve_mib: 512
timeouts:
  stop: 10
  boot: 20
  prepare: 30.5
  shutdown: 40
  agent: 25
hosts:
  cn1:
    host: cn1.example.com
    user: admin
    port: 2222
    key_file: /root/.ssh/id_cn1
    known_hosts: /root/.ssh/known_hosts_cn1
    accept_new_host_key: true
  cn2:
    host: 10.0.0.2
serve:
  listen: 0.0.0.0:9000
  token: s3cret
  workers: 3
  image_dir: /srv/published
  backend: smartos
  hosts: [cn2, cn1]
"""


def write(tmp_path: Path, text: str, name: str = "imgprep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_every_key_is_parsed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert config.libvirt_uri == "qemu+ssh://root@kvm1/system"
    assert config.state_dir == Path("/srv/imgprep/state")
    assert config.output_dir == Path("/srv/images")
    assert config.script == Path("/srv/scripts/prepare")
    assert config.compression == "xz"
    assert config.force_stop is True
    assert config.strict is True
    assert config.libguestfs_tcg is True
    assert config.retry_attempts == 7
    assert config.retry_max_seconds == 12.5
    assert config.scratch_reserve_mib == 512
    assert config.timeouts == Timeouts(stop=10.0, boot=20.0, prepare=30.5, shutdown=40.0, agent=25.0)
    assert dict(config.hosts) == {
        "cn1": SmartosHost(
            host="cn1.example.com",
            user="admin",
            port=2222,
            key_file="/root/.ssh/id_cn1",
            known_hosts="/root/.ssh/known_hosts_cn1",
            accept_new_host_key=True,
        ),
        "cn2": SmartosHost(host="10.0.0.2"),
    }
    assert config.serve == ServeConfig(
        listen="0.0.0.0:9000",
        token="s3cret",
        workers=3,
        image_dir="/srv/published",
        backend="smartos",
        hosts=("cn2", "cn1"),
    )


def test_defaults() -> None:
    config = Config(state_dir=Path("/x"))
    assert config.libvirt_uri == "qemu:///system"
    assert config.compression is None  # the backend decides: libvirt zstd, smartos gzip
    assert config.timeouts == Timeouts(300.0, 300.0, 300.0, 300.0, 10.0)
    assert config.force_stop is False
    assert config.strict is False
    assert config.script is None
    assert config.retry_attempts == 5
    assert config.scratch_reserve_mib == 256
    assert dict(config.hosts) == {}
    assert config.serve.listen == "127.0.0.1:8480"
    assert config.serve.backend == "libvirt"
    assert config.serve.hosts == ()  # smartos: every configured host


def test_precedence_default_then_file_then_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compression: gzip
        force_stop: true
        timeouts:
          boot: 50
        """,
    )
    base = Config(state_dir=tmp_path / "state")
    from_file = load_config(path, base)
    # the file wins over the defaults, and only for the keys it names
    assert from_file.compression == "gzip"
    assert from_file.force_stop is True
    assert from_file.timeouts == Timeouts(stop=300.0, boot=50.0, prepare=300.0, shutdown=300.0)
    assert from_file.state_dir == tmp_path / "state"  # from the base, untouched by the file
    assert from_file.libvirt_uri == "qemu:///system"
    # command-line flags win over the file; None means "not given"
    final = from_file.with_overrides(
        compression="xz",
        force_stop=None,
        boot_timeout=None,
        prepare_timeout=7.0,
        libvirt_uri="test:///default",
    )
    assert final.compression == "xz"
    assert final.force_stop is True
    assert final.timeouts == Timeouts(stop=300.0, boot=50.0, prepare=7.0, shutdown=300.0)
    assert final.libvirt_uri == "test:///default"
    assert from_file.compression == "gzip"  # frozen: overrides make a new Config


def test_config_is_frozen() -> None:
    config = Config(state_dir=Path("/x"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.compression = "xz"  # type: ignore[misc]


def test_unknown_timeout_override_is_refused() -> None:
    with pytest.raises(ValueError, match="bogus"):
        Config(state_dir=Path("/x")).with_overrides(bogus_timeout=1.0)


def test_empty_file_is_the_base(tmp_path: Path) -> None:
    base = Config(state_dir=tmp_path, compression="gzip")
    assert load_config(write(tmp_path, ""), base) is base


def test_expanduser_on_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(write(tmp_path, "output_dir: ~/images\n"))
    assert config.output_dir == tmp_path / "images"


def test_all_errors_reported_at_once_with_file_line_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        libvirt_uri: ""
        compression: lz4
        force_stop: "yes"
        retry_attempts: 0
        retry_max_seconds: -1
        timeouts:
          boot: soon
          warp: 3
        hosts:
          cn1:
            user: admin
            port: true
            colour: red
        serve:
          workers: 1.5
          tls: on
        frobnicate: 1
        state_dir: 3
        """,
    )
    with pytest.raises(InvalidInput) as info:
        load_config(path)
    p = str(path)
    expected = [
        f"{p}:1: libvirt_uri: must be a non-empty string, got ''",
        f"{p}:2: compression: must be one of none, gzip, xz, zstd, got 'lz4'",
        f"{p}:3: force_stop: must be true or false, got 'yes'",
        f"{p}:4: retry_attempts: must be an integer >= 1, got 0",
        f"{p}:5: retry_max_seconds: must be a positive number of seconds, got -1",
        f"{p}:7: timeouts.boot: must be a positive number of seconds, got 'soon'",
        f"{p}:8: timeouts.warp: unknown key (known: agent, boot, prepare, shutdown, stop, verify)",
        f"{p}:12: hosts.cn1.port: must be an integer >= 1, got True",
        f"{p}:13: hosts.cn1.colour: unknown key",
        f"{p}:11: hosts.cn1.host: is required",
        f"{p}:15: serve.workers: must be an integer >= 1, got 1.5",
        f"{p}:16: serve.tls: unknown key",
        f"{p}:17: frobnicate: unknown key",
        f"{p}:18: state_dir: must be a non-empty string, got 3",
    ]
    assert sorted(info.value.problems) == sorted(expected)
    # one message carries them all
    for problem in expected:
        assert problem in info.value.message


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("timeouts: 5\n", 1, "timeouts: must be a mapping"),
        ("hosts:\n  cn1: just-a-name\n", 2, "hosts.cn1: must be a mapping"),
        ("serve: [1, 2]\n", 1, "serve: must be a mapping"),
        ("[1, 2]\n", 1, "(top level): must be a mapping"),
    ],
)
def test_wrong_shapes(tmp_path: Path, text: str, line: int, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput) as info:
        load_config(path)
    assert f"{path}:{line}: {key}" in info.value.problems


def test_serve_backend_and_hosts_errors(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        hosts:
          cn1: {host: 10.0.0.1}
        serve:
          backend: smartos
          hosts:
            - cn1
            - cn9
            - 7
        """,
    )
    with pytest.raises(InvalidInput) as info:
        load_config(path)
    p = str(path)
    assert sorted(info.value.problems) == sorted(
        [
            f"{p}:7: serve.hosts: 'cn9' is not a host from hosts: (configured: cn1)",
            f"{p}:8: serve.hosts: must be a non-empty string, got 7",
        ]
    )


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("serve:\n  backend: xen\n", 2, "serve.backend: must be one of libvirt, smartos, got 'xen'"),
        ("serve:\n  backend: smartos\n", 2, "serve.backend: smartos needs at least one compute node in hosts:"),
        ("serve:\n  hosts: []\n", 2, "serve.hosts: must be a non-empty list of names from hosts:"),
        (
            "hosts: {cn1: {host: a}}\nserve:\n  hosts: [cn1]\n",
            3,
            "serve.hosts: only applies with serve.backend: smartos",
        ),
    ],
)
def test_serve_backend_shapes(tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidInput) as info:
        load_config(path)
    assert f"{path}:{line}: {problem}" in info.value.problems


def test_serve_smartos_without_hosts_list_means_every_host(tmp_path: Path) -> None:
    path = write(tmp_path, "hosts:\n  cn1: {host: a}\n  cn2: {host: b}\nserve:\n  backend: smartos\n")
    config = load_config(path)
    assert config.serve.backend == "smartos"
    assert config.serve.hosts == ()


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "compression: zstd\ntimeouts:\n  boot: 5\n   prepare: [\n")
    with pytest.raises(InvalidInput) as info:
        load_config(path)
    assert info.value.message.startswith(f"config file {path}:4: invalid YAML: ")


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"missing\.yaml: cannot read: No such file or directory"):
        load_config(tmp_path / "missing.yaml")


def test_the_agent_timeout_is_a_timeout_like_the_others() -> None:
    assert Config().timeouts.agent == 10.0
    assert Config().with_overrides(agent_timeout=3.0, stop_timeout=None).timeouts.agent == 3.0
