"""The one way imgprep runs a local command: argument lists only, checked, logged."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence

from imgprep.errors import CommandError

log = logging.getLogger(__name__)


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    allowed: Sequence[int] = (0,),
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (never through a shell), capture its output, raise CommandError on failure."""
    log.debug("run: %s", shlex.join(cmd))
    full_env = None if env is None else {**os.environ, **env}
    proc = subprocess.run(
        list(cmd),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    stdout = proc.stdout.decode(errors="replace")
    stderr = proc.stderr.decode(errors="replace")
    if check and proc.returncode not in allowed:
        raise CommandError(cmd, proc.returncode, stdout, stderr)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, stdout, stderr)
