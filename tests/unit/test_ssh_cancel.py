"""A cancel seen while reading a remote command's output is Cancelled, never a
TransientError (it used to be an InterruptedError, an OSError, and so retried)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

from imgprep.errors import Cancelled
from imgprep.ssh import SshClient, SshTarget


class FakeChannel:
    def __init__(self) -> None:
        self.status_event = threading.Event()
        self.status_event.set()
        self.exit_status = 0
        self.closed = False
        self.chunks = [b"data", b""]

    def sendall(self, _data: bytes) -> None: ...

    def shutdown_write(self) -> None: ...

    def recv(self, _n: int) -> bytes:
        return self.chunks.pop(0)

    def recv_stderr_ready(self) -> bool:
        return False

    def recv_stderr(self, _n: int) -> bytes:
        return b""

    def close(self) -> None:
        self.closed = True


class FakeClient(SshClient):
    def __init__(self) -> None:
        super().__init__(SshTarget("cn1"))
        self.channel = FakeChannel()

    def _open_channel(self, argv: Sequence[str], timeout: float) -> Any:
        return self.channel


def test_a_cancel_during_a_stream_is_cancelled_and_closes_the_channel() -> None:
    client = FakeClient()
    with pytest.raises(Cancelled):
        client.run_stream(["zfs", "send", "zones/x@final"], lambda _data: None, cancelled=lambda: True)
    assert client.channel.closed


def test_control_without_a_cancel_the_stream_completes() -> None:
    client = FakeClient()
    got = bytearray()
    assert client.run_stream(["zfs", "send", "zones/x@final"], got.extend) == 4
    assert bytes(got) == b"data"
