"""run() and stream(): every way a command can fail is a typed error."""

from __future__ import annotations

import pytest

from imgprep.errors import Cancelled, CommandError, CommandKilled, CommandTimeout, ProgramMissing
from imgprep.run import run, stream

pytestmark = pytest.mark.allow_subprocess("sh", "setpriv", "imgprep-no-such-program")


def test_a_missing_program_is_program_missing() -> None:
    with pytest.raises(ProgramMissing, match="imgprep-no-such-program is not installed"):
        run(["imgprep-no-such-program", "--help"])
    with pytest.raises(ProgramMissing, match="imgprep-no-such-program is not installed"):
        stream(["imgprep-no-such-program"], lambda _data: None)
    assert run(["sh", "-c", "exit 0"]).returncode == 0  # control


def test_a_timeout_is_command_timeout() -> None:
    with pytest.raises(CommandTimeout, match="did not finish within"):
        run(["sh", "-c", "exec sleep 30"], timeout=0.2)


def test_a_signal_is_command_killed() -> None:
    with pytest.raises(CommandKilled, match="killed by signal 9"):
        run(["sh", "-c", "kill -9 $$"])
    with pytest.raises(CommandKilled):
        stream(["sh", "-c", "kill -9 $$"], lambda _data: None)


def test_a_non_zero_exit_is_command_error_with_its_stderr() -> None:
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "echo broken >&2; exit 4"])
    assert info.value.returncode == 4
    assert "broken" in info.value.message
    with pytest.raises(CommandError):
        stream(["sh", "-c", "echo broken >&2; exit 4"], lambda _data: None)


class CancelAfterFirstOutput:
    def __init__(self) -> None:
        self.seen = b""

    def __call__(self, data: bytes) -> None:
        self.seen += data

    @property
    def is_set(self) -> bool:
        return bool(self.seen)


def test_stream_hands_stdout_over_and_a_cancel_is_cancelled() -> None:
    got = bytearray()
    assert stream(["sh", "-c", "printf hello; echo note >&2"], got.extend).strip() == "note"
    assert bytes(got) == b"hello"
    cancel = CancelAfterFirstOutput()
    with pytest.raises(Cancelled):
        stream(["sh", "-c", "while :; do echo tick; sleep 0.05; done"], cancel, cancel=cancel)
    assert cancel.seen.startswith(b"tick")
