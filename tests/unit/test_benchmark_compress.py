"""benchmarks.compress_throughput on a small file: every pipeline writes the same bytes
(imgprep's pipeline is the bare compressor plus hashing), and the table renders."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from benchmarks import compress_throughput
from imgprep.compress import CHUNK


@pytest.mark.allow_subprocess("setpriv", "pigz")
def test_measure_gzip_on_a_small_file(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(random.Random(1).randbytes(500_000) + bytes(500_000))
    results = compress_throughput.measure(raw, ("gzip",), repeat=2)
    row = results["compressions"]["gzip"]
    assert row["bare_out_bytes"] == row["imgprep_out_bytes"]  # the same compressor, the same output
    assert len(row["bare_all_s"]) == len(row["imgprep_all_s"]) == 2
    assert row["imgprep_vs_bare"] == round(row["imgprep_mbps"] / row["bare_mbps"], 3)
    table = compress_throughput.markdown_table(results)
    assert "| gzip (`pigz -6 -n`) |" in table
    assert list(tmp_path.iterdir()) == [raw]  # no output left behind


def test_slice_skips_zero_chunks(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    chunk = CHUNK
    source.write_bytes(bytes(chunk) + b"\x01" * chunk + bytes(chunk) + b"\x02" * chunk)
    sample = compress_throughput.slice_of(source, 8, tmp_path)
    data = sample.read_bytes()
    assert data[:chunk] == b"\x01" * chunk
    assert set(data[chunk:]) == {2}
    assert len(data) == 8_000_000
