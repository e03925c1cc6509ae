"""The host end of the guest channel: bounded non-blocking reads from a UNIX socket."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgprep.backends.libvirt import prepare_xml
from imgprep.channel import MAX_LINE, ChannelParser
from imgprep.guestchannel import SocketChannel


def line(kind: str, text: str) -> bytes:
    return f"IMGPREP1 {kind} {base64.b64encode(text.encode()).decode()}\n".encode()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "ch.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    yield path, server
    server.close()


def test_no_socket_yet_is_no_error(tmp_path: Path) -> None:
    channel = SocketChannel(tmp_path / "absent.sock", ChannelParser())
    assert channel.connect() is False
    assert channel.poll().state is None
    assert channel.bytes_read == 0


def test_a_plain_file_in_place_of_the_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "planted.sock"
    path.write_text("IMGPREP1 state c3VjY2Vzcw==\n")
    with pytest.raises(OSError, match="not a socket"):
        SocketChannel(path, ChannelParser()).poll()


def test_a_flood_is_drained_with_bounded_memory(listener: tuple[Path, socket.socket]) -> None:
    path, server = listener
    parser = ChannelParser()
    channel = SocketChannel(path, parser)
    assert channel.connect()
    guest, _ = server.accept()
    peak = 0
    flood = b"A" * (1024 * 1024)
    for _ in range(100):  # 100 MiB without a newline, as fast as the socket takes it
        guest.sendall(flood)
        peak = max(peak, parser.buffered)
    guest.sendall(b"\n" * 1_000_000 + line("state", "running") + line("state", "success"))
    guest.close()
    channel.drain(60)
    assert not channel.reading  # it saw the end of the stream
    status = channel.poll()
    assert status.seen_states == ["running", "success"]
    assert peak <= MAX_LINE
    assert parser.buffered == 0
    assert channel.bytes_read == 100 * len(flood) + 1_000_000 + len(line("state", "running") + line("state", "success"))
    assert parser.dropped_lines == 1
    channel.close()


def test_single_byte_writes_are_all_read(listener: tuple[Path, socket.socket]) -> None:
    """QEMU writes the UART's bytes one by one: far more than a socket holds in flight."""
    path, server = listener
    channel = SocketChannel(path, ChannelParser())
    assert channel.connect()
    guest, _ = server.accept()
    message = line("log", "x" * 20_000) + line("state", "success")
    for byte in message:
        guest.send(bytes([byte]))
    guest.close()
    channel.drain(60)
    assert channel.poll().state == "success"
    assert channel.bytes_read == len(message)
    channel.close()


def test_the_prepare_boot_serial_port_is_a_unix_socket_not_a_file(tmp_path: Path) -> None:
    xml = "<domain type='qemu'><name>p</name><devices><serial type='pty'><target port='0'/></serial></devices></domain>"
    live, port = prepare_xml(xml, tmp_path / "ch.sock")
    assert port == 1
    assert '<serial type="unix"><source mode="bind" path="' + str(tmp_path / "ch.sock") + '" />' in live
    assert 'type="file"' not in live
