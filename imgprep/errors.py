"""Typed errors. Library code raises these; only the CLI maps them to exit codes."""

from __future__ import annotations

from collections.abc import Sequence


class ImgprepError(Exception):
    """Base class. ``code`` is the IMGAPI-style error code shown to users."""

    code = "InternalError"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidInput(ImgprepError):
    """Bad input: nothing was touched. ``problems`` lists every problem found."""

    code = "ValidationFailed"

    def __init__(self, problems: str | Sequence[str], *, code: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems), code=code)


class VmBusy(InvalidInput):
    """Another job holds the VM, or an earlier job on it still needs recovery."""

    code = "VmBusy"


class NotSupported(ImgprepError):
    code = "NotSupported"


class MissingDependency(ImgprepError):
    """A host dependency imgprep cannot install itself (it is not on PyPI) is missing."""

    code = "MissingDependency"


class TransientError(ImgprepError):
    """A failure worth retrying (dropped connection, busy daemon). Never a wrong answer."""

    code = "TransientError"


class CommandError(ImgprepError):
    """A command (local or remote) failed. Carries everything needed to diagnose it."""

    code = "CommandFailed"

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr or stdout).strip().splitlines()[-5:]
        detail = (": " + " | ".join(tail)) if tail else ""
        super().__init__(f"{cmd[0]} exited with {returncode}{detail}")


class PrepareFailed(ImgprepError):
    """The guest-side prepare run failed (PrepareImageError / PrepareImageDidNotRun)."""

    code = "PrepareImageError"


class Cancelled(ImgprepError):
    code = "Canceled"

    def __init__(self, message: str = "job canceled by signal") -> None:
        super().__init__(message)


class RestoreFailed(ImgprepError):
    """The VM could not be restored to its checkpoint. ``imgprep jobs recover`` can finish it."""

    code = "RestoreFailed"


class ProgramMissing(ImgprepError):
    """A program imgprep runs is not installed (not on PATH)."""

    code = "ProgramMissing"


class CommandTimeout(ImgprepError):
    """A command did not finish within its time limit (it was killed)."""

    code = "CommandTimeout"


class CommandKilled(CommandError):
    """A command was ended by a signal (not by imgprep's cancel)."""

    code = "CommandKilled"

    def __init__(self, cmd: Sequence[str], signum: int, stdout: str, stderr: str) -> None:
        super().__init__(cmd, -signum, stdout, stderr)
        self.signum = signum
        self.message = f"{cmd[0]} was killed by signal {signum}"
        self.args = (self.message,)
