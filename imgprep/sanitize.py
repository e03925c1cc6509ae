"""Guest-derived text made safe to print or log: no control characters reach a terminal.

Everything from inside a guest (its error, log tail, boot report, ZFS user
properties, metadata) may carry escape sequences that rewrite the operator's
screen (``\\x1b[2K\\r``) or newlines that forge log lines. ``clean`` keeps the
text readable and makes every such byte visible: C0/C1 controls and DEL become
``\\xNN`` escapes, a backslash becomes ``\\\\`` (so an escape cannot be faked),
and newlines become ``\\n`` unless the caller keeps them (``multiline=True``,
for a log tail printed as an indented block, where each line is cleaned).
"""

from __future__ import annotations

import re

MAX_TEXT = 16 * 1024  # characters printed of one guest-derived string

# C0 controls, DEL, C1 controls, and the Unicode line/paragraph separators and
# bidi overrides that can reorder what a terminal shows
_UNSAFE = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\u202a-\\u202e\\u2066-\\u2069\\\\]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: object, *, multiline: bool = False, limit: int = MAX_TEXT) -> str:
    """``text`` (any value: it is str()-ed) with every control character escaped."""
    s = text if isinstance(text, str) else str(text)
    cut = ""
    if len(s) > limit:
        cut = f"... [{len(s) - limit} characters cut]"
        s = s[:limit]
    if multiline:
        return "\n".join(_UNSAFE.sub(_escape, line) for line in s.split("\n")) + cut
    return _UNSAFE.sub(_escape, s) + cut
