"""Export: a small real qcow2 (made with qemu-img) flattened, compressed and checksummed."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from imgprep.errors import Cancelled, CommandError
from imgprep.export import CompressingWriter, ExportResult, export_disk, output_name
from imgprep.outputfiles import output_dir_problem
from tests.capabilities import requires

pytestmark = pytest.mark.allow_subprocess("qemu-img", "setpriv")  # export runs qemu-img under setpriv --pdeathsig

IMAGE_UUID = "5f1b7d1e-3c1a-4b7a-9a57-1a2b3c4d5e6f"
MiB = 1024 * 1024


def qemu_img(*args: str) -> str:
    return subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=True
    ).stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A 3 MiB disk: random data, a zero hole and a text marker; as qcow2, with its raw bytes."""
    requires("qemu-img", "setpriv")
    work = tmp_path_factory.mktemp("src")
    rng = random.Random(109)
    raw = rng.randbytes(MiB) + bytes(MiB) + b"imgprep marker\n" * 100
    raw += bytes(3 * MiB - len(raw))
    (work / "disk.raw").write_bytes(raw)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(work / "disk.raw"), str(work / "disk.qcow2"))
    return work / "disk.qcow2", raw


def digests(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    return hashlib.sha1(data, usedforsecurity=False).hexdigest(), hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("compression", "fmt", "file_compression"),
    [("none", "qcow2", "none"), ("zstd", "qcow2", "none"), ("gzip", "raw", "gzip"), ("xz", "raw", "xz")],
)
def test_export_checksums_sizes_and_content(
    source: tuple[Path, bytes], tmp_path: Path, compression: str, fmt: str, file_compression: str
) -> None:
    disk, raw = source
    out = tmp_path / "out"
    out.mkdir()
    progress: list[float] = []
    result = export_disk(disk, "qcow2", out, IMAGE_UUID, compression, progress=progress.append)
    assert result.path == out / output_name(IMAGE_UUID, compression)
    assert sorted(p.name for p in out.iterdir()) == [result.path.name]  # no .partial left behind
    sha1, sha256 = digests(result.path)
    assert (result.sha1, result.sha256, result.size) == (sha1, sha256, result.path.stat().st_size)
    assert (result.format, result.compression) == (fmt, file_compression)
    assert result.file_info() == {
        "sha1": sha1,
        "sha256": sha256,
        "size": result.size,
        "compression": file_compression,
        "format": fmt,
    }
    assert progress[-1] == 100.0
    assert all(0.0 <= p <= 100.0 for p in progress)
    assert progress == sorted(progress)
    if compression == "gzip":
        assert gzip.decompress(result.path.read_bytes()) == raw
    elif compression == "xz":
        assert lzma.decompress(result.path.read_bytes()) == raw
    else:
        info = json.loads(qemu_img("info", "--output=json", str(result.path)))
        assert info["format"] == "qcow2"
        assert "backing-filename" not in info  # flattened
        expected_type = "zstd" if compression == "zstd" else "zlib"
        assert info["format-specific"]["data"]["compression-type"] == expected_type
        back = tmp_path / "back.raw"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", str(result.path), str(back))
        assert back.read_bytes() == raw


@pytest.mark.allow_subprocess("qemu-io")
def test_export_flattens_a_backing_chain(source: tuple[Path, bytes], tmp_path: Path) -> None:
    disk, raw = source
    requires("qemu-io")
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(disk), str(overlay))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 65536", str(overlay)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=True,
    )
    out = tmp_path / "out"
    out.mkdir()
    result = export_disk(overlay, "qcow2", out, IMAGE_UUID, "gzip")
    assert gzip.decompress(result.path.read_bytes()) == b"\x5a" * 65536 + raw[65536:]


def test_bad_source_leaves_nothing_behind(tmp_path: Path) -> None:
    requires("qemu-img", "setpriv")
    bad = tmp_path / "not-a.qcow2"
    bad.write_bytes(b"this is not a qcow2 image" * 100)
    out = tmp_path / "out"
    out.mkdir()
    for compression in ("zstd", "gzip"):
        with pytest.raises(CommandError) as info:
            export_disk(bad, "qcow2", out, IMAGE_UUID, compression)
        assert info.value.cmd[:3] == ["qemu-img", "convert", "-p"]
        assert info.value.returncode != 0
        assert info.value.stderr
        assert list(out.iterdir()) == []


def test_missing_source_is_a_command_error(tmp_path: Path) -> None:
    requires("qemu-img", "setpriv")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CommandError):
        export_disk(tmp_path / "missing.qcow2", "qcow2", out, IMAGE_UUID, "xz")
    assert list(out.iterdir()) == []


class CancelDuringCompression:
    """Set once the compression half of the export has started (progress above 50 %)."""

    def __init__(self) -> None:
        self.progress: list[float] = []

    def __call__(self, pct: float) -> None:
        self.progress.append(pct)

    @property
    def is_set(self) -> bool:
        return any(p > 50.0 for p in self.progress)


def test_cancel_during_compression_leaves_nothing_behind(source: tuple[Path, bytes], tmp_path: Path) -> None:
    disk, _ = source
    out = tmp_path / "out"
    out.mkdir()
    cancel = CancelDuringCompression()
    with pytest.raises(Cancelled):  # the one cancel error (exit 130, record canceled), not InterruptedError
        export_disk(disk, "qcow2", out, IMAGE_UUID, "xz", progress=cancel, cancel=cancel)
    assert list(out.iterdir()) == []
    assert any(p > 50.0 for p in cancel.progress)  # it was canceled in the compression half


class CancelAtOnce:
    is_set = True


class NeverCancel:
    is_set = False


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_cancel_during_qemu_img_convert_is_cancelled(
    source: tuple[Path, bytes], tmp_path: Path, compression: str
) -> None:
    disk, _ = source
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Cancelled):
        export_disk(disk, "qcow2", out, IMAGE_UUID, compression, cancel=CancelAtOnce())
    assert list(out.iterdir()) == []
    # control: the same export without a cancel succeeds
    assert export_disk(disk, "qcow2", out, IMAGE_UUID, compression, cancel=NeverCancel()).path.exists()


def test_output_names() -> None:
    assert output_name("u", "zstd") == "u.qcow2"
    assert output_name("u", "none") == "u.qcow2"
    assert output_name("u", "gzip") == "u.raw.gz"
    assert output_name("u", "xz") == "u.raw.xz"


@pytest.mark.parametrize("compression", ["none", "gzip", "xz"])
def test_compressing_writer_hashes_what_it_writes(compression: str) -> None:
    data = random.Random(7).randbytes(200_000) + bytes(100_000)
    target = io.BytesIO()
    writer = CompressingWriter(target, compression)
    for i in range(0, len(data), 65536):
        writer.write(data[i : i + 65536])
    size, sha1, sha256 = writer.finish()
    written = target.getvalue()
    assert size == len(written)
    assert sha1 == hashlib.sha1(written, usedforsecurity=False).hexdigest()
    assert sha256 == hashlib.sha256(written).hexdigest()
    decompressors: dict[str, Callable[[bytes], bytes]] = {"none": bytes, "gzip": gzip.decompress, "xz": lzma.decompress}
    decompress = decompressors[compression]
    assert decompress(written) == data


def test_compressing_writer_refuses_unknown_compression() -> None:
    with pytest.raises(ValueError, match="zstd"):
        CompressingWriter(io.BytesIO(), "zstd")


def test_export_result_is_frozen() -> None:
    result = ExportResult(Path("/x"), 1, "a", "b", "none", "qcow2")
    with pytest.raises(AttributeError):
        result.size = 2  # type: ignore[misc]


# --- other local users: planted names and shared directories ------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_planted_symlinks_at_the_output_names_are_never_followed(
    source: tuple[Path, bytes], tmp_path: Path, compression: str
) -> None:
    disk, _ = source
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    dest = out / output_name(IMAGE_UUID, compression)
    planted = [
        out / f".{dest.name}.partial",  # the names earlier versions wrote to
        out / f".{IMAGE_UUID}.raw.partial",
        dest,
    ]
    for link in planted:
        link.symlink_to(victim)
    result = export_disk(disk, "qcow2", out, IMAGE_UUID, compression)
    assert victim.read_bytes() == b"root's file\n"
    assert result.path == dest
    assert not dest.is_symlink()  # the planted link was replaced, not written through
    assert dest.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in planted)  # no work directory left


def test_files_are_private_until_complete(source: tuple[Path, bytes], tmp_path: Path) -> None:
    disk, _ = source
    out = tmp_path / "out"
    out.mkdir()
    modes: list[int] = []

    def progress(_pct: float) -> None:
        for work in out.glob(f".{IMAGE_UUID}.work-*"):
            modes.append(work.stat().st_mode & 0o777)
            modes.extend(f.stat().st_mode & 0o777 for f in work.iterdir())

    export_disk(disk, "qcow2", out, IMAGE_UUID, "gzip", progress=progress)
    assert modes  # the work directory and its files were seen during the export
    assert set(modes) <= {0o700, 0o600}


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775, 0o757])
def test_an_output_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    problem = output_dir_problem(shared)
    assert problem is not None
    assert "writable by its group or others" in problem
    # control: the same directory, private again
    shared.chmod(0o755)
    assert output_dir_problem(shared) is None
