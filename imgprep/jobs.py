"""Create-image jobs and their recovery: the one place the CLI and the HTTP API call."""

from __future__ import annotations

import logging
import os
import uuid as uuidlib
from pathlib import Path
from typing import Any, cast

from imgprep.artifacts import artifact
from imgprep.backends.base import Backend, CreateRequest, Plan
from imgprep.config import CAPTURES, COMPRESSIONS, CONSISTENCIES, Config
from imgprep.errors import ImgprepError, InvalidInput, RestoreFailed, VmBusy
from imgprep.jobstore import JobStore, Record
from imgprep.lock import VmLock, is_locked, lock_key
from imgprep.manifest import validate_user_manifest
from imgprep.outputfiles import output_dir_problem
from imgprep.uuids import is_canonical
from imgprep.workflow import (
    CancelToken,
    Chain,
    Engine,
    EventSink,
    RetryPolicy,
    needs_recovery,
    new_record,
    now,
)

log = logging.getLogger(__name__)


def backend_class(name: str) -> type[Backend[Any]]:
    if name == "libvirt":
        from imgprep.backends.libvirt import LibvirtBackend

        return LibvirtBackend
    if name == "smartos":
        from imgprep.backends.smartos import SmartosBackend

        return SmartosBackend
    raise InvalidInput(f"unknown backend {name!r} (known: libvirt, smartos)")


def build_request(
    config: Config,
    *,
    vm: str,
    manifest: dict[str, Any] | None = None,
    name: str | None = None,
    version: str | None = None,
    script: Path | None = None,
    compression: str | None = None,
    output_dir: Path | None = None,
    backend: str = "libvirt",
    host: str | None = None,
    mode: str = "early",
    image_uuid: str | None = None,
    strict: bool | None = None,
    accept_new_host_key: bool = False,
    require_host: bool = True,
    capture: str | None = None,
    consistency: str | None = None,
    disk: str | None = None,
    verify: bool | None = None,
    keep_unverified: bool | None = None,
) -> CreateRequest:
    """Check every user input that does not need the hypervisor; report all problems."""
    problems: list[str] = []
    user_manifest: dict[str, Any] = dict(manifest or {})
    if name is not None:
        user_manifest["name"] = name
    if version is not None:
        user_manifest["version"] = version
    try:
        user_manifest = validate_user_manifest(user_manifest)
    except InvalidInput as exc:
        problems.extend(exc.problems)
    backend_cls = None
    try:
        backend_cls = backend_class(backend)
    except InvalidInput as exc:
        problems.extend(exc.problems)
    compression = compression or config.compression or (backend_cls.default_compression if backend_cls else "zstd")
    if compression not in COMPRESSIONS:
        problems.append(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    out = (output_dir or config.output_dir).resolve()
    if not out.is_dir():
        problems.append(f"output directory {out} does not exist")
    elif not os.access(out, os.W_OK | os.X_OK):
        problems.append(f"output directory {out} is not writable")
    elif (unsafe := output_dir_problem(out)) is not None:
        problems.append(unsafe)
    script_path = script or config.script
    script_bytes = b""
    script_name = ""
    if script_path is not None:
        try:
            script_bytes = script_path.read_bytes()
            script_name = str(script_path)
        except OSError as exc:
            problems.append(f"script {script_path}: cannot read: {exc.strerror}")
        else:
            if not script_bytes.startswith(b"#!"):
                problems.append(f"script {script_path}: must start with a #! line (it is executed directly)")
    elif backend_cls is not None:
        default = artifact(backend_cls.default_script)
        script_bytes, script_name = default.read_bytes(), default.name
    if mode not in ("early", "legacy"):
        problems.append(f"mode must be early or legacy, got {mode!r}")
    if backend == "libvirt":
        capture = capture or config.capture
        consistency = consistency or config.consistency
    else:  # the SmartOS backend captures with its own ZFS flow
        if capture not in (None, "in-place") or consistency not in (None, "auto") or disk is not None:
            problems.append(f"--capture, --consistency and --disk apply to the libvirt backend, not {backend}")
        capture, consistency = "in-place", "auto"
    if capture not in CAPTURES:
        problems.append(f"capture must be one of {', '.join(CAPTURES)}, got {capture!r}")
    if consistency not in CONSISTENCIES:
        problems.append(f"consistency must be one of {', '.join(CONSISTENCIES)}, got {consistency!r}")
    elif capture == "in-place" and consistency != "auto":
        problems.append("--consistency applies to --capture clone (in place, the VM is shut down)")
    if disk is not None and not (disk.isascii() and disk.isalnum() and len(disk) <= 32):
        problems.append(f"--disk must be a disk target such as vda, got {disk!r}")
    asked = verify if verify is not None else config.verify  # None: not asked either way
    if backend_cls is not None and not backend_cls.verification_available and asked:
        problems.append(f"--verify (verify: true) applies to the libvirt backend; {backend} cannot verify an image")
    verifying = bool(backend_cls is not None and backend_cls.verification_available and asked is not False)
    if backend_cls is not None and backend_cls.needs_host and not host and require_host:
        problems.append(f"--host is required with --backend {backend}")
    if image_uuid is not None and not is_canonical(image_uuid):
        problems.append(f"image uuid {image_uuid!r} is not a UUID in canonical lowercase form")
    if problems:
        raise InvalidInput(problems)
    return CreateRequest(
        vm=vm,
        image_uuid=image_uuid or user_manifest.pop("uuid", None) or str(uuidlib.uuid4()),
        manifest=user_manifest,
        script=script_bytes,
        script_name=script_name,
        compression=compression,
        output_dir=out,
        backend=backend,
        host=host,
        mode=mode,
        script_is_default=script_path is None,
        strict=config.strict if strict is None else strict,
        accept_new_host_key=accept_new_host_key,
        capture=capture,
        consistency=consistency,
        disk=disk,
        verify=verifying,
        keep_unverified=config.keep_unverified if keep_unverified is None else keep_unverified,
    )


def job_is_running(config: Config, record: Record) -> bool:
    """True while a live process holds the lock of the job's VM and the job runs."""
    if record["execution"] not in ("queued", "running"):
        return False
    vm_uuid = record["params"].get("vm_uuid")
    return bool(vm_uuid) and is_locked(config.state_dir, lock_key(record["params"]["backend"], vm_uuid))


def job_needs_recovery(config: Config, record: Record) -> bool:
    return needs_recovery(record, running=job_is_running(config, record))


def _retry(config: Config) -> RetryPolicy:
    return RetryPolicy(config.retry_attempts, config.retry_max_seconds)


class Job:
    """One create job: located, validated once (under the VM's lock), then run under it.

    The job owns its backend's lifecycle: ``close()`` (or the end of ``run()``) lets go
    of every connection the backend holds.
    """

    def __init__(
        self,
        config: Config,
        request: CreateRequest,
        *,
        store: JobStore | None = None,
        events: EventSink | None = None,
        cancel: CancelToken | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.config = config
        self.request = request
        self.store = store or JobStore(config.state_dir)
        t = config.timeouts
        self.record = new_record(
            name=f"create-from-vm-{request.vm}",
            params=request.index() | {"vm_uuid": None},
            chain=[],
            onerror=[],
            timeout=t.stop + t.boot + t.prepare + t.shutdown + (t.verify if request.verify else 0),
        )
        self.record["request"] = request.to_json()
        self.engine = Engine(self.record, self.store, events=events, cancel=cancel, retry=retry or _retry(config))
        self.backend: Backend[Any] = backend_class(request.backend)(config, self.engine, request)
        pending = "pending" if request.verify else "skipped" if self.backend.verification_available else "not-available"
        self.record["verification"] = {"status": pending, "checks": [], "report": None, "duration_s": None}
        self.record["params"].update(self.backend.connection())  # shown, compared at recovery, never used
        self.plan: Plan | None = None
        self.chain: Chain | None = None  # built once, from the plan

    @property
    def uuid(self) -> str:
        return str(self.record["uuid"])

    def close(self) -> None:
        self.backend.__exit__(None, None, None)

    def locate(self) -> str:
        """Find the VM (nothing touched); its UUID. Raises InvalidInput."""
        vm_uuid = self.record["params"].get("vm_uuid")
        if not vm_uuid:
            self.backend.open()
            vm_uuid = self.backend.locate()
            self.record["params"]["vm_uuid"] = vm_uuid
            self.record["target"] = f"/vms/{vm_uuid}"
        return str(vm_uuid)

    def _lock(self) -> VmLock:
        return VmLock(self.config.state_dir, lock_key(self.request.backend, self.locate()))

    def validate(self) -> Plan:
        """Locate the VM and check everything under its lock (nothing touched): the plan.

        Raises InvalidInput. ``run()`` executes this plan without validating again."""
        with self._lock():
            self.check_no_unrecovered()
            return self._validate()

    def _validate(self) -> Plan:
        """Under the VM's lock: no other live job runs on it, so a leftover checkpoint
        the backend finds is an unrecovered job's (``check_no_unrecovered`` names it)."""
        if self.plan is not None:
            return self.plan
        plan = self.backend.validate()
        self.plan = plan
        self.chain = self.backend.chain(plan)
        self.record.update(self.chain.names())
        self.backend.adopt(plan)
        self.record["params"]["vm_uuid"] = plan.uuid
        self.record["target"] = f"/vms/{plan.uuid}"
        return plan

    def check_no_unrecovered(self) -> None:
        vm_uuid = self.record["params"]["vm_uuid"]
        for other in self.store.list_jobs(vm_uuid=vm_uuid):
            if other["uuid"] != self.uuid and needs_recovery(other, running=False):
                raise VmBusy(
                    f"VM {vm_uuid} was left unrestored by job {other['uuid']}; "
                    f"run `imgprep jobs recover {other['uuid']}` first"
                )

    def save_queued(self) -> None:
        self.engine.save()
        self.store.save_image(self.request.image_uuid, self.uuid, "creating", self._pending_manifest(), None)

    def _pending_manifest(self) -> dict[str, Any]:
        return {
            "v": 2,
            "uuid": self.request.image_uuid,
            "state": "creating",
            **{k: v for k, v in self.request.manifest.items() if k != "uuid"},
        }

    def run(self) -> Record:
        """Under the VM's lock: validate (unless done), run the chain, update the image."""
        try:
            with self._lock():
                self.check_no_unrecovered()
                self._validate()
                assert self.chain is not None
                self.save_queued()
                try:
                    self.engine.run(self.chain)
                except RestoreFailed as exc:
                    if self.record.get("manifest") and self.record["state"].get("file_path"):
                        self._image_done()  # the image is complete: kept, only the VM is left to restore
                    else:
                        self._image_failed(exc)
                    raise
                except ImgprepError as exc:
                    self._image_failed(exc)
                    raise
                self._image_done()
        finally:
            self.close()
        return self.record

    def _image_done(self) -> None:
        self.store.save_image(
            self.request.image_uuid, self.uuid, "active", self.record["manifest"], self.record["state"]["file_path"]
        )

    def _image_failed(self, exc: ImgprepError) -> None:
        manifest = self._pending_manifest() | {"state": "failed", "error": exc.as_dict()}
        self.store.save_image(self.request.image_uuid, self.uuid, "failed", manifest, None)


# Recovery and chain_names() need the steps, not a plan (the validate step is never run).
_PLACEHOLDER = Plan("", "", running=False, learned={})


def _mark_interrupted(record: Record, note: str = "") -> None:
    """A job its process left queued or running: failed. An error it already had (it
    died while rolling back) is the cause and stays; otherwise say where it stopped."""
    ran = record.get("always_results") or record.get("onerror_results") or record["chain_results"]
    last = ran[-1]["name"] if ran else "start"
    record["execution"] = "failed"
    record["error"] = record.get("error") or {
        "code": "Interrupted",
        "message": f"imgprep stopped during step {last}{note}",
    }
    verification = record.get("verification")
    if isinstance(verification, dict) and verification.get("status") in ("pending", "running"):
        # the image was never verified (and onerror discards it): say so, not "pending"
        verification["status"] = "failed"
        verification["error"] = {"code": "Interrupted", "message": f"imgprep stopped during step {last}"}


def recover(
    config: Config, job_uuid: str, *, events: EventSink | None = None, cancel: CancelToken | None = None
) -> Record:
    """Finish the rollback of an interrupted or failed job. Idempotent.

    Runs the job's ``always`` steps (and ``onerror``, if its image was not finished),
    with the connection of the operator's configuration -- never one taken from the
    record: a record whose stored connection differs is refused (InvalidInput). The
    configured retry policy applies, as in a create.
    """
    store = JobStore(config.state_dir)
    record = store.get(job_uuid)
    params = record["params"]
    vm_uuid = params.get("vm_uuid")
    if not vm_uuid or not record.get("vm_touched"):
        record.setdefault("recovery", []).append({"at": now(), "result": "nothing to do: the VM was never touched"})
        if record["execution"] in ("queued", "running") and not job_is_running(config, record):
            _mark_interrupted(record, " (before touching the VM)")
        store.save(record)
        return record
    with VmLock(config.state_dir, lock_key(params["backend"], vm_uuid)):
        record = store.get(job_uuid)  # re-read under the lock
        if record.get("vm_restored"):
            record.setdefault("recovery", []).append({"at": now(), "result": "nothing to do: already restored"})
            store.save(record)
            return record
        request = CreateRequest.from_json(record["request"])
        engine = Engine(record, store, events=events, retry=_retry(config), cancel=cancel)
        backend = backend_class(request.backend)(config, engine, request)
        with backend:
            backend.check_recovery_target()
            if record["execution"] in ("queued", "running"):
                _mark_interrupted(record)
            chain = backend.chain(_PLACEHOLDER)
            engine.recover(chain, discard=not record.get("manifest"))
        # the image first, the recovery's entry last: a reader that sees the entry sees
        # the image settled (the other way round, a crash between the two left the image
        # unsettled for good: a second recover finds the VM already restored)
        if params.get("image_uuid"):
            _settle_recovered_image(store, record)
        record.setdefault("recovery", []).append({"at": now(), "result": "restored"})
        store.save(record)
    return record


def _settle_recovered_image(store: JobStore, record: Record) -> None:
    """After recovery: a finished image (the job died restoring the VM) is active, else failed."""
    image_uuid = record["params"]["image_uuid"]
    file_path = record["state"].get("file_path")
    if record.get("manifest") and file_path and Path(file_path).exists():
        store.save_image(image_uuid, record["uuid"], "active", record["manifest"], file_path)
        return
    try:
        manifest, _, _ = store.get_image(image_uuid)
    except InvalidInput:
        manifest = {"uuid": image_uuid}
    if manifest.get("state") != "active":
        manifest.update(state="failed", error=record.get("error"))
        store.save_image(image_uuid, record["uuid"], "failed", manifest, None)


def chain_names(config: Config, backend: str = "libvirt", capture: str = "clone") -> dict[str, list[str]]:
    """The step names of a backend's chain -- ``create``, ``always``, ``onerror`` -- as every
    job of it runs them (nothing is connected to). ``capture``: the libvirt capture."""
    request = CreateRequest(
        vm="", image_uuid="", manifest={}, script=b"", script_name="", compression="none",
        output_dir=Path(), backend=backend, capture=capture if backend == "libvirt" else "in-place",
    )  # fmt: skip
    record = new_record(name="", params={}, chain=[], onerror=[], timeout=0)
    engine = Engine(record, cast(JobStore, None))
    chain = backend_class(backend)(config, engine, request).chain(_PLACEHOLDER)
    return {
        "create": [s.name for s in chain.create],
        "always": [s.name for s in chain.always],
        "onerror": [s.name for s in chain.onerror],
    }
