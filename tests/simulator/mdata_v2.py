"""The host side of Triton's metadata protocol, Version 2, for simulated HVM guests.

After "Triton SmartOS Metadata Protocol Specification (Version 2)" (the document the
mdata-client tools implement). An HVM guest (bhyve, kvm) reaches it over its second
serial port; here that port is any byte stream: a QEMU ``-chardev socket`` (unix
socket), or one end of a pty in the tests.

* Before negotiation (Version 1 style lines): ``"\\n"`` -> ``"invalid command\\n"``,
  ``"NEGOTIATE V2\\n"`` -> ``"V2_OK\\n"``, anything else -> ``"invalid command\\n"``.
* A Version 2 frame: ``"V2 <body length> <crc32 of body, 8 hex> <body>\\n"``, the body
  ``"<request id> <code>[ <base64 payload>]"``. Each well-formed request gets one
  response frame with the same request id. A frame whose length or checksum does not
  match its body gets no answer (the client times out and retries, as mdata-client does).
* Operations: ``GET`` (``sdc:`` keys from ``internal_metadata`` and the VM's own fields,
  others from ``customer_metadata``; ``NOTFOUND`` when absent), ``KEYS`` (customer keys,
  linefeed-separated), ``PUT`` (payload: base64(key) SP base64(value); ``sdc:`` keys are
  read-only: ``FAILURE``), ``DELETE``. Unknown codes: ``FAILURE``.

The guest is hostile: a line longer than :data:`MAX_LINE` is discarded, a PUT larger than
:data:`MAX_VALUE` fails, every decode error is a ``FAILURE`` (or silence for a broken
frame), never an exception out of :meth:`MetadataV2.serve`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import socket
import threading
import zlib
from collections.abc import Callable, MutableMapping
from pathlib import Path

log = logging.getLogger(__name__)

MAX_LINE = 1024 * 1024  # a request line longer than this is discarded
MAX_VALUE = 256 * 1024  # a PUT value larger than this is refused
SDC_PREFIX = "sdc:"


def crc32_hex(body: bytes) -> str:
    """The body checksum as the protocol writes it: CRC32 (polynomial 0xEDB88320), 8 hex digits."""
    return f"{zlib.crc32(body) & 0xFFFFFFFF:08x}"


def frame(request_id: str, code: str, payload: bytes | None = None) -> bytes:
    """One Version 2 frame, terminating linefeed included."""
    body = f"{request_id} {code}".encode()
    if payload is not None:
        body += b" " + base64.b64encode(payload)
    return b"V2 %d %s %s\n" % (len(body), crc32_hex(body).encode(), body)


def parse_frame(line: bytes) -> tuple[str, str, bytes | None] | None:
    """(request id, code, decoded payload) of one frame without its linefeed; None if it is
    not a valid frame (bad prefix, length, checksum, request id or base64)."""
    parts = line.split(b" ", 3)
    if len(parts) != 4 or parts[0] != b"V2" or not parts[1].isdigit():
        return None
    length, checksum, body = int(parts[1]), parts[2].decode("ascii", "replace"), parts[3]
    if length != len(body) or checksum != crc32_hex(body):
        return None
    fields = body.split(b" ")
    if len(fields) not in (2, 3) or len(fields[0]) != 8:
        return None
    try:
        request_id = fields[0].decode("ascii")
        int(request_id, 16)
        code = fields[1].decode("ascii")
        payload = base64.b64decode(fields[2], validate=True) if len(fields) == 3 else None
    except (UnicodeDecodeError, ValueError, binascii.Error):
        return None
    return request_id, code, payload


class MetadataV2:
    """One guest's metadata service. ``customer`` and ``internal`` are the VM's
    ``customer_metadata``/``internal_metadata`` (what ``vmadm get`` shows), ``fields`` the
    ``sdc:`` fields (``sdc:uuid``...); ``on_change`` is called after every PUT/DELETE
    (the simulator persists the VM's metadata there)."""

    def __init__(
        self,
        customer: MutableMapping[str, str],
        internal: MutableMapping[str, str] | None = None,
        *,
        fields: MutableMapping[str, str] | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.customer = customer
        self.internal = internal if internal is not None else {}
        self.fields = fields if fields is not None else {}
        self.on_change = on_change
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []  # (code, key) of every request served

    # --- one line in, one line out ------------------------------------------------------

    def answer(self, line: bytes, negotiated: bool) -> tuple[bytes | None, bool]:
        """The response to one request line (without its linefeed) and the new negotiated flag."""
        line = line.rstrip(b"\r")
        if line.startswith(b"V2 "):
            parsed = parse_frame(line)
            if parsed is None:
                log.debug("mdata: dropping a malformed frame %r", line[:80])
                return None, negotiated
            request_id, code, payload = parsed
            return self._operation(request_id, code, payload), negotiated
        if line == b"NEGOTIATE V2":
            return b"V2_OK\n", True
        return b"invalid command\n", negotiated

    def _operation(self, request_id: str, code: str, payload: bytes | None) -> bytes:
        try:
            text = payload.decode() if payload is not None else ""
        except UnicodeDecodeError:
            return frame(request_id, "FAILURE", b"payload is not UTF-8")
        with self.lock:
            self.requests.append((code, text.split(" ", 1)[0] if code == "PUT" else text))
            if code == "GET":
                value = self._get(text)
                return frame(request_id, "NOTFOUND") if value is None else frame(request_id, "SUCCESS", value.encode())
            if code == "KEYS":
                return frame(request_id, "SUCCESS", "".join(f"{k}\n" for k in sorted(self.customer)).encode())
            if code == "PUT":
                return self._put(request_id, text)
            if code == "DELETE":
                if text.startswith(SDC_PREFIX):
                    return frame(request_id, "FAILURE", b"sdc: keys are read-only")
                self.customer.pop(text, None)
                self.on_change()
                return frame(request_id, "SUCCESS")
        return frame(request_id, "FAILURE", f"unknown operation {code[:32]}".encode())

    def _get(self, key: str) -> str | None:
        if key.startswith(SDC_PREFIX):
            name = key[len(SDC_PREFIX) :]
            value = self.internal.get(name)
            return value if value is not None else self.fields.get(name)
        return self.customer.get(key)

    def _put(self, request_id: str, text: str) -> bytes:
        parts = text.split(" ")
        if len(parts) != 2:
            return frame(request_id, "FAILURE", b"PUT wants base64(key) SP base64(value)")
        try:
            key = base64.b64decode(parts[0], validate=True).decode()
            value = base64.b64decode(parts[1], validate=True).decode()
        except (binascii.Error, ValueError):
            return frame(request_id, "FAILURE", b"PUT: bad base64 or not UTF-8")
        if not key or key.startswith(SDC_PREFIX):
            return frame(request_id, "FAILURE", b"that key cannot be written")
        if len(value) > MAX_VALUE:
            return frame(request_id, "FAILURE", b"value too large")
        self.customer[key] = value
        self.on_change()
        return frame(request_id, "SUCCESS")

    # --- over a stream ---------------------------------------------------------------------

    def serve(self, read: Callable[[int], bytes], write: Callable[[bytes], object]) -> None:
        """Answer requests until ``read`` returns b"" (the other end went away)."""
        negotiated = False
        buffer = b""
        while True:
            try:
                data = read(4096)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                response, negotiated = self.answer(line, negotiated)
                if response is not None:
                    try:
                        write(response)
                    except OSError:
                        return
            if len(buffer) > MAX_LINE:
                buffer = b""


class UnixSocketPort:
    """A serial port's host end as QEMU's ``-chardev socket,path=P`` (client) sees it: a
    unix socket the service listens on; each connection (one per QEMU run) is served."""

    def __init__(self, service: MetadataV2, path: Path) -> None:
        self.service = service
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(1)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                self.service.serve(conn.recv, conn.sendall)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self.path.unlink(missing_ok=True)
        self._thread.join(5)
