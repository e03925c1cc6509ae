"""The compute node, as the SmartOS backend talks to it: commands over SSH, and files
written under a zone root by constant remote scripts (``remote/*.sh``).

The scripts are shipped as files; only their positional arguments vary, and those are
quoted like every other argument (``SshClient`` joins argument lists with shlex).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from imgprep import safejson
from imgprep.errors import ImgprepError
from imgprep.ssh import SshClient, SshTarget

REMOTE_DIR = Path(__file__).resolve().parent / "remote"


@cache
def remote_script(name: str) -> str:
    """The text of ``remote/<name>.sh`` (run as ``/bin/sh -c TEXT imgprep-<name> ARGS...``)."""
    return (REMOTE_DIR / f"{name}.sh").read_text()


@dataclass(frozen=True)
class ZoneFile:
    """One file (or symlink, if ``link``) inject writes, relative to the zone root."""

    rel: str
    data: bytes = b""
    mode: str = "0644"
    dirmode: str = "0755"  # of the directories it has to create
    link: str = ""


class Node:
    """One compute node over one SSH connection (opened on first use, closed by ``close``)."""

    def __init__(self, target: SshTarget, *, accept_new_host_key: bool = False) -> None:
        self.target = target
        self.accept_new_host_key = accept_new_host_key
        self._ssh: SshClient | None = None

    @property
    def client(self) -> SshClient:
        if self._ssh is None:
            self._ssh = SshClient(self.target, accept_new_host_key=self.accept_new_host_key)
        return self._ssh

    def connect(self) -> None:
        """Connect now: the host key is checked before any command."""
        self.client.connect()

    def close(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, allowed: Sequence[int] = (0,)
    ) -> subprocess.CompletedProcess[str]:
        return self.client.run(argv, input=input, allowed=allowed)

    def run_stream(self, argv: Sequence[str], sink: Callable[[bytes], None]) -> int:
        return self.client.run_stream(argv, sink)

    def json(self, argv: Sequence[str]) -> Any:
        out = self.run(argv).stdout
        try:
            return safejson.loads(out, max_bytes=64 * 1024 * 1024, max_depth=64)
        except ValueError:
            raise ImgprepError(f"{' '.join(argv)}: the node answered non-JSON output", code="BadNodeOutput") from None

    def script(self, name: str, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-c", remote_script(name), f"imgprep-{name}", *args], input=input)

    # --- under a zone root (never following a symlink the zone planted) -------------

    def write_zone_file(self, root: str, f: ZoneFile) -> None:
        args = [root, f.rel, f.mode, f.dirmode]
        self.script("write", *([*args, f.link] if f.link else args), input=f.data)

    def present(self, root: str, rels: Sequence[str]) -> list[str]:
        """The paths under ``root`` that exist (a dangling symlink counts)."""
        out = self.script("present", *[f"{root}/{rel}" for rel in rels]).stdout
        return [line for line in out.splitlines() if line]

    def readlink(self, path: str) -> str:
        """The target of the symlink ``path`` ("" if it is none); never follows it."""
        listing = self.script("readlink", path).stdout
        return listing.rpartition(" -> ")[2].strip() if " -> " in listing else ""
