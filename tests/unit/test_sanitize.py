"""Guest text cannot rewrite the operator's terminal or forge log lines."""

from __future__ import annotations

from imgprep.sanitize import MAX_TEXT, clean


def test_an_escape_sequence_cannot_rewrite_the_screen() -> None:
    hostile = "\x1b[2K\rimgprep: job succeeded"
    out = clean(hostile)
    assert "\x1b" not in out
    assert "\r" not in out
    assert out == "\\x1b[2K\\rimgprep: job succeeded"


def test_forged_newlines_stay_on_one_line() -> None:
    out = clean("boom\nimgprep: job 1234 succeeded\r\n")
    assert "\n" not in out
    assert out == "boom\\nimgprep: job 1234 succeeded\\r\\n"


def test_multiline_keeps_lines_but_cleans_each() -> None:
    out = clean("line one\n\x1b]0;title\x07line two", multiline=True)
    assert out.split("\n") == ["line one", "\\x1b]0;title\\x07line two"]


def test_c1_controls_bidi_and_a_literal_backslash_are_escaped() -> None:
    out = clean("\x9b31m \u202e \\x1b")
    assert out == "\\x9b31m \\u202e \\\\x1b"  # the guest cannot fake one of our escapes


def test_plain_text_is_unchanged() -> None:
    text = "operator script exited with status 3: Größe überschritten; tab\tok"
    assert clean(text) == text.replace("\t", "\\t")


def test_long_text_is_cut() -> None:
    out = clean("a" * (MAX_TEXT + 100))
    assert out.startswith("a" * MAX_TEXT)
    assert out.endswith("[100 characters cut]")
