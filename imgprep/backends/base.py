"""The backend template: the fixed create-image chain, with backend-specific hooks.

The whole chain on one screen (``Backend.chain``): the **create** steps, the
**always** steps (restore the VM: a ``finally``, after success and failure, and in
``imgprep jobs recover``) and **onerror** (discard the output, only when the create
steps did not all succeed). Shared bookkeeping -- the per-stage guest wait, events,
the typed persisted state -- lives here; only what differs between hypervisors lives
in the subclasses. Every always and onerror step is idempotent.

The lifecycle of a backend: ``with backend:`` (``open()``/``close()``) around its use;
``locate()`` finds the VM (its UUID, for the lock); ``validate()`` checks everything
without touching the VM and returns the ``Plan`` the chain executes.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, Self, TypeVar

from imgprep import limits
from imgprep.channel import GuestStatus
from imgprep.config import Config
from imgprep.errors import ImgprepError, PrepareFailed, TransientError
from imgprep.export import ExportResult
from imgprep.manifest import build_manifest, default_version, rfc3339
from imgprep.outputfiles import remove_workdirs, write_file
from imgprep.sanitize import clean
from imgprep.verify import VerificationFailed
from imgprep.workflow import Chain, Engine, Step

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CreateRequest:
    """Everything a create job needs, validated at the edge; stored whole in the job record."""

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
    accept_new_host_key: bool = False  # smartos: trust (and record) an unknown host key
    capture: str = "clone"  # libvirt: "clone" (a throwaway clone; the default) or "in-place"
    consistency: str = "auto"  # clone of a running VM: auto, freeze, stop or crash
    disk: str | None = None  # the disk to export (a target such as vdb); None: the root filesystem's
    verify: bool = False  # boot the exported image once and check it (libvirt; docs/verification.md)
    keep_unverified: bool = False  # a failed verification keeps the image file (the job still fails)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["script"] = base64.b64encode(self.script).decode()
        data["output_dir"] = str(self.output_dir)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CreateRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["script"] = base64.b64decode(values.get("script", ""))
        values["output_dir"] = Path(values["output_dir"])
        values.setdefault("script_name", "")
        values.setdefault("capture", "in-place")  # a record from before clone mode captured in place
        return cls(**values)

    @classmethod
    def from_v1_params(cls, params: Mapping[str, Any]) -> CreateRequest:
        """The request of a version-1 record (its ``params``; the script was not kept)."""
        return cls.from_json({**params, "script": ""})

    def index(self) -> dict[str, Any]:
        """The record's ``params``: what listings and the API show (never read back by a backend)."""
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
            "capture": self.capture,
            "consistency": self.consistency,
            "disk": self.disk,
            "verify": self.verify,
            "keep_unverified": self.keep_unverified,
        }


@dataclasses.dataclass(frozen=True)
class VmFacts:
    """What validation found: the plan the chain executes (nothing touched yet)."""

    uuid: str
    name: str
    running: bool
    learned: dict[str, Any]  # manifest fields learned from the VM


Plan = VmFacts


@dataclasses.dataclass
class JobState:
    """What a job did so far, persisted as the record's ``state`` (its undo depends on
    it). Each backend extends it with its own fields; ``from_json`` reads version-1
    records, whose keys are the same."""

    vm_uuid: str = ""
    vm_name: str = ""
    learned: dict[str, Any] = dataclasses.field(default_factory=dict)
    was_running: bool | None = None
    prepare_boot: bool = False
    export: dict[str, Any] | None = None
    export_seconds: float | None = None
    manifest_path: str | None = None
    file_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            log.debug("job state: ignoring unknown keys %s", ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in names})


S = TypeVar("S", bound=JobState)


class Backend(abc.ABC, Generic[S]):
    """Template for a hypervisor backend. Subclasses implement the hooks below."""

    name: ClassVar[str]
    default_script: ClassVar[str]  # path under operator_scripts/
    default_compression: ClassVar[str] = "zstd"
    poll_interval: ClassVar[float] = 1.0
    needs_host: ClassVar[bool] = False  # the request must name a host (--host)
    verification_available: ClassVar[bool] = False  # can boot its exported image once (verify)
    state_type: type[S]

    def __init__(self, config: Config, engine: Engine, request: CreateRequest) -> None:
        self.config = config
        self.engine = engine
        self.request = request
        self.status = GuestStatus()
        self.state: S = self.state_type.from_json(engine.record.get("state") or {})
        engine.before_save = self._store_state

    def _store_state(self) -> None:
        self.engine.record["state"] = self.state.to_json()

    # --- lifecycle ------------------------------------------------------------------

    def open(self) -> None:
        """Connect to the hypervisor (idempotent). Backends that keep a connection override it."""

    def close(self) -> None:
        """Let go of every connection (idempotent)."""

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except Exception:
            log.exception("closing the %s backend failed", self.name)

    @abc.abstractmethod
    def locate(self) -> str:
        """The UUID of the request's VM (cheap: for the lock). Raises InvalidInput (VmNotFound)."""

    def connection(self) -> dict[str, Any]:
        """What the job connects to, for the record (shown; compared at recovery; never used)."""
        return {}

    def check_recovery_target(self) -> None:
        """Recovery: refuse a record whose connection differs from the configuration's.

        Recovery never connects anywhere (nor runs anything) taken from a job record."""

    # --- shared bookkeeping ------------------------------------------------------

    @property
    def record(self) -> dict[str, Any]:
        return self.engine.record

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

    def chain(self, plan: Plan) -> Chain:
        """The job, on one screen. The capture steps (how the VM's disks are held still
        and how they are given back) are the backend's: ``capture_steps``/``release_steps``."""
        return Chain(
            create=[
                Step("validate", lambda: self.adopt(plan)),
                *self.capture_steps(),  # e.g. stop_vm, checkpoint
                Step("inject", self.inject),
                Step("boot_prepare", self.boot_prepare),
                Step("wait_running", self.wait_running),
                Step("wait_result", self.wait_result),
                Step("wait_shutoff", self.wait_shutoff),
                Step("export", self._export_step),
                Step("verify", self._verify_step),  # boot the image once (or record why not)
                Step("write_manifest", self.write_manifest),
            ],
            # the verification boot's cleanup, then e.g. restore_disks, delete_checkpoint, restart_vm
            always=[*self.verify_release_steps(), *self.release_steps()],
            onerror=[Step("discard_output", self.discard_output)],
        )

    def capture_steps(self) -> list[Step]:
        """The create steps that take hold of the VM's disks (in place: stop it, checkpoint)."""
        return [Step("stop_vm", self.stop_vm), Step("checkpoint", self.checkpoint)]

    def release_steps(self) -> list[Step]:
        """The always steps that give the VM back as it was."""
        return [
            Step("restore_disks", self.restore_disks),
            Step("delete_checkpoint", self.delete_checkpoint),
            Step("restart_vm", self.restart_vm),
        ]

    def verify_release_steps(self) -> list[Step]:
        """The always steps that clean up after the verification boot (none without one)."""
        return []

    def _verify_step(self) -> None:
        """Boot the exported image once (``verify``) and judge it; or record why not.

        A failed verification fails the job (VerificationFailed, or the error of the boot
        itself); onerror then discards the image, unless ``keep_unverified``."""
        if not self.request.verify:
            status = "skipped" if self.verification_available else "not-available"
            self.record["verification"] = {"status": status, "checks": [], "report": None, "duration_s": None}
            return
        t0 = time.monotonic()
        verification: dict[str, Any] = {"status": "running", "checks": [], "report": None, "duration_s": None}
        self.record["verification"] = verification
        self.persist()
        try:
            verification.update(self.verify())
        except BaseException as exc:  # a crash, a cancel too: the record must not say "running"
            if isinstance(exc, VerificationFailed):
                verification.update(exc.result)
            verification["status"] = "failed"
            verification["error"] = (
                exc.as_dict()
                if isinstance(exc, ImgprepError)
                else {"code": "InternalError", "message": f"{type(exc).__name__}: {exc}"}
            )
            if isinstance(exc, TransientError):  # one boot per job: never retried
                raise ImgprepError(exc.message, code="VerificationFailed") from None
            raise
        finally:
            verification["duration_s"] = round(time.monotonic() - t0, 1)
            if verification["status"] == "failed":
                kept = self.request.keep_unverified and self.state.export is not None
                verification["image"] = (
                    f"kept unverified: {self.state.export['path']}" if kept and self.state.export else "discarded"
                )
            self.persist()

    def verify(self) -> dict[str, Any]:
        """The verification boot: ``status`` (passed), ``checks``, ``report``; raises
        VerificationFailed. Only backends with ``verification_available`` implement it."""
        raise NotImplementedError

    def adopt(self, plan: Plan) -> None:
        """The validate step: record the plan made (under the lock) before the chain started."""
        self.state.vm_uuid = self.state.vm_uuid or plan.uuid
        self.state.vm_name = self.state.vm_name or plan.name
        self.state.learned = self.state.learned or dict(plan.learned)

    def _export_step(self) -> None:
        result = self.export()
        self.state.export = {"path": str(result.path), **result.file_info()}
        problems = limits.violations([result.file_info()])
        if problems and self.request.strict:
            raise ImgprepError(
                "the export exceeds what IMGAPI accepts (--strict): " + "; ".join(problems), code="ImgapiLimit"
            )
        for problem in problems:
            log.warning("the export exceeds what IMGAPI accepts: %s", problem)
            self.record.setdefault("warnings", []).append(problem)
            self.emit({"event": "warning", "step": "export", "message": problem})

    def write_manifest(self) -> None:
        """Write ``<image_uuid>.imgmanifest`` atomically beside the image file."""
        if self.state.export is None:
            raise ImgprepError("write_manifest: nothing was exported")
        export = dict(self.state.export)
        path = Path(export.pop("path"))
        learned = dict(self.state.learned)
        learned.update(self.learned_after_prepare())
        user = dict(self.request.manifest)
        user.setdefault("name", self.state.vm_name or "image")
        user.setdefault("version", default_version())
        image_uuid = self.request.image_uuid
        manifest = build_manifest(
            image_uuid=image_uuid,
            user=user,
            learned=learned,
            file_info=export,
            published_at=rfc3339(),
        )
        target = path.parent / f"{image_uuid}.imgmanifest"
        write_file(target, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        self.state.manifest_path = str(target)
        self.state.file_path = str(path)
        self.record["manifest"] = manifest

    def learned_after_prepare(self) -> dict[str, Any]:
        """Manifest fields learned while preparing (e.g. the guest OS); backends extend."""
        return {}

    def check_free_space(self, need: int, problems: list[str]) -> None:
        """Validation: the output directory must hold ``need`` bytes (the worst case)."""
        problem = self._free_space_problem(need)
        if problem:
            problems.append(problem)

    def check_free_space_before_export(self, need: int) -> None:
        """Export, again: the guest may have filled its disk during the prepare boot, so
        ``need`` is measured on what the disk holds now; raises if it does not fit."""
        problem = self._free_space_problem(need)
        if problem:
            raise ImgprepError(f"{problem} (measured after the prepare boot)", code="InsufficientSpace")

    def _free_space_problem(self, need: int) -> str | None:
        output_dir = self.request.output_dir
        try:
            free = shutil.disk_usage(output_dir).free
        except OSError:
            return None  # the output directory check reports it
        if free >= need:
            return None
        return (
            f"not enough free space in {output_dir}: the export may need {need // 2**20} MiB, {free // 2**20} MiB free"
        )

    def discard_output(self) -> None:
        """A job that did not succeed leaves no image: remove its (half-)written files."""
        out = self.request.output_dir
        image_uuid = self.request.image_uuid
        remove_workdirs(out, image_uuid)
        kept = self.record.get("verification", {}).get("image", "")
        for leftover in [*out.glob(f".{image_uuid}*.partial"), *out.glob(f"{image_uuid}.*")]:
            if kept.startswith("kept unverified: ") and str(leftover) == kept.removeprefix("kept unverified: "):
                log.warning("keeping the unverified image %s (keep_unverified)", leftover)
                continue
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

    def stop_vm(self) -> None:
        """A hook of the default capture/release steps (a backend overriding both needs none)."""
        raise NotImplementedError

    def checkpoint(self) -> None:
        """A hook of the default capture/release steps (a backend overriding both needs none)."""
        raise NotImplementedError

    @abc.abstractmethod
    def inject(self) -> None: ...

    @abc.abstractmethod
    def boot_prepare(self) -> None: ...

    @abc.abstractmethod
    def poll_guest(self) -> tuple[GuestStatus, bool]:
        """(what the guest reported so far, whether the VM is powered off)."""

    @abc.abstractmethod
    def export(self) -> ExportResult: ...

    def restore_disks(self) -> None:
        """A hook of the default capture/release steps (a backend overriding both needs none)."""
        raise NotImplementedError

    def delete_checkpoint(self) -> None:
        """A hook of the default capture/release steps (a backend overriding both needs none)."""
        raise NotImplementedError

    def restart_vm(self) -> None:
        """A hook of the default capture/release steps (a backend overriding both needs none)."""
        raise NotImplementedError


class StopTimeout(ImgprepError):
    code = "StopTimeout"
