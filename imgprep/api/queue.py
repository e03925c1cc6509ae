"""The job queue: a bounded pool of worker threads running jobs with the CLI's engine.

A job is saved as ``queued`` (its image ``creating``) before the create request is
answered, so ``GET /jobs/:uuid`` and ``GET /images/:uuid`` answer at once; a worker
then runs it with ``Job.run`` exactly as the CLI does. Jobs beyond the pool wait,
still ``queued``. One job per VM: a second create for a VM with a queued or running
job (here, or in another imgprep process holding the VM's lock) is refused.

Stopping (SIGTERM/SIGINT): jobs that never started are marked failed (``Interrupted``);
running jobs are canceled through their CancelToken, so they stop at the next safe
point and roll the VM back, and the server waits for that rollback.

Starting: whatever a previous server left behind is settled before serving. Jobs that
touched their VM without restoring it are recovered (rolled back) in a background
thread. Jobs that never touched their VM -- queued, or interrupted before the first
change -- are marked failed rather than re-run: the request may be hours old, the VM
may have changed since, and a client still polling gets a definite answer and can
create the image again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from imgprep.api.errors import ApiError
from imgprep.config import Config
from imgprep.errors import ImgprepError, InvalidInput, VmBusy
from imgprep.jobs import Job, job_is_running, job_needs_recovery, recover
from imgprep.jobstore import JobStore, Record
from imgprep.lock import is_locked, lock_key
from imgprep.sanitize import clean

log = logging.getLogger(__name__)
MAX_WAITING = 100  # queued jobs beyond the running ones; more is refused with 503


class LogEvents:
    """Job progress into the server log."""

    def emit(self, event: dict[str, Any]) -> None:
        if event.get("event") == "step" and event.get("status") != "started":
            log.info("job %s: %s %s", event.get("job_uuid"), event.get("step"), event.get("status"))
        elif event.get("event") == "guest":
            log.info("job %s: guest %s", event.get("job_uuid"), event.get("state"))


def settle_image(store: JobStore, record: Record) -> None:
    """Make a finished job's image agree with the job (it may still say ``creating``)."""
    image_uuid = record["params"].get("image_uuid")
    if not image_uuid or record["execution"] in ("queued", "running"):
        return
    try:
        manifest, _, job_uuid = store.get_image(image_uuid)
    except InvalidInput:
        return
    if manifest.get("state") != "creating" or job_uuid != record["uuid"]:
        return
    if record["execution"] == "succeeded" and record.get("manifest") and record["state"].get("file_path"):
        # the job finished but the process died before the image was marked active
        store.save_image(image_uuid, record["uuid"], "active", record["manifest"], record["state"]["file_path"])
        return
    error = record.get("error") or {"code": "InternalError", "message": "the job ended without a result"}
    manifest.update(state="failed", error=error)
    store.save_image(image_uuid, record["uuid"], "failed", manifest, None)


def fail_unstarted(store: JobStore, record: Record, error: dict[str, str]) -> None:
    """A job that never ran a step: failed, with the reason, and so is its image."""
    record["execution"] = "failed"
    record["error"] = error
    store.save(record)
    settle_image(store, record)


def settle_previous_run(config: Config, store: JobStore) -> list[str]:
    """Fail the jobs a previous run left that never touched their VM; list those to roll back."""
    to_recover: list[str] = []
    for record in store.list_jobs():
        if job_is_running(config, record):
            continue  # a live imgprep process (the CLI) is running it
        if job_needs_recovery(config, record):
            to_recover.append(record["uuid"])
            continue
        if record["execution"] in ("queued", "running"):
            log.warning("job %s was %s when imgprep stopped; marking it failed", record["uuid"], record["execution"])
            settle_image(store, recover(config, record["uuid"]))  # nothing to roll back: marks it failed
            continue
        settle_image(store, record)
    return to_recover


@dataclasses.dataclass
class _Entry:
    job: Job
    future: Future[None] | None = None


class JobQueue:
    def __init__(
        self,
        config: Config,
        store: JobStore,
        *,
        workers: int,
        on_success: Callable[[Record], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.workers = workers
        self.on_success = on_success
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgprep-job")
        self._lock = threading.Lock()
        self._by_vm: dict[str, _Entry] = {}
        self._closing = False
        self._recovery: threading.Thread | None = None

    # --- queries ----------------------------------------------------------------

    def job_for_vm(self, vm_uuid: str) -> str | None:
        with self._lock:
            entry = self._by_vm.get(vm_uuid.lower())
        return entry.job.uuid if entry else None

    def has_job(self, job_uuid: str) -> bool:
        with self._lock:
            return any(e.job.uuid == job_uuid for e in self._by_vm.values())

    def refuse_if_busy(self, vm_uuid: str) -> None:
        job_uuid = self.job_for_vm(vm_uuid)
        if job_uuid is not None:
            raise VmBusy(f"VM {vm_uuid} already has job {job_uuid} queued or running")

    # --- submit and run ---------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Save the job as queued and hand it to the pool; refuse if its VM is busy."""
        params = job.record["params"]
        vm_uuid = str(params["vm_uuid"]).lower()
        image_uuid = job.request.image_uuid
        with self._lock:
            if self._closing:
                raise ApiError(503, "ServiceUnavailableError", "the server is shutting down")
            if vm_uuid in self._by_vm:
                other = self._by_vm[vm_uuid].job
                raise VmBusy(f"VM {vm_uuid} already has job {other.uuid} {other.record['execution']}")
            if len(self._by_vm) >= self.workers + MAX_WAITING:
                raise ApiError(
                    503, "ServiceUnavailableError", f"too many jobs queued ({len(self._by_vm)}); retry later"
                )
            if is_locked(self.config.state_dir, lock_key(job.request.backend, vm_uuid)):
                raise VmBusy(f"VM {vm_uuid} is locked by another running imgprep job")
            try:
                self.store.get_image(image_uuid)
            except InvalidInput:
                pass
            else:
                raise ApiError(409, "ImageUuidAlreadyExists", f"image uuid {image_uuid} already exists")
            job.check_no_unrecovered()
            job.save_queued()
            entry = _Entry(job)
            self._by_vm[vm_uuid] = entry
            entry.future = self._pool.submit(self._run, entry, vm_uuid)
        log.info("job %s queued: image %s from VM %s", job.uuid, image_uuid, vm_uuid)

    def _run(self, entry: _Entry, vm_uuid: str) -> None:
        job = entry.job
        refusal: dict[str, str] | None = None
        try:
            log.info("job %s started", job.uuid)
            job.run()
            log.info("job %s succeeded", job.uuid)
        except ImgprepError as exc:
            refusal = exc.as_dict()
            log.warning("job %s %s: %s: %s", job.uuid, job.record["execution"], clean(exc.code), clean(exc.message))
        except Exception as exc:
            refusal = {"code": "InternalError", "message": f"{type(exc).__name__}: {exc}"}
            log.exception("job %s crashed", job.uuid)
        finally:
            if job.record["execution"] == "queued":
                # refused before its first step (e.g. another process took the VM's lock)
                fail_unstarted(self.store, job.record, refusal or {"code": "InternalError", "message": "not run"})
            settle_image(self.store, job.record)
            job.close()
            with self._lock:
                self._by_vm.pop(vm_uuid, None)
        if job.record["execution"] == "succeeded" and self.on_success is not None:
            try:
                self.on_success(job.record)
            except Exception:
                log.exception("job %s: post-success hook failed", job.uuid)

    # --- recovery and shutdown -----------------------------------------------------

    def start_recovery(self, job_uuids: list[str]) -> None:
        """Roll back, in the background, the VMs of jobs a previous run left unrestored."""
        if not job_uuids:
            return

        def run() -> None:
            for job_uuid in job_uuids:
                log.warning("recovering job %s (its VM was left unrestored)", job_uuid)
                try:
                    recover(self.config, job_uuid)
                except ImgprepError as exc:
                    log.error("recovery of job %s failed: %s: %s", job_uuid, exc.code, exc.message)
                except Exception:
                    log.exception("recovery of job %s crashed", job_uuid)
                try:
                    settle_image(self.store, self.store.get(job_uuid))
                except ImgprepError as exc:
                    log.error("job %s: cannot settle its image: %s", job_uuid, exc.message)

        self._recovery = threading.Thread(target=run, name="imgprep-recover")
        self._recovery.start()

    def shutdown(self, reason: str) -> None:
        """Fail the jobs that never started, cancel the running ones, wait for their rollback."""
        with self._lock:
            self._closing = True
            entries = list(self._by_vm.items())
        running = 0
        for vm_uuid, entry in entries:
            if entry.future is not None and entry.future.cancel():
                error = {
                    "code": "Interrupted",
                    "message": f"imgprep serve stopped ({reason}) before the job started; create the image again",
                }
                fail_unstarted(self.store, entry.job.record, error)
                entry.job.close()
                with self._lock:
                    self._by_vm.pop(vm_uuid, None)
            else:
                running += 1
                entry.job.engine.cancel.cancel(reason)
        if running:
            log.warning("stopping (%s): canceling %d running job(s); waiting for their rollback", reason, running)
        self._pool.shutdown(wait=True)
        if self._recovery is not None:
            self._recovery.join()
