"""Benchmark: imgprep's gzip/xz export pipeline against the bare compressor on the same bytes.

For each compression, the same raw bytes (a flattened disk, or a slice of one) go
through:

* ``imgprep``: ``imgprep.compress.compress_file`` as the export uses it: the parallel
  compressor (``pigz`` / ``xz -T0``) reads the raw file itself, a reader thread hashes
  (sha1 + sha256) and writes its output file, then fsync;
* ``bare``: the same compressor command alone, raw file on stdin, output to a file;
* ``python``: for the record, the single-threaded stdlib compressor at the same level
  (what imgprep used before).

Throughput is raw MB / wall-clock seconds; the ratio is imgprep's over bare's (goal
>= 0.9). Run alone (``python -m benchmarks.compress_throughput RAW``) or from
``benchmarks.early_vs_legacy`` on the prototype's flattened disk.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imgprep.compress import CHUNK, LEVEL, compress_file, compressor_command

MB = 1_000_000


def _imgprep(raw: Path, out: Path, compression: str) -> float:
    t0 = time.monotonic()
    with out.open("wb") as f:
        compress_file(raw, f, compression)
        f.flush()
        os.fsync(f.fileno())
    return time.monotonic() - t0


def _bare(raw: Path, out: Path, compression: str) -> float:
    t0 = time.monotonic()
    with raw.open("rb") as source, out.open("wb") as f:
        subprocess.run(compressor_command(compression), stdin=source, stdout=f, check=True)
        os.fsync(f.fileno())
    return time.monotonic() - t0


def _python(raw: Path, out: Path, compression: str) -> float:
    t0 = time.monotonic()
    with raw.open("rb") as source, out.open("wb") as f:
        if compression == "gzip":
            packer: Any = gzip.GzipFile(fileobj=f, mode="wb", compresslevel=LEVEL, mtime=0)
        else:
            packer = lzma.LZMAFile(f, mode="wb", preset=LEVEL)  # noqa: SIM115 (closed by the with below)
        with packer:
            while chunk := source.read(CHUNK):
                packer.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return time.monotonic() - t0


def slice_of(source: Path, megabytes: int, workdir: Path) -> Path:
    """The first ``megabytes`` MB of ``source`` that are not all zeros, as a file (the sample)."""
    sample = workdir / "sample.raw"
    want = megabytes * MB
    zero = bytes(CHUNK)
    with source.open("rb") as src, sample.open("wb") as dst:
        while want > 0 and (chunk := src.read(CHUNK)):
            if chunk != zero[: len(chunk)]:
                dst.write(chunk[:want])
                want -= min(len(chunk), want)
    return sample


def measure(
    raw: Path, compressions: tuple[str, ...] = ("gzip", "xz"), *, python: bool = True, repeat: int = 3
) -> dict[str, Any]:
    """Every compression's wall-clock seconds and MB/s per pipeline (medians of ``repeat``
    rounds, the pipelines alternating within each round, so that a change in the host's
    load hits them alike), and imgprep / bare."""
    size = raw.stat().st_size
    results: dict[str, Any] = {"raw_bytes": size, "cores": os.cpu_count(), "repeat": repeat, "compressions": {}}
    with tempfile.TemporaryDirectory(dir=raw.parent, prefix=".compress-bench-") as tmp:
        for compression in compressions:
            row: dict[str, Any] = {"command": compressor_command(compression)}
            pipelines = [("bare", _bare), ("imgprep", _imgprep)] + ([("python", _python)] if python else [])
            seconds: dict[str, list[float]] = {name: [] for name, _ in pipelines}
            for _ in range(repeat):
                for name, fn in pipelines:
                    out = Path(tmp) / f"{name}.{compression}"
                    seconds[name].append(fn(raw, out, compression))
                    row[f"{name}_out_bytes"] = out.stat().st_size
                    out.unlink()
            for name, values in seconds.items():
                mid = statistics.median(values)
                row[f"{name}_s"] = round(mid, 3)
                row[f"{name}_all_s"] = [round(v, 3) for v in values]
                row[f"{name}_mbps"] = round(size / MB / mid, 2) if mid > 0 else None
            row["imgprep_vs_bare"] = round(row["imgprep_mbps"] / row["bare_mbps"], 3) if row.get("bare_mbps") else None
            if python and row.get("python_mbps"):
                row["imgprep_vs_python"] = round(row["imgprep_mbps"] / row["python_mbps"], 2)
            results["compressions"][compression] = row
    return results


def markdown_table(results: Mapping[str, Any]) -> str:
    lines = [
        f"Raw bytes: {results['raw_bytes'] / MB:.0f} MB, {results['cores']} cores; medians of "
        f"{results.get('repeat', 1)} alternating rounds.",
        "",
        "| Compression | bare compressor | imgprep (compress + sha1/sha256 + write) | imgprep / bare "
        "| single-threaded Python (before) |",
        "|---|---:|---:|---:|---:|",
    ]
    for compression, row in results["compressions"].items():
        python = f"{row['python_mbps']:.1f} MB/s" if row.get("python_mbps") else "n/a"
        ratio = row.get("imgprep_vs_bare")
        lines.append(
            f"| {compression} (`{' '.join(row['command'][:3])}`) | {row['bare_mbps']:.1f} MB/s "
            f"| {row['imgprep_mbps']:.1f} MB/s | {'n/a' if ratio is None else f'{ratio:.2f}'} | {python} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compress_throughput", description=__doc__.splitlines()[0]
    )
    parser.add_argument("raw", type=Path, help="a raw disk image (or any file) to compress")
    parser.add_argument("--sample-mb", type=int, default=0, help="use only this many MB of non-zero data (0: all)")
    parser.add_argument("--no-python", action="store_true", help="skip the single-threaded stdlib comparison")
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds; the medians are reported")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        raw = slice_of(args.raw, args.sample_mb, Path(tmp)) if args.sample_mb else args.raw
        results = measure(raw, python=not args.no_python, repeat=args.repeat)
    print(json.dumps(results, indent=1, sort_keys=True) if args.json else markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
