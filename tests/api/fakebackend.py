"""FAKE backend for the API tests only: no hypervisor, no VM, no guest.

It exists so the API tests can run jobs through the real server, queue, engine and job
store without a VM. It is loaded only by ``tests/api/fakeserve.py``; the production
``imgprep`` never imports it. The end-to-end API test (tests/e2e/test_api_e2e.py) uses
the real libvirt backend.

The fake world is a directory named by ``IMGPREP_FAKE_WORLD``:
  vms/<uuid>.json   a VM exists: {"name": ..., "fail": null | "prepare"}
  gates/<uuid>      the VM's "guest" reports only once this file exists, so a test
                    decides when a running job may finish (no sleeps, no timing)
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from imgprep.backends.base import Backend, JobState, VmFacts
from imgprep.channel import GuestStatus
from imgprep.errors import InvalidInput
from imgprep.export import ExportResult, output_name


def world() -> Path:
    return Path(os.environ["IMGPREP_FAKE_WORLD"])


def add_vm(root: Path, vm_uuid: str, name: str, *, fail: str | None = None) -> None:
    (root / "vms").mkdir(parents=True, exist_ok=True)
    (root / "gates").mkdir(parents=True, exist_ok=True)
    (root / "vms" / f"{vm_uuid}.json").write_text(json.dumps({"name": name, "fail": fail}))


def open_gate(root: Path, vm_uuid: str) -> None:
    (root / "gates").mkdir(parents=True, exist_ok=True)
    (root / "gates" / vm_uuid).touch()


def disk_content(name: str) -> bytes:
    return f"fake disk of {name}\n".encode() * 4096


@dataclasses.dataclass
class FakeState(JobState):
    fake_checkpoint: bool = False
    fake_injected: int | None = None
    fake_booted: bool = False
    fake_restored: bool = False
    fake_restarted: bool = False


class FakeBackend(Backend[FakeState]):
    name = "libvirt"  # stands in for the libvirt backend in the test server process
    default_script = "operator_scripts/linux-prepare-image"
    poll_interval = 0.02
    state_type = FakeState

    def _vm(self) -> dict[str, Any]:
        vm = self.request.vm
        path = world() / "vms" / f"{vm}.json"
        if not path.exists():
            raise InvalidInput(f"no VM {vm!r} (fake backend)", code="VmNotFound")
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def validate(self) -> VmFacts:
        data = self._vm()
        learned = {"type": "zvol", "os": "linux", "image_size": 10, "disk_driver": "virtio"}
        return VmFacts(self.request.vm, data["name"], True, learned)

    def locate(self) -> str:
        self._vm()
        return self.request.vm

    def stop_vm(self) -> None:
        if self.state.was_running is None:
            self.state.was_running = True
        self.mark_touched()

    def checkpoint(self) -> None:
        self.state.fake_checkpoint = True
        self.persist()

    def inject(self) -> None:
        self.state.fake_injected = len(self.request.script)

    def boot_prepare(self) -> None:
        self.state.fake_booted = True

    def poll_guest(self) -> tuple[GuestStatus, bool]:
        if not (world() / "gates" / self.state.vm_uuid).exists():
            return GuestStatus(), False
        if self._vm().get("fail") == "prepare":
            return GuestStatus(state="error", error="fake: the operator script failed", seen_states=["error"]), True
        return GuestStatus(state="success", seen_states=["running", "success"]), True

    def export(self) -> ExportResult:
        out = self.request.output_dir / output_name(self.request.image_uuid, "gzip")
        data = gzip.compress(disk_content(self.state.vm_name), mtime=0)
        out.write_bytes(data)
        return ExportResult(
            path=out,
            size=len(data),
            sha1=hashlib.sha1(data, usedforsecurity=False).hexdigest(),
            sha256=hashlib.sha256(data).hexdigest(),
            compression="gzip",
            format="raw",
        )

    def restore_disks(self) -> None:
        self.state.fake_restored = True

    def delete_checkpoint(self) -> None:
        self.state.fake_checkpoint = False

    def restart_vm(self) -> None:
        self.state.fake_restarted = bool(self.state.was_running)
