"""The workflow engine: a job's chain in three parts, and its persisted record.

A ``Chain`` is ``create`` (the steps that make the image), ``always`` (restore the VM:
a ``finally``, run after success and after failure, and again by ``imgprep jobs
recover``) and ``onerror`` (discard the output: run only when the create steps did not
all succeed, so a finished image is never deleted because a later restore failed).

The record has the shape of a node-workflow job (``chain``, ``onerror``,
``chain_results``, ``onerror_results`` with ``{name, result, error, started_at,
finished_at}``, ``execution``...) plus ``always``/``always_results``. It is saved
before and after every step, so a crashed job shows exactly which step was under way.

Only ``TransientError`` is retried, bounded by attempts *and* time; the sleep
function is injectable so tests never sleep.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import signal
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import tenacity

from imgprep.errors import Cancelled, ImgprepError, RestoreFailed, TransientError
from imgprep.jobstore import JobStore, Record

log = logging.getLogger(__name__)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventSink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...


class NullEvents:
    def emit(self, event: dict[str, Any]) -> None:
        log.debug("event %s", event)


class CancelToken:
    """Set by a signal handler; steps call ``check()`` at safe points.

    Every cancel path raises the one ``Cancelled``. While the VM is being restored
    (``shielded()``), the cancel that started the rollback no longer counts: only a
    further one interrupts a restore wait (the job then needs ``imgprep jobs recover``).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())  # re-entrant: cancel() runs in a signal handler
        self._count = 0
        self._floor = 0
        self.reason = ""

    def cancel(self, reason: str) -> None:
        with self._cond:
            self.reason = reason
            self._count += 1
            self._cond.notify_all()

    @property
    def is_set(self) -> bool:
        return self._count > self._floor

    def check(self) -> None:
        if self.is_set:
            raise Cancelled(f"job canceled ({self.reason})")

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up (and raise Cancelled) as soon as the job is canceled."""
        with self._cond:
            self._cond.wait_for(lambda: self.is_set, timeout=seconds)
        self.check()

    @contextmanager
    def shielded(self) -> Iterator[None]:
        """Ignore the cancels so far (the rollback they asked for must run)."""
        floor = self._floor
        self._floor = self._count
        try:
            yield
        finally:
            self._floor = floor


@contextmanager
def cancel_on_signals(token: CancelToken) -> Iterator[None]:
    """SIGINT/SIGTERM request a cancel at the next safe point (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        token.cancel(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    max_seconds: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def call(
        self, name: str, fn: Callable[[], None], on_retry: Callable[[int, BaseException | None], None] | None = None
    ) -> None:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning("step %s: transient failure (attempt %d): %s", name, state.attempt_number, error)
            if on_retry is not None:
                on_retry(state.attempt_number, error)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(TransientError),
            stop=tenacity.stop_after_attempt(self.attempts) | tenacity.stop_after_delay(self.max_seconds),
            wait=tenacity.wait_exponential(multiplier=0.5, max=10),
            sleep=self.sleep,
            reraise=True,
            before_sleep=before_sleep,
        )
        retrying(fn)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[[], None]


@dataclasses.dataclass(frozen=True)
class Chain:
    """A job's steps: ``create``, then ``always`` (a finally), ``onerror`` only on failure."""

    create: Sequence[Step]
    always: Sequence[Step] = ()
    onerror: Sequence[Step] = ()

    def names(self) -> dict[str, list[dict[str, str]]]:
        """The record's ``chain``/``always``/``onerror`` lists."""
        return {
            "chain": [{"name": s.name} for s in self.create],
            "always": [{"name": s.name} for s in self.always],
            "onerror": [{"name": s.name} for s in self.onerror],
        }


def new_record(
    *,
    name: str,
    params: dict[str, Any],
    chain: Sequence[str],
    onerror: Sequence[str],
    timeout: float,
    always: Sequence[str] = (),
) -> Record:
    return {
        "uuid": str(uuidlib.uuid4()),
        "name": name,
        "execution": "queued",
        "params": params,
        "chain": [{"name": n} for n in chain],
        "always": [{"name": n} for n in always],
        "onerror": [{"name": n} for n in onerror],
        "chain_results": [],
        "always_results": [],
        "onerror_results": [],
        "created_at": now(),
        "started": None,
        "elapsed": None,
        "timeout": timeout,
        "error": None,
        "state": {},
        "vm_touched": False,
        "vm_restored": False,
    }


def needs_recovery(record: Record, running: bool) -> bool:
    """A job whose VM was touched and not restored, and that no live process is running."""
    return bool(record.get("vm_touched")) and not record.get("vm_restored") and not running


class Engine:
    """Runs a job's chain and onerror chain, persisting the record around each step."""

    def __init__(
        self,
        record: Record,
        store: JobStore,
        *,
        events: EventSink | None = None,
        retry: RetryPolicy | None = None,
        cancel: CancelToken | None = None,
    ) -> None:
        self.record = record
        self.store = store
        self.events = events or NullEvents()
        self.retry = retry or RetryPolicy()
        self.cancel = cancel or CancelToken()
        self.before_save: Callable[[], None] = lambda: None  # the backend serializes its typed state
        self._t0 = time.monotonic()

    def save(self) -> None:
        self.before_save()
        self.record["elapsed"] = round(time.monotonic() - self._t0, 3)
        self.store.save(self.record)

    def emit(self, event: dict[str, Any]) -> None:
        self.events.emit({"job_uuid": self.record["uuid"], **event})

    def _run_step(self, step: Step, results_key: str) -> None:
        result: dict[str, Any] = {
            "name": step.name,
            "result": None,
            "error": None,
            "started_at": now(),
            "finished_at": None,
        }
        self.record[results_key].append(result)
        self.save()
        self.emit({"event": "step", "step": step.name, "status": "started", "chain": results_key})
        t0 = time.monotonic()

        def on_retry(attempt: int, error: BaseException | None) -> None:
            result.setdefault("retries", []).append({"attempt": attempt, "error": str(error), "at": now()})
            self.save()
            self.emit({"event": "retry", "step": step.name, "attempt": attempt, "error": str(error)})

        try:
            self.retry.call(step.name, step.fn, on_retry)
        except ImgprepError as exc:
            result["error"] = exc.as_dict()
            raise
        except Exception as exc:
            log.error("step %s crashed: %s: %s", step.name, type(exc).__name__, exc)
            log.debug("step %s crashed", step.name, exc_info=True)
            result["error"] = {"code": "InternalError", "message": f"{type(exc).__name__}: {exc}"}
            raise
        except BaseException as exc:  # KeyboardInterrupt/SystemExit: the step did not finish OK either
            result["error"] = {"code": Cancelled.code, "message": f"step interrupted ({type(exc).__name__})"}
            raise
        finally:
            result["finished_at"] = now()
            elapsed = round(time.monotonic() - t0, 3)
            if result["error"] is None:
                result["result"] = "OK"
            self.save()
            self.emit(
                {
                    "event": "step",
                    "step": step.name,
                    "status": "failed" if result["error"] else "finished",
                    "elapsed": elapsed,
                    "chain": results_key,
                    **({"error": result["error"]} if result["error"] else {}),
                }
            )

    def run(self, chain: Chain) -> None:
        """Run ``create``; on failure ``onerror``; then always ``always``.

        Raises the create error (the VM restored), or RestoreFailed when an always step
        failed -- after a good export the image is kept and the message says so.
        """
        self.record["execution"] = "running"
        self.record["started"] = now()
        self.save()
        error: ImgprepError | None = None
        crash: BaseException | None = None
        restore: RestoreFailed | None = None
        try:
            for step in chain.create:
                self.cancel.check()
                self._run_step(step, "chain_results")
        except BaseException as exc:
            error, crash = _as_error(exc)
            self.record["error"] = error.as_dict()
            self.save()
        with self.cancel.shielded():
            try:
                if error is not None:
                    self._discard(chain.onerror)
                restore = self.run_always(chain.always, image_kept=error is None)
            finally:
                # like node-workflow: "running" until the rollback is done, so a client
                # polling for a final state never acts while the VM is being restored
                if error is None and restore is None:
                    self.record["execution"] = "succeeded"
                else:
                    self.record["execution"] = "canceled" if isinstance(error, Cancelled) else "failed"
                self.save()
        if restore is not None:
            if error is None:
                self.record["error"] = restore.as_dict()
                self.save()
            raise restore from None
        if crash is not None:
            raise crash
        if error is not None:
            raise error from None

    def _run_all(self, steps: Sequence[Step], results_key: str) -> list[str]:
        """Run every step (each is idempotent), one failure not skipping the rest."""
        failures: list[str] = []
        for step in steps:
            try:
                self._run_step(step, results_key)
            except Exception as exc:
                failures.append(f"{step.name}: {exc}")
        return failures

    def _discard(self, onerror: Sequence[Step]) -> None:
        failures = self._run_all(onerror, "onerror_results")
        if failures:
            log.warning("could not discard the output: %s", "; ".join(failures))
            self.record["discard_error"] = "; ".join(failures)
            self.save()

    def run_always(self, always: Sequence[Step], *, image_kept: bool = False) -> RestoreFailed | None:
        """Restore the VM (the ``always`` steps); a RestoreFailed to raise, or None."""
        failures = self._run_all(always, "always_results")
        if failures:
            self.record["restore_error"] = "; ".join(failures)
            self.save()
            kept = ""
            if image_kept and self.record.get("state", {}).get("file_path"):
                kept = f"the image {self.record['state']['file_path']} is complete and was kept, but "
            return RestoreFailed(
                f"{kept}could not restore the VM ({'; '.join(failures)}); "
                f"run `imgprep jobs recover {self.record['uuid']}` once the cause is fixed"
            )
        if self.record.get("vm_touched"):
            self.record["vm_restored"] = True
        self.record.pop("restore_error", None)
        self.save()
        return None

    def recover(self, chain: Chain, *, discard: bool) -> None:
        """What ``imgprep jobs recover`` runs: ``onerror`` (if ``discard``), then ``always``."""
        if discard:
            self._discard(chain.onerror)
        restore = self.run_always(chain.always)
        if restore is not None:
            raise restore


def _as_error(exc: BaseException) -> tuple[ImgprepError, BaseException | None]:
    """The job's error for what a create step raised, and the exception to re-raise as is
    (a crash: its traceback matters), if any."""
    if isinstance(exc, ImgprepError):
        return exc, None
    if isinstance(exc, KeyboardInterrupt):
        return Cancelled("job interrupted"), None
    return ImgprepError(f"{type(exc).__name__}: {exc}"), exc
