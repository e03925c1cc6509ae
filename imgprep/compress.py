"""Stream compression on every core, hashed in the same pass.

gzip and xz (the compressions IMGAPI and Triton's ``imgadm`` read) are compressed by
a parallel compressor in a child process: ``pigz`` for gzip, ``xz -T0`` for xz, both at
level 6 (their default, and what imgprep used before). Their output is an ordinary
gzip member / .xz stream (xz: one block per thread's chunk), read by any gzip / xz.

Data flows into the compressor's stdin: from a file it reads itself (``compress_file``,
the libvirt export's flattened raw disk: no copy through Python) or from ``write()``
(the SmartOS ``zfs send`` stream). A reader thread takes its stdout, hashes it (sha1
for IMGAPI, sha256), counts it and writes it to the target file. One pass. The child
runs under ``setpriv --pdeathsig KILL``: if imgprep dies, so does the compressor (as
for ``qemu-img``: nothing writes on behind the back of ``imgprep jobs recover``);
``abort()`` (or dropping the writer) kills it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from imgprep.errors import Cancelled, CommandError, ImgprepError
from imgprep.run import Cancellable

log = logging.getLogger(__name__)
CHUNK = 4 * 1024 * 1024
STREAM_COMPRESSIONS = ("none", "gzip", "xz")
LEVEL = 6


def compressor_command(compression: str, threads: int = 0) -> list[str]:
    """The bare compressor (stdin -> stdout) for ``compression``; ``threads`` 0: every core."""
    if compression == "gzip":
        return ["pigz", f"-{LEVEL}", "-n", "-c", "-p", str(threads or os.cpu_count() or 1)]
    if compression == "xz":
        return ["xz", f"-{LEVEL}", f"-T{threads}", "-c", "-q"]
    raise ValueError(f"no compressor for {compression!r}")


def check_compressor(compression: str) -> None:
    """Raise a one-line error if the compressor for ``compression`` is not installed."""
    if compression in ("gzip", "xz"):
        program = compressor_command(compression)[0]
        if shutil.which(program) is None:
            raise ImgprepError(f"{program} is not installed (needed for --compression {compression})", code="Config")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class _Sink:
    """Hashes, counts and writes the compressed bytes (the reader thread's only state:
    it must not hold the writer, or a dropped writer would never be collected)."""

    def __init__(self, target: BinaryIO) -> None:
        self.target = target
        self.sha1 = hashlib.sha1(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None

    def take(self, data: bytes) -> None:
        self.sha1.update(data)
        self.sha256.update(data)
        self.size += len(data)
        self.target.write(data)


def _drain(proc: subprocess.Popen[bytes], sink: _Sink) -> None:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        while data := os.read(fd, CHUNK):
            sink.take(data)
    except BaseException as exc:  # reported by write()/finish() in the caller's thread
        sink.error = exc
        _kill(proc)


class CompressingWriter:
    """Compress (gzip | xz | none) what is written and hash the *compressed* bytes.

    The libvirt backend feeds it a raw disk, the SmartOS backend a ``zfs send`` stream
    arriving over SSH. ``finish()`` returns the size, sha1 and sha256 of what reached
    ``target`` (what IMGAPI's ``files[0]`` describes). Use it from one thread, the one
    that lives until ``finish()`` (the child's parent-death signal follows that thread).
    """

    def __init__(self, target: BinaryIO, compression: str, *, threads: int = 0, source: BinaryIO | None = None) -> None:
        """``source``: a file the compressor reads itself, as its stdin (then no ``write()``)."""
        if compression not in STREAM_COMPRESSIONS:
            raise ValueError(f"stream compression must be one of {STREAM_COMPRESSIONS}, got {compression!r}")
        self._sink = _Sink(target)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._command: list[str] = []
        if compression == "none":
            return
        check_compressor(compression)
        self._command = compressor_command(compression, threads)
        cmd = ["setpriv", "--pdeathsig", "KILL", "--", *self._command]
        log.debug("run: %s", shlex.join(cmd))
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by finish/abort)
        stdin: Any = source if source is not None else subprocess.PIPE
        self._proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=self._stderr)
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        self._reader = threading.Thread(
            target=_drain, args=(self._proc, self._sink), name="compress-reader", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int | None:
        """The compressor's process id (None for ``none``)."""
        return self._proc.pid if self._proc is not None else None

    def _failure(self) -> Exception:
        assert self._proc is not None
        code = self._proc.wait()
        self._stderr.seek(0)
        stderr = self._stderr.read(4096).decode(errors="replace")
        if self._sink.error is not None:
            return ImgprepError(f"writing the compressed image failed: {self._sink.error}", code="ExportFailed")
        return CommandError(self._command, code, "", stderr)

    def wait(self, timeout: float) -> bool:
        """With ``source``: True once the compressor has exited (read all, or failed)."""
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def input_position(self) -> int | None:
        """With ``source``: how far the compressor has read it (its stdin's file offset)."""
        if self._proc is None:
            return None
        try:
            text = Path(f"/proc/{self._proc.pid}/fdinfo/0").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("pos:"):
                return int(line.split()[1])
        return None

    def write(self, data: bytes) -> None:
        if self._proc is None:
            self._sink.take(data)
            return
        if self._proc.stdin is None:
            raise ValueError("this writer's compressor reads its source file itself")
        try:
            self._proc.stdin.write(data)
        except BrokenPipeError:
            self.abort()
            raise self._failure() from None

    def finish(self) -> tuple[int, str, str]:
        """Flush the compressor; (size, sha1, sha256) of the compressed output."""
        if self._proc is not None:
            assert self._reader is not None
            if self._proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self._proc.stdin.close()
            self._reader.join()
            code = self._proc.wait()
            if code != 0 or self._sink.error is not None:
                error = self._failure()
                self._stderr.close()
                raise error
            self._stderr.close()
            self._finalizer.detach()
        self._sink.target.flush()
        return self._sink.size, self._sink.sha1.hexdigest(), self._sink.sha256.hexdigest()

    def abort(self) -> None:
        """Kill the compressor (cancel, or an error upstream); the output is garbage."""
        if self._proc is None:
            return
        _kill(self._proc)
        if self._proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
        if self._reader is not None:
            self._reader.join()


def compress_file(
    source: Path,
    target: BinaryIO,
    compression: str,
    *,
    progress: Callable[[float], None] = lambda _fraction: None,
    cancel: Cancellable | None = None,
    threads: int = 0,
    poll: float = 0.5,
) -> tuple[int, str, str]:
    """Compress a file (e.g. a flattened raw disk) into ``target``; (size, sha1, sha256).

    The compressor reads ``source`` itself (no copy through Python): imgprep only hashes
    and writes its output, and follows its read offset for ``progress`` (0..1)."""
    total = max(source.stat().st_size, 1)
    with source.open("rb") as src:
        if compression == "none":
            writer = CompressingWriter(target, compression)
            done = 0
            while chunk := src.read(CHUNK):
                writer.write(chunk)
                done += len(chunk)
                progress(done / total)
                if cancel is not None and cancel.is_set:
                    raise Cancelled("export canceled")
            return writer.finish()
        writer = CompressingWriter(target, compression, threads=threads, source=src)
        try:
            while True:
                exited = writer.wait(poll)
                position = total if exited else writer.input_position()
                if position is not None:
                    progress(min(position / total, 1.0))
                if cancel is not None and cancel.is_set:  # also when it has just finished
                    raise Cancelled("export canceled")
                if exited:
                    break
            return writer.finish()
        except BaseException:
            writer.abort()
            raise
