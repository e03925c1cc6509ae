"""imgprep.libguestfs.selinux_label: which policy, which tool, what a hostile config gets.

The libguestfs handle is faked (a dict of guest files); the real labelling, under an
enforcing guest, is tested end to end in tests/e2e/test_layouts.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from imgprep.libguestfs import Guest, GuestfsError, selinux_file_contexts, selinux_label

SPEC = "/etc/selinux/default/contexts/files/file_contexts"
INJECTED = ["/var/lib/imgprep-prepare", "/etc/systemd/system/imgprep-prepare.service"]


class FakeHandle:
    def __init__(self, files: dict[str, bytes], *, appliance_setfiles: bool = False) -> None:
        self.files = files
        self.appliance_setfiles = appliance_setfiles
        self.calls: list[tuple[str, Any]] = []

    def exists(self, path: str) -> bool:
        return path in self.files

    def is_dir(self, path: str, followsymlinks: bool = False) -> bool:
        return False

    def is_symlink(self, path: str) -> bool:
        return False

    def filesize(self, path: str) -> int:
        return len(self.files[path])

    def read_file(self, path: str) -> bytes:
        return self.files[path]

    def feature_available(self, names: list[str]) -> bool:
        return self.appliance_setfiles and names == ["selinuxrelabel"]

    def selinux_relabel(self, spec: str, path: str, force: bool = False) -> None:
        self.calls.append(("selinux_relabel", (spec, path, force)))

    def command(self, argv: list[str]) -> str:
        self.calls.append(("command", argv))
        return ""


def guest(config: str | bytes | None, *, setfiles: bool = True, appliance: bool = False) -> Guest:
    files: dict[str, bytes] = {SPEC: b"/.* system_u:object_r:default_t\n"}
    if config is not None:
        files["/etc/selinux/config"] = config.encode() if isinstance(config, str) else config
    if setfiles:
        files["/usr/sbin/setfiles"] = b"\x7fELF"
    return Guest(FakeHandle(files, appliance_setfiles=appliance), "/dev/sda1")


def calls(g: Guest) -> list[tuple[str, Any]]:
    handle: FakeHandle = g.g
    return handle.calls


@pytest.mark.parametrize("mode", ["enforcing", "permissive", "Enforcing"])
def test_enabled_policy_labels_with_the_guests_setfiles(mode: str) -> None:
    g = guest(f"# comment\nSELINUX={mode}\nSELINUXTYPE=default\n")
    assert selinux_label(g, INJECTED) == SPEC
    assert calls(g) == [("command", ["/usr/sbin/setfiles", "-F", SPEC, *INJECTED])]


def test_appliance_setfiles_is_preferred() -> None:
    g = guest("SELINUX=enforcing\nSELINUXTYPE=default\n", appliance=True)
    assert selinux_label(g, INJECTED) == SPEC
    assert calls(g) == [("selinux_relabel", (SPEC, path, True)) for path in INJECTED]


@pytest.mark.parametrize("config", [None, "SELINUX=disabled\nSELINUXTYPE=default\n", "SELINUXTYPE=default\n"])
def test_no_selinux_no_labelling(config: str | None) -> None:
    g = guest(config)
    assert selinux_file_contexts(g) is None
    assert selinux_label(g, INJECTED) is None
    assert calls(g) == []


@pytest.mark.parametrize("policy", ["../../../tmp/x", "default/../x", "", "a b", "-rf"])
def test_hostile_policy_name_is_refused(policy: str) -> None:
    g = guest(f"SELINUX=enforcing\nSELINUXTYPE={policy}\n")
    with pytest.raises(GuestfsError, match="invalid SELinux policy"):
        selinux_label(g, INJECTED)
    assert calls(g) == []


def test_oversized_config_is_refused() -> None:
    g = guest(b"SELINUX=enforcing\n" + b"#" * (64 * 1024))
    with pytest.raises(GuestfsError, match="larger than"):
        selinux_label(g, INJECTED)


def test_enabled_without_policy_files_or_setfiles_fails_clearly() -> None:
    g = guest("SELINUX=enforcing\nSELINUXTYPE=mls\n")
    with pytest.raises(GuestfsError, match="no /etc/selinux/mls/contexts/files/file_contexts"):
        selinux_label(g, INJECTED)
    g = guest("SELINUX=enforcing\nSELINUXTYPE=default\n", setfiles=False)
    with pytest.raises(GuestfsError, match="no setfiles"):
        selinux_label(g, INJECTED)


def test_relative_path_is_refused() -> None:
    g = guest("SELINUX=enforcing\nSELINUXTYPE=default\n")
    with pytest.raises(ValueError, match="absolute"):
        selinux_label(g, ["etc/passwd"])
    assert calls(g) == []
