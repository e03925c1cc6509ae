"""The one way imgprep runs a local command: argument lists only, checked, logged.

``run`` captures the output; ``stream`` hands stdout to a callback as it comes and
can be canceled. Both map what can go wrong to typed errors: a missing program
(ProgramMissing), a timeout (CommandTimeout), a signal (CommandKilled), a non-zero
exit (CommandError), a cancel (Cancelled).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from imgprep.errors import Cancelled, CommandError, CommandKilled, CommandTimeout, ProgramMissing

log = logging.getLogger(__name__)


class Cancellable(Protocol):
    @property
    def is_set(self) -> bool: ...


def _missing(cmd: Sequence[str]) -> ProgramMissing:
    return ProgramMissing(f"{cmd[0]} is not installed (not found on PATH); install it and retry")


def _check(cmd: Sequence[str], returncode: int, stdout: str, stderr: str, allowed: Sequence[int]) -> None:
    if returncode < 0:
        raise CommandKilled(cmd, -returncode, stdout, stderr)
    if returncode not in allowed:
        raise CommandError(cmd, returncode, stdout, stderr)


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    allowed: Sequence[int] = (0,),
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (never through a shell), capture its output, raise a typed error on failure."""
    log.debug("run: %s", shlex.join(cmd))
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(
            list(cmd),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=full_env,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise _missing(cmd) from None
    except subprocess.TimeoutExpired:
        raise CommandTimeout(f"{cmd[0]} did not finish within {timeout:.0f}s (killed)") from None
    stdout = proc.stdout.decode(errors="replace")
    stderr = proc.stderr.decode(errors="replace")
    if check:
        _check(cmd, proc.returncode, stdout, stderr, allowed)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, stdout, stderr)


def stream(
    cmd: Sequence[str],
    on_stdout: Callable[[bytes], None],
    *,
    cancel: Cancellable | None = None,
    chunk: int = 256,
    die_with_parent: bool = True,
) -> str:
    """Run ``cmd``, hand its stdout to ``on_stdout`` as it arrives; return its stderr.

    A cancel seen between two reads terminates the command and raises Cancelled. With
    ``die_with_parent`` the command is killed if imgprep dies (``setpriv --pdeathsig``),
    so it cannot go on writing behind the back of ``imgprep jobs recover``.
    """
    full = ["setpriv", "--pdeathsig", "KILL", "--", *cmd] if die_with_parent else list(cmd)
    log.debug("stream: %s", shlex.join(full))
    with tempfile.TemporaryFile() as errfile:  # a file: a chatty stderr cannot stall stdout
        try:
            proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errfile)
        except FileNotFoundError:
            raise _missing(full) from None
        assert proc.stdout is not None
        canceled = False
        try:
            while data := proc.stdout.read1(chunk):  # type: ignore[attr-defined]
                on_stdout(data)
                if cancel is not None and cancel.is_set:
                    canceled = True
                    proc.terminate()
                    break
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace")
    if canceled or (cancel is not None and cancel.is_set):
        raise Cancelled(f"{cmd[0]} canceled")
    if die_with_parent and code == 127 and "failed to execute" in stderr:  # setpriv could not exec it
        raise _missing(cmd)
    _check(cmd, code, "", stderr, (0,))
    return stderr
