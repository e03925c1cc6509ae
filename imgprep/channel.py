"""The guest -> host channel: ``IMGPREP1 <kind> <base64>`` lines on a serial port.

Kinds: ``state`` (running | success | error), ``error`` (detail, sent before the
state), ``log`` (tail of the operator script's output), ``report`` (the boot report,
``key=value`` lines). Anything else on the port is ignored.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Any

MAGIC = "IMGPREP1"
STATES = ("running", "success", "error")


@dataclasses.dataclass
class GuestStatus:
    state: str | None = None
    error: str | None = None
    log: str | None = None
    report: dict[str, Any] | None = None
    seen_states: list[str] = dataclasses.field(default_factory=list)


_INT_KEYS = {
    "initrd_us",
    "userspace_us",
    "unit_start_us",
    "script_start_us",
    "script_end_us",
    "finish_us",
    "script_exit",
}
_LIST_KEYS = {"services", "late_services"}


def parse_report(text: str) -> dict[str, Any]:
    """``key=value`` lines -> a typed dict, with derived millisecond timings."""
    report: dict[str, Any] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key in _INT_KEYS:
            try:
                report[key] = int(value)
            except ValueError:
                report[key] = None
        elif key in _LIST_KEYS:
            report[key] = value.split()
        elif key == "targets":
            report[key] = dict(item.partition("=")[::2] for item in value.split())
        else:
            report[key] = value

    # systemd's 0 means "not recorded"; a zone's report counts whole seconds since the
    # zone booted (clock=zone), where 0 is a time
    least = 0 if report.get("clock") == "zone" else 1

    def ms(key: str) -> float | None:
        value = report.get(key)
        return round(value / 1000, 1) if isinstance(value, int) and value >= least else None

    report["timeline_ms"] = {
        "kernel_to_userspace": ms("userspace_us"),
        "unit_start": ms("unit_start_us"),
        "script_start": ms("script_start_us"),
        "script_end": ms("script_end_us"),
        "finish": ms("finish_us"),
    }
    return report


class ChannelParser:
    """Feed raw bytes as they arrive; read the accumulated ``status``."""

    def __init__(self) -> None:
        self.status = GuestStatus()
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        """Consume bytes; return the complete messages decoded from them."""
        self._buffer += data
        messages: list[tuple[str, str]] = []
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            line = raw.decode("ascii", errors="replace").strip("\r\x00 ")
            start = line.find(MAGIC + " ")
            if start < 0:
                continue
            parts = line[start:].split(" ")
            if len(parts) != 3:
                continue
            _, kind, payload = parts
            try:
                text = base64.b64decode(payload, validate=True).decode(errors="replace")
            except (binascii.Error, ValueError):
                continue
            self._apply(kind, text)
            messages.append((kind, text))
        return messages

    def _apply(self, kind: str, text: str) -> None:
        if kind == "state" and text in STATES:
            self.status.state = text
            self.status.seen_states.append(text)
        elif kind == "error":
            self.status.error = text
        elif kind == "log":
            self.status.log = text
        elif kind == "report":
            self.status.report = parse_report(text)
