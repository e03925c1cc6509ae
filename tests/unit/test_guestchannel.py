"""The host end of the guest channel: bounded non-blocking reads from a UNIX socket."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgprep.backends.libvirt import prepare_xml
from imgprep.channel import MAX_LINE, ChannelParser
from imgprep.guestchannel import READ_CHUNK, SocketChannel


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
    assert channel.poll() == 0


def test_a_plain_file_in_place_of_the_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "planted.sock"
    path.write_text("IMGPREP1 state c3VjY2Vzcw==\n")
    with pytest.raises(OSError, match="not a socket"):
        SocketChannel(path, ChannelParser()).poll()


def test_reads_messages_and_is_bounded_per_poll(listener: tuple[Path, socket.socket]) -> None:
    path, server = listener
    parser = ChannelParser()
    channel = SocketChannel(path, parser, max_per_poll=4 * READ_CHUNK)
    assert channel.connect()
    guest, _ = server.accept()
    guest.setblocking(False)
    flood = b"A" * (16 * READ_CHUNK)  # more than one poll takes
    sent = 0
    while sent < len(flood):
        try:
            sent += guest.send(flood[sent:])
        except BlockingIOError:
            assert channel.poll() <= 4 * READ_CHUNK
            assert parser.buffered <= MAX_LINE
    guest.setblocking(True)
    guest.sendall(b"\n" + line("state", "running") + line("state", "success"))
    guest.close()
    while channel.poll():
        assert parser.buffered <= MAX_LINE
    assert parser.status.seen_states == ["running", "success"]
    assert channel.bytes_read == len(flood) + 1 + len(line("state", "running")) + len(line("state", "success"))
    assert parser.dropped_lines == 1


def test_the_prepare_boot_serial_port_is_a_unix_socket_not_a_file(tmp_path: Path) -> None:
    xml = "<domain type='qemu'><name>p</name><devices><serial type='pty'><target port='0'/></serial></devices></domain>"
    live, port = prepare_xml(xml, tmp_path / "ch.sock")
    assert port == 1
    assert '<serial type="unix"><source mode="bind" path="' + str(tmp_path / "ch.sock") + '" />' in live
    assert 'type="file"' not in live
