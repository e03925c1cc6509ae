"""Export a powered-off disk: flatten, compress, checksum (sha1 for IMGAPI, and sha256).

* ``zstd`` (default) and ``none``: ``qemu-img convert`` to a flattened qcow2
  (``<uuid>.qcow2``), with zstd-compressed clusters for ``zstd``. The file is used as
  is, so the manifest says ``compression: none`` and ``format: qcow2``. qemu-img must
  seek in its output, so the checksum is a second read of the freshly written file.
* ``gzip`` and ``xz``: a flattened raw image, stream-compressed on every core
  (``pigz`` / ``xz -T0``, ``imgprep.compress``) and hashed in the same pass
  (``<uuid>.raw.gz`` / ``<uuid>.raw.xz``).

Output is written, mode 0600, in a private temporary directory inside the output
directory (outputfiles.py) and renamed into place when complete, so a crashed
export never leaves a file that looks finished and no other user can plant a name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from imgprep.compress import STREAM_COMPRESSIONS, CompressingWriter, compress_file
from imgprep.errors import ImgprepError
from imgprep.outputfiles import create_private, publish, workdir
from imgprep.run import Cancellable, run, stream

__all__ = ["STREAM_COMPRESSIONS", "CompressingWriter", "ExportResult", "export_disk", "output_name"]

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


def _compress_stream(
    raw: Path,
    dest: Path,
    compression: str,
    progress: Callable[[float], None],
    cancel: Cancellable | None,
) -> tuple[int, str, str]:
    with os.fdopen(create_private(dest), "wb") as out:
        result = compress_file(
            raw, out, compression, progress=lambda fraction: progress(50.0 + 50.0 * fraction), cancel=cancel
        )
        out.flush()
        os.fsync(out.fileno())
    return result


def export_need(source: Path, compression: str) -> int:
    """Bytes the export of ``source`` may take in the output directory, from what the
    disk holds now (``qemu-img measure``: its allocated data, backing chain included;
    internal snapshots not counted, the export does not carry them). gzip and xz hold
    the sparse raw copy and the compressed file at once: twice that."""
    out = run(["qemu-img", "measure", "--force-share", "--output=json", "-O", "qcow2", str(source)]).stdout
    try:
        required = int(json.loads(out)["required"])
    except (ValueError, KeyError, TypeError):
        raise ImgprepError(f"qemu-img measure {source}: unexpected output", code="CommandFailed") from None
    return required if compression in ("zstd", "none") else 2 * required


def export_disk(
    source: Path,
    source_format: str,
    output_dir: Path,
    image_uuid: str,
    compression: str,
    *,
    progress: Callable[[float], None] = lambda _pct: None,
    cancel: Cancellable | None = None,
    keep_raw: Path | None = None,
) -> ExportResult:
    """``keep_raw`` (gzip/xz): where the flattened raw file that is compressed and hashed
    is written and left (the verification boots it); by default it is a temporary file."""
    dest = output_dir / output_name(image_uuid, compression)
    with workdir(output_dir, image_uuid) as tmp:
        partial = tmp / dest.name
        raw_tmp = keep_raw or tmp / f"{image_uuid}.raw"
        result = _export(
            source, source_format, partial, raw_tmp, compression=compression, progress=progress, cancel=cancel
        )
        publish(partial, dest)
    progress(100.0)
    return dataclasses.replace(result, path=dest)


def _export(
    source: Path,
    source_format: str,
    partial: Path,
    raw_tmp: Path,
    *,
    compression: str,
    progress: Callable[[float], None],
    cancel: Cancellable | None,
) -> ExportResult:
    if compression in ("zstd", "none"):
        os.close(create_private(partial))  # qemu-img keeps the mode of a file it truncates
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
        os.close(create_private(raw_tmp))
        _qemu_img_convert(["-f", source_format, "-O", "raw", str(source), str(raw_tmp)], progress, cancel, 0.5)
        size, sha1, sha256 = _compress_stream(raw_tmp, partial, compression, progress, cancel)
        fmt, file_compression = "raw", compression
    return ExportResult(partial, size, sha1, sha256, file_compression, fmt)
