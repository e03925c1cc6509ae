"""The workflow engine: a chain of named steps, an onerror chain, a persisted record.

The record has the shape of a node-workflow job (``chain``, ``onerror``,
``chain_results``, ``onerror_results`` with ``{name, result, error, started_at,
finished_at}``, ``execution``...). It is saved before and after every step, so a
crashed job shows exactly which step was under way.

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
    """Set by a signal handler; steps call ``check()`` at safe points."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(f"job canceled ({self.reason})")

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up (and raise) as soon as the job is canceled."""
        if self._event.wait(seconds):
            self.check()


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


def new_record(
    *,
    name: str,
    params: dict[str, Any],
    chain: Sequence[str],
    onerror: Sequence[str],
    timeout: float,
) -> Record:
    return {
        "uuid": str(uuidlib.uuid4()),
        "name": name,
        "execution": "queued",
        "params": params,
        "chain": [{"name": n} for n in chain],
        "onerror": [{"name": n} for n in onerror],
        "chain_results": [],
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
        self._t0 = time.monotonic()

    def save(self) -> None:
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
            log.exception("step %s crashed", step.name)
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

    def run(self, chain: Sequence[Step], onerror: Sequence[Step]) -> None:
        """Run the chain; on failure run onerror. Raises the chain's error, or RestoreFailed."""
        self.record["execution"] = "running"
        self.record["started"] = now()
        self.save()
        try:
            for step in chain:
                self.cancel.check()
                self._run_step(step, "chain_results")
        except BaseException as exc:
            error = exc if isinstance(exc, ImgprepError) else None
            if isinstance(exc, KeyboardInterrupt):
                error = Cancelled("job interrupted")
            if error is None:
                error = ImgprepError(f"{type(exc).__name__}: {exc}")
            self.record["error"] = error.as_dict()
            self.save()
            try:
                self.run_onerror(onerror)
            finally:
                # like node-workflow: "running" until the onerror chain is done, so a
                # client polling for a final state never acts while the VM is restored
                self.record["execution"] = "canceled" if isinstance(error, Cancelled) else "failed"
                self.save()
            if isinstance(exc, ImgprepError | KeyboardInterrupt):
                raise error from None
            raise
        self.record["execution"] = "succeeded"
        if self.record.get("vm_touched"):
            self.record["vm_restored"] = True  # the chain ends with the restore steps
        self.save()

    def run_onerror(self, onerror: Sequence[Step]) -> None:
        """Run every onerror step (each is idempotent); collect failures into RestoreFailed."""
        failures: list[str] = []
        for step in onerror:
            try:
                self._run_step(step, "onerror_results")
            except Exception as exc:  # keep restoring: one failed step must not skip the rest
                failures.append(f"{step.name}: {exc}")
        if failures:
            self.record["restore_error"] = "; ".join(failures)
            self.save()
            raise RestoreFailed(
                f"could not restore the VM ({'; '.join(failures)}); "
                f"run `imgprep jobs recover {self.record['uuid']}` once the cause is fixed"
            )
        if self.record.get("vm_touched"):
            self.record["vm_restored"] = True
        self.record.pop("restore_error", None)
        self.save()
