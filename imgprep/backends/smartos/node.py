"""The compute node, as the SmartOS backend talks to it: commands over SSH, and files
under a zone root read and written by a constant remote script (``remote/zone.js``).

The script is shipped as a file and run by the platform's node (the global zone has
no Python or Perl; vmadm itself runs on ``/usr/node/bin/node``); only its positional
arguments vary, and those are quoted like every other argument (``SshClient`` joins
argument lists with shlex). It walks the zone root one directory entry at a time and
never follows a symlink out of it, even while a process in the zone swaps directories
for symlinks (docs/smartos-backend.md).
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
NODE = "/usr/node/bin/node"  # the platform's node (SmartOS ships it for vmadm)


@cache
def remote_script(name: str) -> str:
    """The text of ``remote/<name>`` (``zone.js`` runs as ``node -e TEXT imgprep-zone ARGS...``)."""
    return (REMOTE_DIR / name).read_text()


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

    def zone_script(self, command: str, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """``remote/zone.js COMMAND ARGS...`` on the node."""
        return self.run([NODE, "-e", remote_script("zone.js"), "imgprep-zone", command, *args], input=input)

    # --- under a zone root (never leaving it, whatever the zone swaps meanwhile) ------

    def write_zone_file(self, root: str, f: ZoneFile) -> None:
        args = [root, f.rel, f.mode, f.dirmode]
        self.zone_script("write", *([*args, f.link] if f.link else args), input=f.data)

    def present(self, root: str, rels: Sequence[str]) -> list[str]:
        """The paths ``root/rel`` that exist (a dangling symlink counts), symlinks on the
        way resolved as the zone sees them: never into the global zone."""
        if not rels:
            return []
        out = self.zone_script("present", root, *rels).stdout
        return [line for line in out.splitlines() if line]

    def readlink(self, root: str, rel: str) -> str:
        """The target of the symlink ``root/rel`` ("" if it is none), its directories
        resolved inside the zone root; never follows the link itself."""
        out = self.zone_script("readlink", root, rel).stdout
        return out[:-1] if out.endswith("\n") else out
