"""Create-image jobs and their recovery: the one place the CLI and the HTTP API call."""

from __future__ import annotations

import logging
import os
import uuid as uuidlib
from pathlib import Path
from typing import Any

from imgprep.artifacts import artifact
from imgprep.backends.base import Backend, CreateRequest
from imgprep.config import COMPRESSIONS, Config
from imgprep.errors import ImgprepError, InvalidInput, VmBusy
from imgprep.jobstore import JobStore, Record
from imgprep.lock import VmLock, is_locked, lock_key
from imgprep.manifest import validate_user_manifest
from imgprep.outputfiles import output_dir_problem
from imgprep.uuids import is_canonical
from imgprep.workflow import (
    CancelToken,
    Engine,
    EventSink,
    RetryPolicy,
    needs_recovery,
    new_record,
    now,
)

log = logging.getLogger(__name__)


def backend_class(name: str) -> type[Backend]:
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
    if backend == "smartos" and not host:
        problems.append("--host is required with --backend smartos")
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
    )


def job_is_running(config: Config, record: Record) -> bool:
    """True while a live process holds the lock of the job's VM and the job runs."""
    if record["execution"] not in ("queued", "running"):
        return False
    vm_uuid = record["params"].get("vm_uuid")
    return bool(vm_uuid) and is_locked(config.state_dir, lock_key(record["params"]["backend"], vm_uuid))


def job_needs_recovery(config: Config, record: Record) -> bool:
    return needs_recovery(record, running=job_is_running(config, record))


class Job:
    """One create job: validated, then run under the VM's lock."""

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
        params = request.params() | {"libvirt_uri": config.libvirt_uri}
        self.record = new_record(name=f"create-from-vm-{request.vm}", params=params, chain=[], onerror=[], timeout=0)
        self.engine = Engine(
            self.record,
            self.store,
            events=events,
            cancel=cancel,
            retry=retry or RetryPolicy(config.retry_attempts, config.retry_max_seconds),
        )
        self.backend = backend_class(request.backend)(config, self.engine)
        self.record["chain"] = [{"name": s.name} for s in self.backend.chain(request)]
        self.record["onerror"] = [{"name": s.name} for s in self.backend.onerror()]
        t = config.timeouts
        self.record["timeout"] = t.stop + t.boot + t.prepare + t.shutdown

    @property
    def uuid(self) -> str:
        return str(self.record["uuid"])

    def validate(self) -> None:
        """Check the VM (nothing touched). Raises InvalidInput."""
        try:
            facts = self.backend.validate()
        except VmBusy:
            # the checkpoint of a job that is still running looks like a leftover: say which
            vm = self.request.vm
            for other in self.store.list_jobs():
                names = {other["params"].get("vm"), other["params"].get("vm_uuid"), other["state"].get("vm_name")}
                if vm in names and job_is_running(self.config, other):
                    raise VmBusy(f"VM {vm} is locked by another running imgprep job ({other['uuid']})") from None
            raise
        self.record["params"]["vm_uuid"] = facts.uuid
        self.record["state"].update(vm_uuid=facts.uuid, vm_name=facts.name, learned=facts.learned)
        self.record["target"] = f"/vms/{facts.uuid}"

    def check_no_unrecovered(self) -> None:
        vm_uuid = self.record["params"]["vm_uuid"]
        for other in self.store.list_jobs(vm_uuid=vm_uuid):
            if other["uuid"] != self.uuid and needs_recovery(other, running=False):
                raise VmBusy(
                    f"VM {vm_uuid} was left unrestored by job {other['uuid']}; "
                    f"run `imgprep jobs recover {other['uuid']}` first"
                )

    def save_queued(self) -> None:
        self.store.save(self.record)
        self.store.save_image(self.request.image_uuid, self.uuid, "creating", self._pending_manifest(), None)

    def _pending_manifest(self) -> dict[str, Any]:
        return {
            "v": 2,
            "uuid": self.request.image_uuid,
            "state": "creating",
            **{k: v for k, v in self.request.manifest.items() if k != "uuid"},
        }

    def run(self) -> Record:
        """Take the VM's lock, run the chain (rollback on failure), update the image."""
        vm_uuid = self.record["params"]["vm_uuid"]
        with VmLock(self.config.state_dir, lock_key(self.request.backend, vm_uuid)):
            self.check_no_unrecovered()
            self.save_queued()
            try:
                self.engine.run(self.backend.chain(self.request), self.backend.onerror())
            except ImgprepError as exc:
                manifest = self._pending_manifest() | {"state": "failed", "error": exc.as_dict()}
                self.store.save_image(self.request.image_uuid, self.uuid, "failed", manifest, None)
                raise
            self.store.save_image(
                self.request.image_uuid,
                self.uuid,
                "active",
                self.record["manifest"],
                self.record["state"]["file_path"],
            )
        return self.record


def _mark_interrupted(record: Record, note: str = "") -> None:
    """A job its process left queued or running: failed. An error it already had (it
    died while rolling back) is the cause and stays; otherwise say where it stopped."""
    last = record["chain_results"][-1]["name"] if record["chain_results"] else "start"
    record["execution"] = "failed"
    record["error"] = record.get("error") or {
        "code": "Interrupted",
        "message": f"imgprep stopped during step {last}{note}",
    }


def recover(config: Config, job_uuid: str, *, events: EventSink | None = None) -> Record:
    """Finish the rollback of an interrupted or failed job. Idempotent."""
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
    job_config = config.with_overrides(libvirt_uri=params.get("libvirt_uri"))
    with VmLock(config.state_dir, lock_key(params["backend"], vm_uuid)):
        record = store.get(job_uuid)  # re-read under the lock
        if record["execution"] in ("queued", "running"):
            _mark_interrupted(record)
        engine = Engine(record, store, events=events)
        backend = backend_class(params["backend"])(job_config, engine)
        if record.get("vm_restored"):
            record.setdefault("recovery", []).append({"at": now(), "result": "nothing to do: already restored"})
            store.save(record)
            return record
        engine.run_onerror(backend.onerror())
        record.setdefault("recovery", []).append({"at": now(), "result": "restored"})
        store.save(record)
        if params.get("image_uuid"):
            try:
                manifest, _, _ = store.get_image(params["image_uuid"])
            except InvalidInput:
                manifest = {"uuid": params["image_uuid"]}
            if manifest.get("state") != "active":
                manifest.update(state="failed", error=record.get("error"))
                store.save_image(params["image_uuid"], job_uuid, "failed", manifest, None)
    return record
