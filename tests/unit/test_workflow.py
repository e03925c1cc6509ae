"""The workflow engine: step order, the persisted record, rollback, retries, cancel."""

from __future__ import annotations

import copy
import signal
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import tenacity

from imgprep.errors import (
    Cancelled,
    ImgprepError,
    InvalidInput,
    PrepareFailed,
    RestoreFailed,
    TransientError,
)
from imgprep.jobstore import JobStore, Record
from imgprep.workflow import (
    CancelToken,
    Chain,
    Engine,
    RetryPolicy,
    Step,
    cancel_on_signals,
    needs_recovery,
    new_record,
)

CHAIN = ["validate", "stop_vm", "checkpoint", "inject", "boot", "export", "restore", "restart"]
ONERROR = ["discard", "restore_disks", "delete_checkpoint", "restart_vm"]
RESULT_KEYS = {"name", "result", "error", "started_at", "finished_at"}


class SnapshotStore:
    """A JobStore stand-in that keeps a deep copy of every saved record."""

    def __init__(self) -> None:
        self.saves: list[Record] = []

    def save(self, record: Record) -> None:
        self.saves.append(copy.deepcopy(record))

    @property
    def last(self) -> Record:
        return self.saves[-1]


class Recorder:
    """Builds steps that append their name to ``ran`` (and can fail on demand)."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def step(self, name: str, fail: BaseException | None = None, then: Callable[[], None] | None = None) -> Step:
        def fn() -> None:
            self.ran.append(name)
            if then is not None:
                then()
            if fail is not None:
                raise fail

        return Step(name, fn)


def make_record(chain: list[str] = CHAIN, onerror: list[str] = ONERROR) -> Record:
    return new_record(
        name="create-from-vm-test",
        params={"vm_uuid": "11111111-1111-1111-1111-111111111111", "backend": "libvirt"},
        chain=chain,
        onerror=onerror,
        timeout=60,
    )


def no_sleep(_seconds: float) -> None:
    raise AssertionError("this test must not sleep")


def make_engine(
    record: Record | None = None,
    store: Any = None,
    *,
    attempts: int = 1,
    sleep: Callable[[float], None] = no_sleep,
    cancel: CancelToken | None = None,
) -> Engine:
    return Engine(
        record or make_record(),
        cast(JobStore, store if store is not None else SnapshotStore()),
        retry=RetryPolicy(attempts=attempts, max_seconds=60, sleep=sleep),
        cancel=cancel,
    )


# --- order and the record ------------------------------------------------------------


def test_chain_runs_in_order_and_succeeds_without_rollback() -> None:
    rec = Recorder()
    engine = make_engine()
    engine.run(Chain([rec.step(n) for n in CHAIN], onerror=[rec.step(n) for n in ONERROR]))
    assert rec.ran == CHAIN
    assert engine.record["execution"] == "succeeded"
    assert [r["name"] for r in engine.record["chain_results"]] == CHAIN
    assert all(r["result"] == "OK" and r["error"] is None for r in engine.record["chain_results"])
    assert engine.record["onerror_results"] == []
    assert engine.record["error"] is None


def test_record_is_saved_before_and_after_every_step() -> None:
    store = SnapshotStore()
    engine = make_engine(store=store)
    seen_during: dict[str, Record] = {}

    def step(name: str) -> Step:
        def fn() -> None:
            seen_during[name] = store.last  # what a crash right now would leave on disk

        return Step(name, fn)

    engine.run(Chain([step(n) for n in CHAIN], onerror=[]))
    for index, name in enumerate(CHAIN):
        during = seen_during[name]
        assert during["execution"] == "running"
        assert len(during["chain_results"]) == index + 1
        current = during["chain_results"][-1]
        assert set(current) == RESULT_KEYS
        assert current["name"] == name
        assert current["result"] is None
        assert current["error"] is None
        assert current["started_at"]
        assert current["finished_at"] is None  # started, not finished: visibly under way
        assert all(r["finished_at"] for r in during["chain_results"][:-1])
    # after each step a save shows it finished
    finished = [
        s["chain_results"][-1]["name"]
        for s in store.saves
        if s["chain_results"] and s["chain_results"][-1]["finished_at"] is not None
    ]
    for name in CHAIN:
        assert name in finished
    final = store.last["chain_results"]
    for r in final:
        assert set(r) == RESULT_KEYS
        assert r["started_at"] <= r["finished_at"]
    assert store.last["execution"] == "succeeded"


def test_record_round_trips_through_a_real_jobstore(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    rec = Recorder()
    engine = make_engine(store=store)
    engine.run(Chain([rec.step(n) for n in CHAIN[:3]], onerror=[]))
    saved = store.get(engine.record["uuid"])
    assert saved["execution"] == "succeeded"
    assert [r["name"] for r in saved["chain_results"]] == CHAIN[:3]
    assert saved["chain"] == [{"name": n} for n in CHAIN]
    assert isinstance(saved["elapsed"], float)


# --- rollback ------------------------------------------------------------------------


@pytest.mark.parametrize("position", range(len(CHAIN)))
def test_failure_at_every_chain_position_runs_the_whole_onerror_chain(position: int) -> None:
    rec = Recorder()
    failing = CHAIN[position]
    chain = [rec.step(n, fail=PrepareFailed("guest said no") if n == failing else None) for n in CHAIN]
    engine = make_engine()
    with pytest.raises(PrepareFailed, match="guest said no"):
        engine.run(Chain(chain, onerror=[rec.step(n) for n in ONERROR]))
    assert rec.ran == [*CHAIN[: position + 1], *ONERROR]  # later steps did not run
    record = engine.record
    assert record["execution"] == "failed"
    assert record["error"] == {"code": "PrepareImageError", "message": "guest said no"}
    assert record["chain_results"][-1]["name"] == failing
    assert record["chain_results"][-1]["error"] == {"code": "PrepareImageError", "message": "guest said no"}
    assert record["chain_results"][-1]["result"] is None
    assert record["chain_results"][-1]["finished_at"] is not None
    assert [r["name"] for r in record["onerror_results"]] == ONERROR
    assert all(r["result"] == "OK" for r in record["onerror_results"])


def test_execution_stays_running_until_the_onerror_chain_is_done() -> None:
    """A client polling for a final state must not see "failed" while the VM is restored."""
    seen: list[str] = []
    engine = make_engine()

    def observe() -> None:
        seen.append(engine.record["execution"])

    def fail() -> None:
        raise PrepareFailed("guest said no")

    with pytest.raises(PrepareFailed):
        engine.run(Chain([Step("prepare", fail)], onerror=[Step("restore", observe), Step("restart", observe)]))
    assert seen == ["running", "running"]
    assert engine.record["execution"] == "failed"


def test_a_crashing_step_is_recorded_as_internal_error_and_reraised() -> None:
    rec = Recorder()
    engine = make_engine()
    with pytest.raises(ZeroDivisionError):
        engine.run(Chain([rec.step("a"), rec.step("b", fail=ZeroDivisionError("oops"))], onerror=[rec.step("undo")]))
    assert rec.ran == ["a", "b", "undo"]
    assert engine.record["execution"] == "failed"
    assert engine.record["error"] == {"code": "InternalError", "message": "ZeroDivisionError: oops"}
    assert engine.record["chain_results"][-1]["error"]["code"] == "InternalError"


def test_failing_always_step_does_not_skip_the_others_and_raises_restore_failed() -> None:
    rec = Recorder()
    touched = Recorder()
    engine = make_engine()

    def touch() -> None:
        engine.record["vm_touched"] = True

    always = [
        rec.step("restore_disks", fail=ImgprepError("disk is gone")),
        rec.step("delete_checkpoint", fail=RuntimeError("libvirt crashed")),
        rec.step("restart_vm"),
    ]
    chain = [touched.step("stop_vm", then=touch), touched.step("inject", fail=PrepareFailed("x"))]
    with pytest.raises(RestoreFailed) as info:
        engine.run(Chain(chain, always=always, onerror=[rec.step("discard")]))
    assert rec.ran == ["discard", "restore_disks", "delete_checkpoint", "restart_vm"]
    message = info.value.message
    assert "restore_disks: disk is gone" in message
    assert "delete_checkpoint: libvirt crashed" in message
    assert f"imgprep jobs recover {engine.record['uuid']}" in message
    assert "kept" not in message  # the create failed: there is no image to keep
    record = engine.record
    assert record["restore_error"] == "restore_disks: disk is gone; delete_checkpoint: libvirt crashed"
    assert record["error"]["message"] == "x"  # the chain's error stays the job's error
    assert [r["error"] is None for r in record["always_results"]] == [False, False, True]
    assert record["vm_touched"] is True
    assert record["vm_restored"] is False
    assert needs_recovery(record, running=False)
    assert not needs_recovery(record, running=True)  # a live process may still finish it


def test_always_runs_after_success_and_failure_onerror_only_after_failure() -> None:
    for fails in (False, True):
        rec = Recorder()
        engine = make_engine()
        chain = Chain(
            [rec.step("export", fail=PrepareFailed("no") if fails else None)],
            always=[rec.step("restore"), rec.step("restart")],
            onerror=[rec.step("discard")],
        )
        if fails:
            with pytest.raises(PrepareFailed):
                engine.run(chain)
        else:
            engine.run(chain)
        assert rec.ran == (["export", "discard", "restore", "restart"] if fails else ["export", "restore", "restart"])
        assert [r["name"] for r in engine.record["always_results"]] == ["restore", "restart"]
        assert [r["name"] for r in engine.record["onerror_results"]] == (["discard"] if fails else [])
        assert engine.record["execution"] == ("failed" if fails else "succeeded")


def test_a_restore_failure_after_a_good_export_keeps_the_image_and_fails_the_job() -> None:
    """The bug of the two-copy rollback: a failed restore_disks after the export ran
    discard_output and deleted a finished, checksummed image."""
    rec = Recorder()
    engine = make_engine()

    def export() -> None:
        engine.record["vm_touched"] = True
        engine.record["state"]["file_path"] = "/images/u.qcow2"
        rec.ran.append("export")

    chain = Chain(
        [Step("export", export)],
        always=[rec.step("restore_disks", fail=ImgprepError("revert failed")), rec.step("restart_vm")],
        onerror=[rec.step("discard_output")],
    )
    with pytest.raises(RestoreFailed) as info:
        engine.run(chain)
    assert "discard_output" not in rec.ran  # the image stays
    assert rec.ran == ["export", "restore_disks", "restart_vm"]
    assert "the image /images/u.qcow2 is complete and was kept" in info.value.message
    assert f"imgprep jobs recover {engine.record['uuid']}" in info.value.message
    assert engine.record["execution"] == "failed"
    assert engine.record["error"]["code"] == "RestoreFailed"
    assert needs_recovery(engine.record, running=False)


def test_recover_runs_always_and_discards_only_when_asked() -> None:
    for discard in (False, True):
        rec = Recorder()
        record = make_record()
        record.update(vm_touched=True, execution="failed", restore_error="earlier failure")
        engine = make_engine(record)
        engine.recover(Chain([rec.step("never")], always=[rec.step("restore")], onerror=[rec.step("discard")]),
                       discard=discard)  # fmt: skip
        assert rec.ran == (["discard", "restore"] if discard else ["restore"])
        assert record["vm_restored"] is True
        assert "restore_error" not in record
        assert not needs_recovery(record, running=False)


def test_the_cancel_that_started_the_rollback_does_not_interrupt_it_a_second_one_does() -> None:
    token = CancelToken()
    engine = make_engine(cancel=token)
    waited: list[str] = []

    def cancel_now() -> None:
        token.cancel("SIGINT")
        token.check()

    def restore_wait() -> None:
        token.sleep(0)  # returns: the first cancel is shielded during the rollback
        waited.append("first")
        token.cancel("SIGINT")  # a second signal while restoring
        token.sleep(3600)  # must raise at once

    with pytest.raises(RestoreFailed):
        engine.run(Chain([Step("inject", cancel_now)], always=[Step("restore_disks", restore_wait)]))
    assert waited == ["first"]
    assert engine.record["always_results"][0]["error"]["code"] == "Canceled"
    assert engine.record["execution"] == "canceled"


# --- vm_touched / vm_restored bookkeeping ---------------------------------------------


def test_untouched_vm_is_never_marked_restored_nor_needs_recovery() -> None:
    rec = Recorder()
    engine = make_engine()
    with pytest.raises(InvalidInput):
        engine.run(Chain([rec.step("validate", fail=InvalidInput("bad"))], onerror=[rec.step("undo")]))
    assert engine.record["vm_touched"] is False
    assert engine.record["vm_restored"] is False
    assert not needs_recovery(engine.record, running=False)


@pytest.mark.parametrize("fails", [False, True])
def test_touched_vm_is_restored_after_success_or_rollback(fails: bool) -> None:
    rec = Recorder()
    engine = make_engine()

    def touch() -> None:
        engine.record["vm_touched"] = True

    chain = [rec.step("stop_vm", then=touch), rec.step("export", fail=PrepareFailed("no") if fails else None)]
    if fails:
        with pytest.raises(PrepareFailed):
            engine.run(Chain(chain, onerror=[rec.step("restore")]))
    else:
        engine.run(Chain(chain, onerror=[rec.step("restore")]))
    assert engine.record["vm_restored"] is True
    assert not needs_recovery(engine.record, running=False)
    assert ("restore" in rec.ran) is fails


def test_needs_recovery_truth_table() -> None:
    base = make_record()
    assert not needs_recovery(base, running=False)
    assert needs_recovery({**base, "vm_touched": True}, running=False)
    assert not needs_recovery({**base, "vm_touched": True}, running=True)
    assert not needs_recovery({**base, "vm_touched": True, "vm_restored": True}, running=False)


# --- retries -------------------------------------------------------------------------


class Flaky:
    def __init__(self, failures: int, exc: Callable[[], BaseException]) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc()


def test_transient_error_is_retried_with_the_injected_sleep() -> None:
    sleeps: list[float] = []
    flaky = Flaky(2, lambda: TransientError("domain is busy"))
    engine = make_engine(attempts=5, sleep=sleeps.append)
    engine.run(Chain([Step("boot", flaky)], onerror=[]))
    assert flaky.calls == 3
    assert len(sleeps) == 2
    assert all(s > 0 for s in sleeps)
    assert engine.record["execution"] == "succeeded"
    assert len(engine.record["chain_results"]) == 1  # retries live inside one step result
    assert engine.record["chain_results"][0]["result"] == "OK"


def test_transient_retries_are_bounded_by_attempts() -> None:
    sleeps: list[float] = []
    flaky = Flaky(100, lambda: TransientError("connection reset"))
    rec = Recorder()
    engine = make_engine(attempts=4, sleep=sleeps.append)
    with pytest.raises(TransientError, match="connection reset"):
        engine.run(Chain([Step("boot", flaky)], onerror=[rec.step("undo")]))
    assert flaky.calls == 4
    assert len(sleeps) == 3
    assert rec.ran == ["undo"]
    assert engine.record["error"]["code"] == "TransientError"


def test_transient_retries_are_bounded_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """tenacity reads ``time.monotonic`` through its module: give it a fake clock."""
    clock = [1000.0]
    monkeypatch.setattr(tenacity, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    def fake_sleep(seconds: float) -> None:
        clock[0] += seconds

    def slow_failure() -> TransientError:
        clock[0] += 40  # each attempt takes 40 s of (fake) time
        return TransientError("slow and failing")

    flaky = Flaky(100, slow_failure)
    policy = RetryPolicy(attempts=100, max_seconds=60, sleep=fake_sleep)
    engine = Engine(make_record(), cast(JobStore, SnapshotStore()), retry=policy)
    with pytest.raises(TransientError):
        engine.run(Chain([Step("boot", flaky)], onerror=[]))
    # attempt 1 ends at 40 s (< 60: retry), attempt 2 ends past 80 s: the time bound stops it
    assert flaky.calls == 2
    assert clock[0] - 1000.0 < 100


@pytest.mark.parametrize(
    "exc",
    [
        lambda: PrepareFailed("wrong answer"),
        lambda: InvalidInput("bad input"),
        lambda: ImgprepError("plain"),
        lambda: RuntimeError("bug"),
        lambda: OSError("disk full"),
    ],
    ids=["PrepareFailed", "InvalidInput", "ImgprepError", "RuntimeError", "OSError"],
)
def test_non_transient_errors_are_not_retried(exc: Callable[[], BaseException]) -> None:
    sleeps: list[float] = []
    flaky = Flaky(100, exc)
    engine = make_engine(attempts=5, sleep=sleeps.append)
    with pytest.raises(type(exc())):
        engine.run(Chain([Step("export", flaky)], onerror=[]))
    assert flaky.calls == 1
    assert sleeps == []


# --- cancel --------------------------------------------------------------------------


def test_cancel_is_honoured_at_the_next_safe_point_and_rolls_back() -> None:
    rec = Recorder()
    token = CancelToken()
    engine = make_engine(cancel=token)
    chain = [
        rec.step("stop_vm"),
        rec.step("checkpoint", then=lambda: token.cancel("SIGTERM")),
        rec.step("inject"),
    ]
    with pytest.raises(Cancelled, match="SIGTERM"):
        engine.run(Chain(chain, onerror=[rec.step(n) for n in ONERROR]))
    assert rec.ran == ["stop_vm", "checkpoint", *ONERROR]
    assert engine.record["execution"] == "canceled"
    assert engine.record["error"]["code"] == "Canceled"
    assert [r["name"] for r in engine.record["chain_results"]] == ["stop_vm", "checkpoint"]
    assert engine.record["chain_results"][-1]["result"] == "OK"  # it finished before the cancel point
    assert [r["name"] for r in engine.record["onerror_results"]] == ONERROR


def test_cancelled_raised_inside_a_step_cancels_the_job() -> None:
    rec = Recorder()
    token = CancelToken()

    def wait_in_guest() -> None:
        token.cancel("SIGINT")
        token.sleep(3600)  # must return at once (and raise) because the token is set

    engine = make_engine(cancel=token)
    with pytest.raises(Cancelled):
        engine.run(Chain([Step("wait_result", wait_in_guest)], onerror=[rec.step("restore")]))
    assert engine.record["execution"] == "canceled"
    assert engine.record["chain_results"][-1]["error"]["code"] == "Canceled"
    assert rec.ran == ["restore"]


def test_keyboard_interrupt_in_a_step_becomes_cancelled_and_the_step_is_not_ok() -> None:
    rec = Recorder()
    store = SnapshotStore()
    engine = make_engine(store=store)
    with pytest.raises(Cancelled, match="interrupted"):
        engine.run(Chain([rec.step("inject", fail=KeyboardInterrupt())], onerror=[rec.step("restore")]))
    assert engine.record["execution"] == "canceled"
    assert rec.ran == ["inject", "restore"]
    interrupted = store.last["chain_results"][-1]
    assert interrupted["name"] == "inject"
    assert interrupted["result"] != "OK"  # an interrupted step did not succeed
    assert interrupted["error"] is not None
    assert interrupted["finished_at"] is not None


def test_cancel_token() -> None:
    token = CancelToken()
    assert not token.is_set
    token.check()  # no-op while not set
    token.cancel("SIGTERM")
    assert token.is_set
    with pytest.raises(Cancelled, match=r"job canceled \(SIGTERM\)"):
        token.check()


def test_cancel_on_signals_sets_the_token_and_restores_handlers() -> None:
    token = CancelToken()
    before = signal.getsignal(signal.SIGTERM)
    with cancel_on_signals(token):
        signal.raise_signal(signal.SIGTERM)
        assert token.is_set
        assert token.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
