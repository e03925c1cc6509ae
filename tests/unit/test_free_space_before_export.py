"""Free space is checked again before export, against what the disk holds after the
prepare boot (a guest can fill its disk with incompressible data during that boot).

libvirt: a real qcow2 (qemu-img, qemu-io), measured with ``qemu-img measure``; the
output filesystem's size is faked (``shutil.disk_usage``), the export itself and the
leftover check are replaced. The SmartOS backend's check is tested against the
compute-node simulator (tests/smartos/test_free_space.py).
"""

from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path
from typing import Any

import pytest

import imgprep.backends.libvirt as libvirt_backend
from imgprep.backends.libvirt import LibvirtBackend
from imgprep.errors import ImgprepError
from imgprep.export import export_need
from tests.capabilities import requires

pytestmark = pytest.mark.allow_subprocess("qemu-img", "qemu-io", "setpriv")

MiB = 1024 * 1024
IMAGE_UUID = "5f1b7d1e-3c1a-4b7a-9a57-1a2b3c4d5e6f"


def _run(*argv: str) -> None:
    subprocess.run(list(argv), capture_output=True, stdin=subprocess.DEVNULL, timeout=60, check=True)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A 1 GiB qcow2 holding 1 MiB, with an internal snapshot (the checkpoint)."""
    requires("qemu-img", "qemu-io")
    path = tmp_path / "disk.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", str(path))
    _run("qemu-img", "snapshot", "-c", "imgprep-pre-prepare-0", str(path))
    return path


def fill(path: Path, mib: int) -> None:
    """What the guest does during the prepare boot: write ``mib`` MiB of data."""
    _run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 256M {mib}M", str(path))


def fake_free(monkeypatch: pytest.MonkeyPatch, output_dir: Path, free: int) -> None:
    real = shutil.disk_usage

    def disk_usage(path: Any) -> Any:
        if Path(path) == output_dir:
            return types.SimpleNamespace(total=free * 2, used=free, free=free)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def backend(disk: Path, output_dir: Path, compression: str) -> LibvirtBackend:
    """A libvirt backend at its export step: the disk, the request, nothing else."""
    b = LibvirtBackend.__new__(LibvirtBackend)
    b.capture = types.SimpleNamespace(disks=lambda: [(disk, "qcow2")], check=lambda: None)  # type: ignore[assignment]
    b.request = types.SimpleNamespace(  # type: ignore[assignment]
        output_dir=output_dir, compression=compression, image_uuid=IMAGE_UUID, verify=False
    )
    b.config = types.SimpleNamespace(libguestfs_tcg=True)  # type: ignore[assignment]
    b.engine = types.SimpleNamespace(cancel=types.SimpleNamespace(check=lambda: None))  # type: ignore[assignment]
    b.state = types.SimpleNamespace(injected=[], export_seconds=None)  # type: ignore[assignment]
    return b


@pytest.fixture
def at_export(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    exported: list[Path] = []
    monkeypatch.setattr(libvirt_backend, "check_clean", lambda *a, **k: None)
    monkeypatch.setattr(libvirt_backend, "export_disk", lambda source, *a, **k: exported.append(source))
    return exported


def test_export_need_measures_what_the_disk_holds_now(disk: Path) -> None:
    before = export_need(disk, "zstd")
    fill(disk, 64)
    after = export_need(disk, "zstd")
    assert before < 4 * MiB  # 1 MiB of data (the snapshot's copy is not exported)
    assert 64 * MiB <= after - before < 66 * MiB
    assert export_need(disk, "gzip") == 2 * after  # the sparse raw copy and the compressed file


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_a_disk_filled_during_the_prepare_boot_fails_before_export(
    disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_export: list[Path], compression: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fake_free(monkeypatch, out, 48 * MiB)
    b = backend(disk, out, compression)
    problems: list[str] = []
    b.check_free_space(export_need(disk, compression), problems)
    assert problems == []  # validation: the disk held 1 MiB
    fill(disk, 64)

    with pytest.raises(ImgprepError) as exc:
        b.export()

    assert exc.value.code == "InsufficientSpace"
    assert "not enough free space" in exc.value.message
    assert "after the prepare boot" in exc.value.message
    assert at_export == []  # nothing was exported


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_control_the_same_disk_exports_when_it_fits(
    disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_export: list[Path], compression: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fake_free(monkeypatch, out, 256 * MiB)
    b = backend(disk, out, compression)
    fill(disk, 64)

    b.export()

    assert at_export == [disk]
