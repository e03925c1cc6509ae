"""What IMGAPI accepts for an image's file, checked after the export.

IMGAPI (Triton's image API, and so ``imgadm`` and ``sdc-imgadm import``) takes one file
per image, at most 20 GiB, with ``compression`` one of none, gzip, bzip2 or xz.
imgprep writes one file, and its compressions map onto those names: gzip and xz as
themselves, zstd as a qcow2 file whose clusters are zstd-compressed, recorded as
``compression: none`` and ``format: qcow2`` (the file is not decompressed as a whole;
a reader needs a qemu-img with zstd support, QEMU 5.1 or later). That is what IMGAPI
accepts, so ``--strict`` does not refuse zstd: only the size limit (and, as a guard,
the compression name and the file count) can be exceeded.

An export over a limit is a warning, or under ``--strict`` (``strict: true``) an error:
the job fails and its output is discarded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MAX_FILE_BYTES = 20 * 1024**3
COMPRESSIONS = ("none", "gzip", "bzip2", "xz")
MAX_FILES = 1


def violations(files: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each way ``files`` (manifest ``files[]`` entries) exceeds what IMGAPI accepts."""
    problems: list[str] = []
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files: IMGAPI takes {MAX_FILES} file per image")
    for entry in files:
        size = entry.get("size")
        if isinstance(size, int) and size > MAX_FILE_BYTES:
            problems.append(
                f"the image file is {size / 1024**3:.1f} GiB ({size} bytes): IMGAPI accepts at most "
                f"{MAX_FILE_BYTES // 1024**3} GiB ({MAX_FILE_BYTES} bytes); a stronger compression may fit"
            )
        compression = entry.get("compression")
        if compression not in COMPRESSIONS:
            problems.append(f"compression {compression!r}: IMGAPI accepts {', '.join(COMPRESSIONS)}")
    return problems
