"""A view that ends under a step that reads it: the job fails with the view's end as
its cause, not the read error it caused (libvirt backend; the capture and the export
are fakes)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

import imgprep.backends.libvirt as libvirt_backend
from imgprep import pointintime as pit
from imgprep.backends.libvirt import LibvirtBackend
from imgprep.errors import TransientError


class Capture:
    """The clone capture's check: the view ends when ``end`` says so."""

    def __init__(self, ends_with: Exception | None = None) -> None:
        self.ended = False
        self.ends_with = ends_with or pit.PrototypeStopped("the prototype stopped during the job")
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        if self.ended:
            raise self.ends_with

    def disks(self) -> list[tuple[Path, str]]:
        return [(Path("/v/vda.overlay.qcow2"), "qcow2")]


def backend(capture: Capture, tmp_path: Path) -> LibvirtBackend:
    b = LibvirtBackend.__new__(LibvirtBackend)
    b.capture = capture  # type: ignore[assignment]
    b.request = types.SimpleNamespace(  # type: ignore[assignment]
        output_dir=tmp_path, compression="zstd", image_uuid="5f1b7d1e-3c1a-4b7a-9a57-1a2b3c4d5e6f", verify=False
    )
    b.config = types.SimpleNamespace(libguestfs_tcg=True)  # type: ignore[assignment]
    b.engine = types.SimpleNamespace(cancel=types.SimpleNamespace(check=lambda: None))  # type: ignore[assignment]
    b.state = types.SimpleNamespace(injected=[], export_seconds=None)  # type: ignore[assignment]
    return b


@pytest.fixture
def export_reads_the_view(monkeypatch: pytest.MonkeyPatch) -> Capture:
    """The export's qemu-img fails because the view went while it read it."""
    capture = Capture()
    monkeypatch.setattr(libvirt_backend, "check_clean", lambda *a, **k: None)
    monkeypatch.setattr(libvirt_backend, "export_need", lambda *a, **k: 0)

    def export_disk(*_a: Any, **_k: Any) -> None:
        capture.ended = True
        raise RuntimeError("qemu-img: error while reading at byte 0: Input/output error")

    monkeypatch.setattr(libvirt_backend, "export_disk", export_disk)
    return capture


def test_an_export_cut_off_by_the_view_ending_reports_the_view(export_reads_the_view: Capture, tmp_path: Path) -> None:
    with pytest.raises(pit.PrototypeStopped) as err:
        backend(export_reads_the_view, tmp_path).export()
    assert isinstance(err.value.__cause__, RuntimeError)  # the read error stays as its cause


def test_control_an_export_failing_on_its_own_reports_its_own_error(
    export_reads_the_view: Capture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def export_disk(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("qemu-img: No space left on device")

    monkeypatch.setattr(libvirt_backend, "export_disk", export_disk)
    with pytest.raises(RuntimeError, match="No space left"):
        backend(export_reads_the_view, tmp_path).export()
    assert export_reads_the_view.checks == 2  # before the export, and after its failure


def test_a_view_ended_before_the_export_is_never_read(export_reads_the_view: Capture, tmp_path: Path) -> None:
    export_reads_the_view.ended = True
    export_reads_the_view.ends_with = pit.ScratchSpaceLow("the scratch space of the point-in-time view ran low")
    with pytest.raises(pit.ScratchSpaceLow):
        backend(export_reads_the_view, tmp_path).export()


def test_a_transient_failure_is_retried_not_blamed_on_the_view(tmp_path: Path) -> None:
    capture = Capture()

    @libvirt_backend._reports_view_end
    def step(_b: LibvirtBackend) -> None:
        capture.ended = True
        raise TransientError("libvirt connection dropped")

    with pytest.raises(TransientError):
        step(backend(capture, tmp_path))
    assert capture.checks == 0


def test_the_prepare_boot_poll_fails_once_the_view_ended(tmp_path: Path) -> None:
    capture = Capture()
    capture.ended = True
    b = backend(capture, tmp_path)
    b._channel = None
    with pytest.raises(pit.PrototypeStopped):
        b.poll_guest()
