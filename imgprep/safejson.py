"""One bounded JSON loader for every untrusted document (API bodies, guest reports).

``json.loads`` on hostile input can raise ``RecursionError`` (``[[[[...``), spend
quadratic time converting a huge integer literal, or build an object far larger
than its text. ``loads`` checks the size first, refuses numbers with too many
digits while parsing, and measures the nesting depth before returning; every
failure is a ``BadJSON`` (a ``ValueError``) with a one-line message.
"""

from __future__ import annotations

import json
from typing import Any

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_DIGITS = 64


class BadJSON(ValueError):
    """The document is not JSON imgprep accepts; the message says why."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise BadJSON(f"a number has more than {MAX_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_DIGITS:
        raise BadJSON(f"a number has more than {MAX_DIGITS} characters")
    return float(text)


def _parse_constant(name: str) -> Any:
    raise BadJSON(f"{name} is not JSON")


def _depth_ok(text: str, max_depth: int) -> bool:
    """Nesting of [ and { outside strings, in one linear scan, before parsing."""
    depth = 0
    in_string = False
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def loads(data: str | bytes, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data`` within the bounds, or raise ``BadJSON``."""
    if len(data) > max_bytes:
        raise BadJSON(f"the document is larger than {max_bytes} bytes")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadJSON("the document is not UTF-8") from None
    else:
        text = data
    if not _depth_ok(text, max_depth):
        raise BadJSON(f"the document nests deeper than {max_depth} levels")
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except BadJSON:
        raise
    except (ValueError, RecursionError) as e:
        raise BadJSON(f"not valid JSON: {str(e).splitlines()[0][:200]}") from None
