"""The guest -> host channel: ``IMGPREP1 <kind> <base64>`` lines on a serial port.

Kinds: ``state`` (running | success | error), ``error`` (detail, sent before the
state), ``log`` (tail of the operator script's output), ``report`` (the boot report,
``key=value`` lines), ``verify`` (the verification boot's report, ``key=value``
lines: imgprep.verify parses it). Anything else on the port is ignored.
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
    verify: str | None = None  # the verification report, raw (capped); the first one counts
    seen_states: list[str] = dataclasses.field(default_factory=list)


_INT_KEYS = {
    "initrd_us",
    "userspace_us",
    "unit_start_us",
    "exec_start_us",
    "script_start_us",
    "script_end_us",
    "sync_start_us",
    "clean_us",
    "finish_us",
    "script_exit",
}
_LIST_KEYS = {"services", "late_services"}
# short words: the unit's name, how the guest powered off, whose clock the times are on
_TEXT_KEYS = {"unit", "poweroff", "clock", "zone_boot_time"}
_TEXT_MAX = 256


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
        elif key in _TEXT_KEYS:
            report[key] = value[:_TEXT_MAX]
        # any other key is the guest's invention: not stored

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


# Bounds on what a guest can make the host hold. The runner sends at most
# TAIL_LINES lines of TAIL_LINE_CHARS characters (a few KiB of base64); the caps
# leave ample room for that and none for a flood.
MAX_LINE = 64 * 1024  # bytes of one IMGPREP1 line; longer lines are dropped whole
MAX_FIELD = 16 * 1024  # characters kept of error, log and the report text
MAX_MESSAGES_PER_FEED = 64  # messages returned by one feed() (the status holds the rest)
TERMINAL = ("success", "error")


def cap_field(text: str) -> str:
    """``text`` cut to ``MAX_FIELD`` characters, saying how much was cut."""
    if len(text) <= MAX_FIELD:
        return text
    return text[:MAX_FIELD] + f"... [{len(text) - MAX_FIELD} characters cut]"


class ChannelParser:
    """Feed raw bytes as they arrive; read the accumulated ``status``.

    Linear in the bytes fed, and bounded whatever the guest writes: the partial
    line held between feeds never exceeds ``MAX_LINE`` (a longer line is skipped
    up to its newline), every stored field is capped at ``MAX_FIELD``, a state
    equal to the current one is ignored and the first terminal state is final,
    so ``seen_states`` holds at most two entries.
    """

    def __init__(self) -> None:
        self.status = GuestStatus()
        self._buffer = bytearray()
        self._skipping = False  # inside a line already longer than MAX_LINE
        self.dropped_lines = 0  # over-long lines skipped (for diagnostics)

    @property
    def buffered(self) -> int:
        """Bytes of the incomplete line held (at most ``MAX_LINE``)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        """Consume bytes; return the complete messages decoded from them."""
        messages: list[tuple[str, str]] = []
        view = memoryview(data)
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            if self._skipping:
                self._skipping = False
            elif len(self._buffer) + (nl - pos) > MAX_LINE:
                self.dropped_lines += 1
            elif nl > pos or self._buffer:
                self._buffer += view[pos:nl]
                message = self._line(bytes(self._buffer))
                if message is not None and len(messages) < MAX_MESSAGES_PER_FEED:
                    messages.append(message)
            self._buffer.clear()
            pos = nl + 1
        rest = len(data) - pos
        if rest and not self._skipping:
            if len(self._buffer) + rest > MAX_LINE:
                self._buffer.clear()
                self._skipping = True
                self.dropped_lines += 1
            else:
                self._buffer += view[pos:]
        return messages

    def _line(self, raw: bytes) -> tuple[str, str] | None:
        start = raw.find(MAGIC.encode() + b" ")
        if start < 0:
            return None
        line = raw[start:].decode("ascii", errors="replace").rstrip("\r\x00 ")
        parts = line.split(" ")
        if len(parts) != 3:
            return None
        _, kind, payload = parts
        try:
            text = base64.b64decode(payload, validate=True).decode(errors="replace")
        except (binascii.Error, ValueError):
            return None
        text = cap_field(text)
        self._apply(kind, text)
        return kind, text

    def _apply(self, kind: str, text: str) -> None:
        if kind == "state" and text in STATES:
            if self.status.state in TERMINAL or self.status.state == text:
                return  # repeated, or after the result: ignored (no event flood)
            self.status.state = text
            self.status.seen_states.append(text)
        elif kind == "error":
            self.status.error = text
        elif kind == "log":
            self.status.log = text
        elif kind == "report":
            self.status.report = parse_report(text)
        elif kind == "verify" and self.status.verify is None:
            self.status.verify = text
