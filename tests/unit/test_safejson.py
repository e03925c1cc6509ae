"""The bounded JSON loader: every hostile document is a BadJSON, never a crash."""

from __future__ import annotations

import json

import pytest

from imgprep.safejson import MAX_DEPTH, BadJSON, loads


@pytest.mark.parametrize(
    "doc",
    [
        "9" * 5000,
        '{"a": ' + "1" * 5000 + "}",
        "[" * 100_000,
        '{"a":' * 10_000,
        "1." + "0" * 5000,
        "NaN",
        '{"a": Infinity}',
        b"\xff\xfe{}",
        "{",
    ],
)
def test_hostile_documents_are_refused(doc: str | bytes) -> None:
    with pytest.raises(BadJSON):
        loads(doc)


def test_size_limit() -> None:
    with pytest.raises(BadJSON, match="larger than"):
        loads('"' + "a" * 100 + '"', max_bytes=50)


def test_the_plain_library_fails_differently_on_the_same_input() -> None:
    # control: without the bounds, deep nesting is a RecursionError, not a ValueError
    with pytest.raises(RecursionError):
        json.loads("[" * 100_000)


def test_documents_within_the_bounds_parse() -> None:
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads(nested) is not None
    assert loads('{"s": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"", "n": -12, "f": 1.5}') == {
        "s": "[" * 49 + '"',
        "n": -12,
        "f": 1.5,
    }
    with pytest.raises(BadJSON, match="deeper"):
        loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))


def test_a_guest_error_nested_without_end_is_text_not_a_crash() -> None:
    from imgprep.backends.smartos.backend import parse_guest_error

    message, tail = parse_guest_error("[" * 100_000)
    assert message is not None
    assert message.startswith("[[[")
    assert len(message) < 20_000  # capped
    assert tail is None
    # control: imgprep's own JSON error is still read as JSON
    assert parse_guest_error('{"message": "boom", "output_tail": "a\\nb"}') == ("boom; last output: a | b", "a\nb")
