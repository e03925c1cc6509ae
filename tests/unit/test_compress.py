"""imgprep.compress: the parallel compressors for real (pigz, xz -T0), their hashes,
their failures, and that the child never outlives imgprep or a dropped writer."""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import json
import lzma
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imgprep.compress import CompressingWriter, compress_file, compressor_command
from imgprep.errors import Cancelled, CommandError, ImgprepError

pytestmark = pytest.mark.allow_subprocess("setpriv")

DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {"none": bytes, "gzip": gzip.decompress, "xz": lzma.decompress}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("compression", ["none", "gzip", "xz"])
def test_round_trip_and_hashes_of_the_written_bytes(compression: str) -> None:
    data = random.Random(3).randbytes(3_000_000) + bytes(2_000_000)
    target = io.BytesIO()
    writer = CompressingWriter(target, compression)
    for i in range(0, len(data), 1 << 20):
        writer.write(data[i : i + (1 << 20)])
    size, sha1, sha256 = writer.finish()
    written = target.getvalue()
    assert size == len(written)
    assert sha1 == hashlib.sha1(written, usedforsecurity=False).hexdigest()
    assert sha256 == hashlib.sha256(written).hexdigest()
    assert DECOMPRESS[compression](written) == data
    if compression != "none":
        assert size < len(data)


@pytest.mark.allow_subprocess("xz")
def test_xz_uses_threads_one_block_per_chunk(tmp_path: Path) -> None:
    # threaded xz cuts its input into blocks (3 x the dictionary, 24 MiB at -6), and
    # single-threaded xz writes one block: the block count shows which mode ran
    data = bytes(60 << 20)
    out = tmp_path / "zeros.xz"
    with out.open("wb") as f:
        writer = CompressingWriter(f, "xz", threads=2)
        for i in range(0, len(data), 4 << 20):
            writer.write(data[i : i + (4 << 20)])
        writer.finish()
    listing = subprocess.run(
        ["xz", "--robot", "--list", str(out)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    blocks = int(next(line for line in listing.splitlines() if line.startswith("totals")).split("\t")[2])
    assert blocks == 3
    assert lzma.decompress(out.read_bytes()) == data


def test_commands_use_every_core() -> None:
    assert compressor_command("xz")[:3] == ["xz", "-6", "-T0"]
    gz = compressor_command("gzip")
    assert gz[0] == "pigz"
    assert gz[gz.index("-p") + 1] == str(os.cpu_count())
    with pytest.raises(ValueError, match="zstd"):
        compressor_command("zstd")


def test_a_compressor_that_dies_is_an_error() -> None:
    writer = CompressingWriter(io.BytesIO(), "gzip")
    writer.write(b"x" * 1000)
    assert writer.pid is not None
    os.kill(writer.pid, signal.SIGKILL)
    assert wait_gone(writer.pid)

    def write_on_and_finish() -> None:
        for _ in range(100):  # the pipe breaks on a write, or finish() sees the status
            writer.write(b"y" * 65536)
        writer.finish()

    with pytest.raises(CommandError) as info:
        write_on_and_finish()
    assert info.value.returncode != 0


def test_abort_kills_the_compressor() -> None:
    writer = CompressingWriter(io.BytesIO(), "xz")
    writer.write(b"partial")
    pid = writer.pid
    assert pid is not None
    assert alive(pid)  # control: running before the abort
    writer.abort()
    assert wait_gone(pid)


def test_a_dropped_writer_kills_the_compressor() -> None:
    writer = CompressingWriter(io.BytesIO(), "gzip")
    writer.write(b"partial")
    pid = writer.pid
    assert pid is not None
    assert alive(pid)
    del writer
    gc.collect()
    assert wait_gone(pid)


CHILD = """
import io, json, os, sys, time
from imgprep.compress import CompressingWriter
writer = CompressingWriter(io.BytesIO(), sys.argv[1])
writer.write(b"some data")
print(json.dumps(writer.pid), flush=True)
time.sleep(600)
"""


@pytest.mark.allow_subprocess("python3", "python")
@pytest.mark.parametrize("compression", ["gzip", "xz"])
def test_the_compressor_dies_with_imgprep(compression: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, compression], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        pid = json.loads(proc.stdout.readline())
        assert alive(pid)  # control: the compressor runs while imgprep does
        proc.kill()
        proc.wait(timeout=30)
        assert wait_gone(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_missing_compressor_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImgprepError, match="pigz is not installed"):
        CompressingWriter(io.BytesIO(), "gzip")


@pytest.mark.parametrize("compression", ["none", "gzip", "xz"])
def test_compress_file_round_trip_with_progress(compression: str, tmp_path: Path) -> None:
    data = random.Random(5).randbytes(2_000_000) + bytes(3_000_000)
    source = tmp_path / "disk.raw"
    source.write_bytes(data)
    seen: list[float] = []
    target = io.BytesIO()
    size, sha1, sha256 = compress_file(source, target, compression, progress=seen.append, poll=0.01)
    written = target.getvalue()
    assert (size, sha1, sha256) == (
        len(written),
        hashlib.sha1(written, usedforsecurity=False).hexdigest(),
        hashlib.sha256(written).hexdigest(),
    )
    assert DECOMPRESS[compression](written) == data
    assert seen == sorted(seen)
    assert seen[-1] == 1.0


class CancelAt:
    """Canceled once any progress has been reported."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    @property
    def is_set(self) -> bool:
        return bool(self.seen)


def test_compress_file_cancel_stops_the_export(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(random.Random(9).randbytes(4_000_000))
    cancel = CancelAt()
    with pytest.raises(Cancelled):
        compress_file(source, io.BytesIO(), "xz", progress=cancel.seen.append, cancel=cancel, poll=0.01)
    assert cancel.seen  # control: it got as far as reporting progress
