"""ZFS on the compute node: the job's marked snapshots, and the image stream.

Every snapshot a job makes carries the user property ``imgprep:job=<job uuid>``, so
cleanup never destroys a snapshot it did not make.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from imgprep.backends.smartos.node import Node
from imgprep.errors import CommandError, ImgprepError
from imgprep.export import CompressingWriter, ExportResult
from imgprep.outputfiles import create_private, publish, workdir

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "imgprep-pre-prepare-"
FINAL_SNAPNAME = "final"  # what imgadm names the image snapshot (origins of incremental images need it)
JOB_PROPERTY = "imgprep:job"  # ZFS user property marking the snapshots a job made
FILE_SUFFIX = {"none": ".zfs", "gzip": ".zfs.gz", "xz": ".zfs.xz"}
_SEND_SIZE_RE = re.compile(r"^size\s+(\d+)\s*$", re.MULTILINE)


def snapshots(node: Node, dataset: str) -> dict[str, str]:
    """Snapshots of ``dataset``: short name -> value of imgprep:job (``-`` if unset)."""
    out = node.run(["zfs", "list", "-H", "-t", "snapshot", "-o", f"name,{JOB_PROPERTY}", "-d", "1", dataset])
    snaps: dict[str, str] = {}
    for line in out.stdout.splitlines():
        name, _, job = line.partition("\t")
        if "@" in name:
            snaps[name.split("@", 1)[1]] = job.strip() or "-"
    return snaps


def snapshot(node: Node, full_name: str, job_uuid: str) -> None:
    node.run(["zfs", "snapshot", "-o", f"{JOB_PROPERTY}={job_uuid}", full_name])


def ours(snaps: dict[str, str], name: str, job_uuid: str) -> bool:
    """Whether snapshot ``name`` exists and job ``job_uuid`` made it; refuses a foreign one."""
    if name not in snaps:
        return False
    if snaps[name] != job_uuid:
        raise ImgprepError(
            f"snapshot @{name} exists but was not made by this job ({JOB_PROPERTY}={snaps[name]}); leaving it alone",
            code="SnapshotConflict",
        )
    return True


def send_size(node: Node, snap: str) -> int:
    """``zfs send -nP``'s estimate of the stream size (the progress bar, the free-space
    check before export); 0 if the node gives none."""
    try:
        out = node.run(["zfs", "send", "-nP", snap]).stdout
    except CommandError as exc:
        log.debug("no send size estimate: %s", exc)
        return 0
    match = _SEND_SIZE_RE.search(out)
    return int(match.group(1)) if match else 0


def receive(
    node: Node,
    snap: str,
    dest: Path,
    compression: str,
    *,
    image_uuid: str,
    estimate: int | None = None,
    check_cancel: Callable[[], None],
    progress: Callable[[float], None],
) -> tuple[ExportResult, int]:
    """``zfs send`` of ``snap`` streamed back, compressed and hashed on the fly, into
    ``dest`` (a new 0600 file in a private directory beside it, renamed into place when
    complete); (result, stream bytes). ``estimate``: ``send_size`` if already asked."""
    estimate = send_size(node, snap) if estimate is None else estimate
    with workdir(dest.parent, image_uuid) as tmp:
        partial = tmp / dest.name
        size, sha1, sha256, received = _receive(
            node,
            snap,
            partial,
            compression=compression,
            estimate=estimate,
            check_cancel=check_cancel,
            progress=progress,
        )
        publish(partial, dest)
    progress(100.0)
    return ExportResult(dest, size, sha1, sha256, compression, "zfs"), received


def _receive(
    node: Node,
    snap: str,
    partial: Path,
    *,
    compression: str,
    estimate: int,
    check_cancel: Callable[[], None],
    progress: Callable[[float], None],
) -> tuple[int, str, str, int]:
    received = 0
    last = -1
    with os.fdopen(create_private(partial), "wb") as f:
        writer = CompressingWriter(f, compression)

        def sink(data: bytes) -> None:
            nonlocal received, last
            check_cancel()
            writer.write(data)
            received += len(data)
            pct = min(99.0, 100.0 * received / estimate) if estimate else 0.0
            if int(pct) != last:
                last = int(pct)
                progress(round(pct, 1))

        node.run_stream(["zfs", "send", snap], sink)
        size, sha1, sha256 = writer.finish()
        f.flush()
        os.fsync(f.fileno())
    return size, sha1, sha256, received
