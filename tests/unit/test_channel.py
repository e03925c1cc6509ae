"""The guest -> host channel: IMGPREP1 lines, however the bytes arrive, and the boot report."""

from __future__ import annotations

import base64

import pytest

from imgprep.channel import MAX_FIELD, MAX_LINE, MAX_MESSAGES_PER_FEED, ChannelParser, parse_report


def line(kind: str, text: str) -> bytes:
    return f"IMGPREP1 {kind} {base64.b64encode(text.encode()).decode()}\n".encode()


REPORT = "\n".join(
    [
        "unit=imgprep-prepare.service",
        "initrd_us=0",
        "userspace_us=1523456",
        "unit_start_us=20100000",
        "script_start_us=20250000",
        "script_end_us=23000000",
        "finish_us=23400000",
        "script_exit=0",
        "services=systemd-journald.service systemd-udevd.service",
        "late_services=",
        "targets=local-fs.target=active sysinit.target=inactive multi-user.target=inactive",
    ]
)


def test_a_full_conversation() -> None:
    parser = ChannelParser()
    stream = (
        line("state", "running")
        + line("log", "removed ssh host keys\n")
        + line("error", "operator script exited with status 3\nboom")
        + line("report", REPORT)
        + line("state", "error")
    )
    messages = parser.feed(stream)
    assert [kind for kind, _ in messages] == ["state", "log", "error", "report", "state"]
    status = parser.status
    assert status.state == "error"
    assert status.seen_states == ["running", "error"]
    assert status.error == "operator script exited with status 3\nboom"
    assert status.log == "removed ssh host keys\n"
    assert status.report is not None
    assert status.report["script_exit"] == 0


def test_lines_split_across_feeds_byte_by_byte() -> None:
    parser = ChannelParser()
    stream = line("state", "running") + line("log", "a" * 300) + line("state", "success")
    collected = []
    for i in range(len(stream)):
        collected.extend(parser.feed(stream[i : i + 1]))
    assert collected == [("state", "running"), ("log", "a" * 300), ("state", "success")]
    assert parser.status.seen_states == ["running", "success"]


def test_an_incomplete_line_waits_for_its_newline() -> None:
    parser = ChannelParser()
    whole = line("state", "success")
    assert parser.feed(whole[:-1]) == []
    assert parser.status.state is None
    assert parser.feed(b"\n") == [("state", "success")]
    assert parser.status.state == "success"


def test_junk_is_ignored() -> None:
    parser = ChannelParser()
    stream = (
        b"[   20.123456] systemd[1]: Starting imgprep...\r\n"
        + b"\x00\x00garbage \xff\xfe bytes\n"
        + b"IMGPREP1 state\n"  # too few fields
        + b"IMGPREP1 state cnVubmluZw== extra\n"  # too many fields
        + b"IMGPREP2 state cnVubmluZw==\n"  # other magic
        + b"\n"
        + line("state", "running")
    )
    assert parser.feed(stream) == [("state", "running")]
    assert parser.status.seen_states == ["running"]


def test_console_noise_before_the_magic_and_crlf_are_tolerated() -> None:
    parser = ChannelParser()
    noisy = b"\x1b[0mconsole: " + line("state", "running").rstrip(b"\n") + b"\r\n"
    assert parser.feed(noisy) == [("state", "running")]


@pytest.mark.parametrize("payload", [b"not*base64!", b"cnVubmluZw", b"cnVu bmluZw=="])
def test_bad_base64_is_skipped_and_parsing_continues(payload: bytes) -> None:
    parser = ChannelParser()
    messages = parser.feed(b"IMGPREP1 state " + payload + b"\n" + line("state", "success"))
    assert messages == [("state", "success")]
    assert parser.status.seen_states == ["success"]


def test_unknown_states_and_kinds_are_returned_but_do_not_change_the_status() -> None:
    parser = ChannelParser()
    messages = parser.feed(line("state", "exploded") + line("weather", "sunny"))
    assert messages == [("state", "exploded"), ("weather", "sunny")]
    assert parser.status.state is None
    assert parser.status.seen_states == []


def test_parse_report_types_and_timeline() -> None:
    report = parse_report(REPORT)
    assert report["unit"] == "imgprep-prepare.service"
    assert report["userspace_us"] == 1523456
    assert report["script_exit"] == 0
    assert report["services"] == ["systemd-journald.service", "systemd-udevd.service"]
    assert report["late_services"] == []
    assert report["targets"] == {
        "local-fs.target": "active",
        "sysinit.target": "inactive",
        "multi-user.target": "inactive",
    }
    assert report["timeline_ms"] == {
        "kernel_to_userspace": 1523.5,
        "unit_start": 20100.0,
        "script_start": 20250.0,
        "script_end": 23000.0,
        "finish": 23400.0,
    }


def test_parse_report_tolerates_missing_and_bad_values() -> None:
    report = parse_report("unit_start_us=\nscript_exit=oops\nno separator line\nfinish_us=0\nextra=a=b")
    assert report["unit_start_us"] is None
    assert report["script_exit"] is None
    assert report["finish_us"] == 0
    assert "extra" not in report  # keys the runner does not send are not stored
    assert "no separator line" not in report
    assert report["timeline_ms"] == {
        "kernel_to_userspace": None,
        "unit_start": None,
        "script_start": None,
        "script_end": None,
        "finish": None,  # zero means "not measured"
    }


# --- a hostile guest: floods are bounded by size and count ----------------------------


def test_a_line_without_newline_never_grows_the_buffer_past_its_cap() -> None:
    parser = ChannelParser()
    chunk = b"A" * (1024 * 1024)
    peak = 0
    for _ in range(100):  # 100 MiB without a newline
        parser.feed(chunk)
        peak = max(peak, parser.buffered)
    assert peak <= MAX_LINE
    # the over-long line is dropped whole, and the channel works again after its newline
    assert parser.feed(b"tail of the long line\n" + line("state", "running")) == [("state", "running")]
    assert parser.buffered == 0
    assert parser.dropped_lines == 1


def test_an_over_long_line_split_across_feeds_is_dropped_not_parsed() -> None:
    parser = ChannelParser()
    long = line("log", "x" * MAX_LINE)
    assert len(long) > MAX_LINE
    assert parser.feed(long[: MAX_LINE // 2]) == []
    assert parser.feed(long[MAX_LINE // 2 :]) == []
    assert parser.status.log is None
    # control: a line just under the cap is parsed
    ok = line("log", "y" * (MAX_LINE // 2))
    assert [k for k, _ in parser.feed(ok)] == ["log"]


def test_a_million_bare_newlines_produce_nothing_and_keep_no_buffer() -> None:
    parser = ChannelParser()
    assert parser.feed(b"\n" * 1_000_000) == []
    assert parser.buffered == 0
    assert parser.feed(b"\r\n" * 1000 + line("state", "running")) == [("state", "running")]


def test_repeated_states_are_ignored_and_the_first_result_is_final() -> None:
    parser = ChannelParser()
    flood = line("state", "running") * 100_000
    messages = parser.feed(flood)
    assert len(messages) <= MAX_MESSAGES_PER_FEED
    assert parser.status.seen_states == ["running"]
    parser.feed(line("state", "success") + line("state", "error") + line("state", "running") * 10)
    assert parser.status.state == "success"
    assert parser.status.seen_states == ["running", "success"]


def test_stored_fields_are_capped() -> None:
    parser = ChannelParser()
    big = "z" * (MAX_LINE // 2)  # fits in a line, far more than a field holds
    assert len(big) > MAX_FIELD
    parser.feed(line("log", big) + line("error", big) + line("report", "unit=" + big))
    assert parser.status.log is not None
    assert parser.status.error is not None
    assert len(parser.status.log) < MAX_FIELD + 64
    assert len(parser.status.error) < MAX_FIELD + 64
    assert parser.status.log.endswith("characters cut]")
    assert parser.status.report is not None
    assert len(parser.status.report["unit"]) < MAX_FIELD + 64


def test_messages_interleaved_with_a_flood_are_still_read() -> None:
    parser = ChannelParser()
    stream = b"\n" * 10_000 + b"B" * (3 * MAX_LINE) + b"\n" + line("state", "running") + b"\n" * 10_000
    stream += line("state", "success")
    seen = []
    for i in range(0, len(stream), 4096):
        seen.extend(parser.feed(stream[i : i + 4096]))
        assert parser.buffered <= MAX_LINE
    assert seen == [("state", "running"), ("state", "success")]


def test_a_huge_integer_in_the_report_is_no_crash() -> None:
    report = parse_report("script_exit=" + "9" * 5000)
    assert report["script_exit"] is None
