"""Export a powered-off disk: flatten, compress, checksum (sha1 for IMGAPI, and sha256).

* ``zstd`` (default) and ``none``: ``qemu-img convert`` to a flattened qcow2
  (``<uuid>.qcow2``), with zstd-compressed clusters for ``zstd``. The file is used as
  is, so the manifest says ``compression: none`` and ``format: qcow2``. qemu-img must
  seek in its output, so the checksum is a second read of the freshly written file.
* ``gzip`` and ``xz``: a flattened raw image, stream-compressed and hashed in the
  same pass (``<uuid>.raw.gz`` / ``<uuid>.raw.xz``).

Output is written to a hidden temporary name and renamed when complete, so a
crashed export never leaves a file that looks finished.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import lzma
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO, cast

from imgprep.errors import Cancelled
from imgprep.run import Cancellable, stream

log = logging.getLogger(__name__)
CHUNK = 4 * 1024 * 1024
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    size: int
    sha1: str
    sha256: str
    compression: str  # as IMGAPI means it: how the file must be decompressed
    format: str  # qcow2 | raw
    seconds_convert: float = 0.0

    def file_info(self) -> dict[str, object]:
        return {
            "sha1": self.sha1,
            "sha256": self.sha256,
            "size": self.size,
            "compression": self.compression,
            "format": self.format,
        }


def output_name(image_uuid: str, compression: str) -> str:
    return {
        "zstd": f"{image_uuid}.qcow2",
        "none": f"{image_uuid}.qcow2",
        "gzip": f"{image_uuid}.raw.gz",
        "xz": f"{image_uuid}.raw.xz",
    }[compression]


def _qemu_img_convert(
    args: list[str],
    progress: Callable[[float], None],
    cancel: Cancellable | None,
    share: float,
) -> None:
    """Run ``qemu-img convert -p``, forwarding its percentage (scaled to ``share``).

    A cancel terminates it and raises Cancelled; it dies with imgprep (``stream``)."""
    buffer = b""

    def on_stdout(data: bytes) -> None:
        nonlocal buffer
        buffer = (buffer + data)[-256:]
        for match in _PROGRESS.finditer(buffer):
            progress(float(match.group(1)) * share)
        buffer = buffer[buffer.rfind(b"\r") + 1 :]

    stream(["qemu-img", "convert", "-p", *args], on_stdout, cancel=cancel)


def _hash_file(path: Path) -> tuple[str, str]:
    sha1, sha256 = hashlib.sha1(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


class _HashingWriter:
    """A file-like sink that hashes and counts what the compressor writes."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.sha1 = hashlib.sha1(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha1.update(data)
        self.sha256.update(data)
        self.size += len(data)
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()


STREAM_COMPRESSIONS = ("none", "gzip", "xz")


class CompressingWriter:
    """Compress (gzip | xz | none) what is written and hash the *compressed* bytes.

    One pass, no temporary file: the libvirt backend feeds it a raw disk, the SmartOS
    backend a ``zfs send`` stream arriving over SSH. ``finish()`` returns the size,
    sha1 and sha256 of what reached ``target`` (what IMGAPI's ``files[0]`` describes).
    """

    def __init__(self, target: BinaryIO, compression: str) -> None:
        if compression not in STREAM_COMPRESSIONS:
            raise ValueError(f"stream compression must be one of {STREAM_COMPRESSIONS}, got {compression!r}")
        self._sink = _HashingWriter(target)
        self._compressor: gzip.GzipFile | lzma.LZMAFile | None = None
        if compression == "gzip":
            self._compressor = gzip.GzipFile(fileobj=cast(IO[bytes], self._sink), mode="wb", compresslevel=6, mtime=0)
        elif compression == "xz":
            self._compressor = lzma.LZMAFile(cast(IO[bytes], self._sink), mode="wb", preset=6)  # noqa: SIM115 (closed by finish)

    def write(self, data: bytes) -> None:
        if self._compressor is None:
            self._sink.write(data)
        else:
            self._compressor.write(data)

    def finish(self) -> tuple[int, str, str]:
        """Flush the compressor; (size, sha1, sha256) of the compressed output."""
        if self._compressor is not None:
            self._compressor.close()
        self._sink.flush()
        return self._sink.size, self._sink.sha1.hexdigest(), self._sink.sha256.hexdigest()


def _compress_stream(
    raw: Path,
    dest: Path,
    compression: str,
    progress: Callable[[float], None],
    cancel: Cancellable | None,
) -> tuple[int, str, str]:
    total = max(raw.stat().st_size, 1)
    done = 0
    with raw.open("rb") as source, dest.open("wb") as out:
        writer = CompressingWriter(out, compression)
        while chunk := source.read(CHUNK):
            writer.write(chunk)
            done += len(chunk)
            progress(50.0 + 50.0 * done / total)
            if cancel is not None and cancel.is_set:
                raise Cancelled("export canceled")
        result = writer.finish()
        out.flush()
        os.fsync(out.fileno())
    return result


def export_disk(
    source: Path,
    source_format: str,
    output_dir: Path,
    image_uuid: str,
    compression: str,
    *,
    progress: Callable[[float], None] = lambda _pct: None,
    cancel: Cancellable | None = None,
) -> ExportResult:
    dest = output_dir / output_name(image_uuid, compression)
    partial = output_dir / f".{dest.name}.partial"
    raw_tmp = output_dir / f".{image_uuid}.raw.partial"
    try:
        if compression in ("zstd", "none"):
            opts = ["-c", "-o", "compression_type=zstd"] if compression == "zstd" else []
            _qemu_img_convert(
                ["-f", source_format, "-O", "qcow2", *opts, str(source), str(partial)],
                progress,
                cancel,
                1.0,
            )
            with partial.open("rb+") as f:
                os.fsync(f.fileno())
            sha1, sha256 = _hash_file(partial)
            size = partial.stat().st_size
            fmt, file_compression = "qcow2", "none"
        else:
            _qemu_img_convert(["-f", source_format, "-O", "raw", str(source), str(raw_tmp)], progress, cancel, 0.5)
            size, sha1, sha256 = _compress_stream(raw_tmp, partial, compression, progress, cancel)
            fmt, file_compression = "raw", compression
        partial.rename(dest)
        progress(100.0)
    finally:
        for leftover in (partial, raw_tmp):
            leftover.unlink(missing_ok=True)
    return ExportResult(dest, size, sha1, sha256, file_compression, fmt)
