"""Configuration: parsed once, at the edge, into frozen dataclasses.

Precedence: built-in defaults < YAML config file < command-line flags. Every problem
in a config file is reported at once, each with the file, line and key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from imgprep.errors import InvalidInput

COMPRESSIONS = ("none", "gzip", "xz", "zstd")
BACKENDS = ("libvirt", "smartos")
CAPTURES = ("clone", "in-place")  # libvirt: how the prototype's disks are captured (docs/capture.md)
CONSISTENCIES = ("auto", "freeze", "stop", "crash")


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/imgprep")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "imgprep"


def default_view_dir() -> Path:
    """Clone mode's views (overlays, scratch files): outside the private state directory,
    because QEMU's user must reach them."""
    if os.geteuid() == 0:
        return Path("/var/lib/imgprep-views")
    return default_state_dir().with_name("imgprep-views")


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Per-stage timeouts in seconds (imgadm hard-codes 300 s; here each is configurable)."""

    stop: float = 300.0  # graceful shutdown of the running prototype
    boot: float = 300.0  # prepare boot started -> guest reports "running"
    prepare: float = 300.0  # "running" -> "success" | "error" (also the in-guest script limit)
    shutdown: float = 300.0  # final state -> domain shut off
    agent: float = 10.0  # clone: the wait for the guest agent's first answer, and each freeze/thaw call
    verify: float = 600.0  # the verification boot: start -> its report (docs/verification.md)


@dataclasses.dataclass(frozen=True)
class SmartosHost:
    """A SmartOS compute node reached over SSH."""

    host: str
    user: str = "root"
    port: int = 22
    key_file: str | None = None
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    ssh_config: str | None = None  # None = ~/.ssh/config if it exists; "none" = do not read one


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    listen: str = "127.0.0.1:8480"
    token: str | None = None
    workers: int = 1
    image_dir: str | None = None
    backend: str = "libvirt"  # the backend of every job the server runs (docs/api.md)
    hosts: tuple[str, ...] = ()  # smartos: names from ``hosts:`` searched for a VM, in order; () = all of them


@dataclasses.dataclass(frozen=True)
class Config:
    libvirt_uri: str = "qemu:///system"
    state_dir: Path = dataclasses.field(default_factory=default_state_dir)
    view_dir: Path = dataclasses.field(default_factory=default_view_dir)  # clone mode: overlays, scratch
    # clone of a running VM: the backup job is ended when view_dir has less free (scratchguard.py)
    scratch_reserve_mib: int = 256
    output_dir: Path = Path()
    compression: str | None = None  # None: the backend's default (libvirt zstd, smartos gzip)
    timeouts: Timeouts = Timeouts()
    force_stop: bool = False
    strict: bool = False  # an export over IMGAPI's limits fails the job (imgprep.limits)
    capture: str = "clone"  # libvirt: clone (the prototype keeps running) or in-place
    consistency: str = "auto"  # clone of a running VM: auto (freeze if the agent answers, else stop)
    verify: bool | None = None  # boot the exported image once to verify it; None: yes where available
    keep_unverified: bool = False  # a failed verification keeps the image file (the job still fails)
    script: Path | None = None
    libguestfs_tcg: bool = False
    retry_attempts: int = 5
    retry_max_seconds: float = 60.0
    hosts: Mapping[str, SmartosHost] = dataclasses.field(default_factory=dict)
    serve: ServeConfig = ServeConfig()

    def with_overrides(self, **changes: Any) -> Config:
        """Apply command-line overrides; ``None`` means "not given"."""
        given = {k: v for k, v in changes.items() if v is not None}
        timeout_keys = {f.name for f in dataclasses.fields(Timeouts)}
        timeouts = {k[: -len("_timeout")]: given.pop(k) for k in list(given) if k.endswith("_timeout")}
        unknown = set(timeouts) - timeout_keys
        if unknown:
            raise ValueError(f"unknown timeouts {sorted(unknown)}")
        if timeouts:
            given["timeouts"] = dataclasses.replace(self.timeouts, **timeouts)
        return dataclasses.replace(self, **given)


# --- YAML loading -------------------------------------------------------------------


class _Problems:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, node: yaml.Node, key: str, message: str) -> None:
        self.items.append(f"{self.path}:{node.start_mark.line + 1}: {key}: {message}")


def _scalar(node: yaml.Node) -> Any:
    return yaml.safe_load(yaml.serialize(node))


def _mapping(node: yaml.Node, key: str, problems: _Problems) -> dict[str, yaml.Node] | None:
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, key, "must be a mapping")
        return None
    out: dict[str, yaml.Node] = {}
    for k, v in node.value:
        name = k.value if isinstance(k, yaml.ScalarNode) else str(k)
        out[name] = v
    return out


def _positive(node: yaml.Node, key: str, problems: _Problems) -> float | None:
    value = _scalar(node)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        problems.add(node, key, f"must be a positive number of seconds, got {value!r}")
        return None
    return float(value)


def _str(node: yaml.Node, key: str, problems: _Problems) -> str | None:
    value = _scalar(node)
    if not isinstance(value, str) or not value:
        problems.add(node, key, f"must be a non-empty string, got {value!r}")
        return None
    return value


def _bool(node: yaml.Node, key: str, problems: _Problems) -> bool | None:
    value = _scalar(node)
    if not isinstance(value, bool):
        problems.add(node, key, f"must be true or false, got {value!r}")
        return None
    return value


def _int(node: yaml.Node, key: str, problems: _Problems, minimum: int = 1) -> int | None:
    value = _scalar(node)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.add(node, key, f"must be an integer >= {minimum}, got {value!r}")
        return None
    return value


def _host_names(node: yaml.Node, key: str, problems: _Problems) -> list[tuple[str, yaml.Node]] | None:
    """A non-empty list of host names, each with its node (checked against ``hosts:`` later)."""
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        problems.add(node, key, "must be a non-empty list of names from hosts:")
        return None
    names: list[tuple[str, yaml.Node]] = []
    for item in node.value:
        name = _str(item, key, problems)
        if name is not None:
            names.append((name, item))
    return names


def _parse_host(name: str, node: yaml.Node, problems: _Problems) -> SmartosHost | None:
    fields = _mapping(node, f"hosts.{name}", problems)
    if fields is None:
        return None
    values: dict[str, Any] = {}
    for key, value in fields.items():
        path = f"hosts.{name}.{key}"
        if key in ("host", "user", "key_file", "known_hosts", "ssh_config"):
            values[key] = _str(value, path, problems)
        elif key == "port":
            values[key] = _int(value, path, problems)
        elif key == "accept_new_host_key":
            values[key] = _bool(value, path, problems)
        else:
            problems.add(value, path, "unknown key")
    if "host" not in values:
        problems.add(node, f"hosts.{name}.host", "is required")
        return None
    if any(v is None for v in values.values()):
        return None
    return SmartosHost(**values)


def _check_serve_backend(
    changes: dict[str, Any], serve_nodes: dict[str, yaml.Node], base: Config, problems: _Problems
) -> None:
    """``serve.hosts`` names configured hosts and goes with ``serve.backend: smartos``, which needs hosts."""
    serve = changes.get("serve") or {}
    hosts = changes.get("hosts")
    known = set(base.hosts if hosts is None else hosts)
    backend = serve.get("backend", base.serve.backend)
    if "hosts" in serve_nodes and backend != "smartos":
        problems.add(serve_nodes["hosts"], "serve.hosts", "only applies with serve.backend: smartos")
    for name, node in serve.get("hosts") or []:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            problems.add(node, "serve.hosts", f"{name!r} is not a host from hosts: (configured: {listed})")
    if backend == "smartos" and not known and "backend" in serve_nodes:
        problems.add(serve_nodes["backend"], "serve.backend", "smartos needs at least one compute node in hosts:")


def load_config(path: Path, base: Config | None = None) -> Config:
    """Parse a YAML config file into a Config; raise InvalidInput listing every problem."""
    base = base or Config()
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"config file {path}: cannot read: {exc.strerror}") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise InvalidInput(f"config file {path}{where}: invalid YAML: {reason}") from None
    if root is None:
        return base
    problems = _Problems(path)
    top = _mapping(root, "(top level)", problems)
    if top is None:
        raise InvalidInput(problems.items)
    changes: dict[str, Any] = {}
    serve_nodes: dict[str, yaml.Node] = {}
    for key, node in top.items():
        if key in ("libvirt_uri",):
            changes[key] = _str(node, key, problems)
        elif key in ("state_dir", "output_dir", "script", "view_dir"):
            value = _str(node, key, problems)
            changes[key] = Path(value).expanduser() if value else None
        elif key == "compression":
            value = _scalar(node)
            if value not in COMPRESSIONS:
                problems.add(node, key, f"must be one of {', '.join(COMPRESSIONS)}, got {value!r}")
            changes[key] = value
        elif key in ("capture", "consistency"):
            value = _scalar(node)
            choices: tuple[str, ...] = CAPTURES if key == "capture" else CONSISTENCIES
            if value not in choices:
                problems.add(node, key, f"must be one of {', '.join(choices)}, got {value!r}")
            changes[key] = value
        elif key in ("force_stop", "libguestfs_tcg", "strict", "verify", "keep_unverified"):
            changes[key] = _bool(node, key, problems)
        elif key in ("retry_attempts", "scratch_reserve_mib"):
            changes[key] = _int(node, key, problems)
        elif key == "retry_max_seconds":
            changes[key] = _positive(node, key, problems)
        elif key == "timeouts":
            fields = _mapping(node, key, problems) or {}
            timeouts: dict[str, float | None] = {}
            allowed = {f.name for f in dataclasses.fields(Timeouts)}
            for name, value_node in fields.items():
                if name not in allowed:
                    problems.add(
                        value_node,
                        f"timeouts.{name}",
                        f"unknown key (known: {', '.join(sorted(allowed))})",
                    )
                    continue
                timeouts[name] = _positive(value_node, f"timeouts.{name}", problems)
            changes[key] = timeouts
        elif key == "hosts":
            hosts: dict[str, SmartosHost | None] = {}
            for name, host_node in (_mapping(node, key, problems) or {}).items():
                hosts[name] = _parse_host(name, host_node, problems)
            changes[key] = hosts
        elif key == "serve":
            serve: dict[str, Any] = {}
            for name, value_node in (_mapping(node, key, problems) or {}).items():
                path_key = f"serve.{name}"
                if name in ("listen", "token", "image_dir"):
                    serve[name] = _str(value_node, path_key, problems)
                elif name == "workers":
                    serve[name] = _int(value_node, path_key, problems)
                elif name == "backend":
                    value = _scalar(value_node)
                    if value not in BACKENDS:
                        problems.add(value_node, path_key, f"must be one of {', '.join(BACKENDS)}, got {value!r}")
                    serve[name] = value
                elif name == "hosts":
                    serve[name] = _host_names(value_node, path_key, problems)
                else:
                    problems.add(value_node, path_key, "unknown key")
                serve_nodes[name] = value_node
            changes[key] = serve
        else:
            problems.add(node, key, "unknown key")
    _check_serve_backend(changes, serve_nodes, base, problems)
    if problems.items:
        raise InvalidInput(problems.items)
    timeouts_change = changes.pop("timeouts", None)
    if timeouts_change:
        changes["timeouts"] = dataclasses.replace(base.timeouts, **timeouts_change)
    serve_change = changes.pop("serve", None)
    if serve_change:
        if serve_change.get("hosts") is not None:
            serve_change["hosts"] = tuple(name for name, _ in serve_change["hosts"])
        changes["serve"] = dataclasses.replace(base.serve, **serve_change)
    return dataclasses.replace(base, **changes)
