"""The backend template: the fixed create-image chain, with backend-specific hooks.

The whole chain, and its rollback chain, on one screen (``Backend.chain`` and
``Backend.onerror``). Shared bookkeeping -- the per-stage guest wait, events, the
persisted state -- lives here; only what differs between hypervisors lives in the
subclasses. Every onerror step is idempotent, because ``imgprep jobs recover`` runs
the same steps again after a crash.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

from imgprep import limits
from imgprep.channel import GuestStatus
from imgprep.config import Config
from imgprep.errors import ImgprepError, PrepareFailed
from imgprep.export import ExportResult
from imgprep.manifest import build_manifest, default_version, rfc3339
from imgprep.outputfiles import remove_workdirs, write_file
from imgprep.sanitize import clean
from imgprep.workflow import Engine, Step

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CreateRequest:
    """Everything a create job needs, validated at the edge."""

    vm: str
    image_uuid: str
    manifest: dict[str, Any]
    script: bytes
    script_name: str
    compression: str
    output_dir: Path
    backend: str = "libvirt"
    host: str | None = None
    mode: str = "early"  # "legacy" = the classic late placement (benchmarks only)
    script_is_default: bool = False  # no script given: the backend may pick another default per guest
    strict: bool = False  # an export over IMGAPI's limits fails the job (else: a warning)

    def params(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "image_uuid": self.image_uuid,
            "manifest": self.manifest,
            "script_name": self.script_name,
            "compression": self.compression,
            "output_dir": str(self.output_dir),
            "backend": self.backend,
            "host": self.host,
            "mode": self.mode,
            "strict": self.strict,
        }


@dataclasses.dataclass(frozen=True)
class VmFacts:
    uuid: str
    name: str
    running: bool
    learned: dict[str, Any]  # manifest fields learned from the VM


class Backend(abc.ABC):
    """Template for a hypervisor backend. Subclasses implement the hooks below."""

    name: ClassVar[str]
    default_script: ClassVar[str]  # path under operator_scripts/
    default_compression: ClassVar[str] = "zstd"
    poll_interval: ClassVar[float] = 1.0

    def __init__(self, config: Config, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.status = GuestStatus()

    # --- shared bookkeeping ------------------------------------------------------

    @property
    def record(self) -> dict[str, Any]:
        return self.engine.record

    @property
    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.engine.record["state"]
        return state

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = self.engine.record["params"]
        return params

    def persist(self) -> None:
        """Save the record now: call *before* an action whose undo needs to know it."""
        self.engine.save()

    def emit(self, event: dict[str, Any]) -> None:
        self.engine.emit(event)

    def mark_touched(self) -> None:
        if not self.record["vm_touched"]:
            self.record["vm_touched"] = True
            self.persist()

    # --- the chain ------------------------------------------------------------------

    def chain(self, request: CreateRequest) -> list[Step]:
        return [
            Step("validate", self._validate_step),
            Step("stop_vm", self.stop_vm),
            Step("checkpoint", self.checkpoint),
            Step("inject", lambda: self.inject(request)),
            Step("boot_prepare", self.boot_prepare),
            Step("wait_running", self.wait_running),
            Step("wait_result", self.wait_result),
            Step("wait_shutoff", self.wait_shutoff),
            Step("export", self._export_step),
            Step("write_manifest", self.write_manifest),
            Step("restore_disks", self.restore_disks),
            Step("delete_checkpoint", self.delete_checkpoint),
            Step("restart_vm", self.restart_vm),
        ]

    def onerror(self) -> list[Step]:
        return [
            Step("discard_output", self.discard_output),
            Step("restore_disks", self.restore_disks),
            Step("delete_checkpoint", self.delete_checkpoint),
            Step("restart_vm", self.restart_vm),
        ]

    def _validate_step(self) -> None:
        facts = self.validate()
        self.state.setdefault("vm_uuid", facts.uuid)
        self.state.setdefault("vm_name", facts.name)
        self.state.setdefault("learned", facts.learned)

    def _export_step(self) -> None:
        result = self.export()
        self.state["export"] = {"path": str(result.path), **result.file_info()}
        problems = limits.violations([result.file_info()])
        if problems and self.params.get("strict"):
            raise ImgprepError(
                "the export exceeds what IMGAPI accepts (--strict): " + "; ".join(problems), code="ImgapiLimit"
            )
        for problem in problems:
            log.warning("the export exceeds what IMGAPI accepts: %s", problem)
            self.record.setdefault("warnings", []).append(problem)
            self.emit({"event": "warning", "step": "export", "message": problem})

    def write_manifest(self) -> None:
        """Write ``<image_uuid>.imgmanifest`` atomically beside the image file."""
        export = dict(self.state["export"])
        path = Path(export.pop("path"))
        learned = dict(self.state.get("learned", {}))
        learned.update(self.learned_after_prepare())
        user = dict(self.params["manifest"])
        user.setdefault("name", self.state.get("vm_name", "image"))
        user.setdefault("version", default_version())
        manifest = build_manifest(
            image_uuid=self.params["image_uuid"],
            user=user,
            learned=learned,
            file_info=export,
            published_at=rfc3339(),
        )
        target = path.parent / f"{self.params['image_uuid']}.imgmanifest"
        write_file(target, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        self.state["manifest_path"] = str(target)
        self.state["file_path"] = str(path)
        self.record["manifest"] = manifest

    def learned_after_prepare(self) -> dict[str, Any]:
        """Manifest fields learned while preparing (e.g. the guest OS); backends extend."""
        return {}

    def check_free_space(self, need: int, problems: list[str]) -> None:
        """Validation: the output directory must hold ``need`` bytes (the worst case)."""
        output_dir = Path(self.params["output_dir"])
        try:
            free = shutil.disk_usage(output_dir).free
        except OSError:
            return  # the output directory check reports it
        if free < need:
            problems.append(
                f"not enough free space in {output_dir}: the export may need {need // 2**20} MiB, "
                f"{free // 2**20} MiB free"
            )

    def discard_output(self) -> None:
        """A job that did not succeed leaves no image: remove its (half-)written files."""
        out = Path(self.params["output_dir"])
        image_uuid = self.params["image_uuid"]
        remove_workdirs(out, image_uuid)
        for leftover in [*out.glob(f".{image_uuid}*.partial"), *out.glob(f"{image_uuid}.*")]:
            leftover.unlink(missing_ok=True)

    # --- the guest wait (shared) ---------------------------------------------------

    def _wait(self, stage: str, timeout: float, done: Any) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.engine.cancel.check()
            status, powered_off = self.poll_guest()
            self._record_guest(status)
            if done(status, powered_off):
                return
            if powered_off:
                raise PrepareFailed(
                    f"the VM powered off during stage {stage} without reporting a result (prepare script did not run)",
                    code="PrepareImageDidNotRun",
                )
            if time.monotonic() >= deadline:
                if stage == "wait_running":
                    raise PrepareFailed(
                        f"prepare script did not run: no 'running' state within {timeout:.0f}s of boot",
                        code="PrepareImageDidNotRun",
                    )
                raise PrepareFailed(
                    f"stage {stage} timed out after {timeout:.0f}s (guest state: {status.state})",
                    code="PrepareImageTimeout",
                )
            self.engine.cancel.sleep(self.poll_interval)

    def _record_guest(self, status: GuestStatus) -> None:
        for state in status.seen_states[len(self.status.seen_states) :]:
            self.emit({"event": "guest", "state": state})
        self.status = dataclasses.replace(status, seen_states=list(status.seen_states))
        prepare = self.record.setdefault("prepare", {})
        changed = False
        for key in ("state", "error", "log"):
            value = getattr(status, key)
            if value is not None and prepare.get(key) != value:
                prepare[key] = value
                changed = True
        if status.report is not None and self.record.get("boot_report") != status.report:
            self.record["boot_report"] = status.report
            changed = True
        if changed:
            self.persist()

    def wait_running(self) -> None:
        self._wait(
            "wait_running",
            self.config.timeouts.boot,
            lambda s, _off: s.state is not None,
        )

    def wait_result(self) -> None:
        # the guest enforces the script limit itself; allow it time to report
        self._wait(
            "wait_result",
            self.config.timeouts.prepare + 60,
            lambda s, _off: s.state in ("success", "error"),
        )
        if self.status.state == "error":
            detail = clean((self.status.error or "no detail").strip())  # guest text: escaped once, here
            raise PrepareFailed(f"prepare script failed in the guest: {detail}", code="PrepareImageError")

    def wait_shutoff(self) -> None:
        self._wait("wait_shutoff", self.config.timeouts.shutdown, lambda _s, off: off)

    # --- hooks ------------------------------------------------------------------

    @abc.abstractmethod
    def validate(self) -> VmFacts:
        """Check everything without touching the VM; raise InvalidInput."""

    @abc.abstractmethod
    def stop_vm(self) -> None: ...

    @abc.abstractmethod
    def checkpoint(self) -> None: ...

    @abc.abstractmethod
    def inject(self, request: CreateRequest) -> None: ...

    @abc.abstractmethod
    def boot_prepare(self) -> None: ...

    @abc.abstractmethod
    def poll_guest(self) -> tuple[GuestStatus, bool]:
        """(what the guest reported so far, whether the VM is powered off)."""

    @abc.abstractmethod
    def export(self) -> ExportResult: ...

    @abc.abstractmethod
    def restore_disks(self) -> None: ...

    @abc.abstractmethod
    def delete_checkpoint(self) -> None: ...

    @abc.abstractmethod
    def restart_vm(self) -> None: ...


class StopTimeout(ImgprepError):
    code = "StopTimeout"
