"""The scratch guard without a host: the free space and the view's end are fakes."""

from __future__ import annotations

import threading
from pathlib import Path

from imgprep.scratchguard import VIEW_ROOM, MiB, ScratchGuard, view_room_problem


def test_view_room_needs_the_reserve_and_room_to_begin(tmp_path: Path) -> None:
    reserve = 100 * MiB
    assert view_room_problem(tmp_path, reserve, free=lambda _p: reserve + VIEW_ROOM) is None
    problem = view_room_problem(tmp_path, reserve, free=lambda _p: reserve + VIEW_ROOM - 1)
    assert problem is not None
    assert f"view_dir {tmp_path}" in problem
    assert "it needs 164 MiB" in problem


def test_view_room_of_a_view_dir_not_made_yet_is_its_parents(tmp_path: Path) -> None:
    seen: list[Path] = []

    def free(path: Path) -> int:
        seen.append(path)
        return 1 << 40

    assert view_room_problem(tmp_path / "views" / "not" / "yet", MiB, free=free) is None
    assert seen == [tmp_path]


class Ender:
    """The view's end: fails ``failures`` times, then ends it."""

    def __init__(self, failures: int = 0, resumed: bool = False) -> None:
        self.failures = failures
        self.resumed = resumed
        self.calls = 0
        self.done = threading.Event()

    def __call__(self) -> tuple[bool, bool]:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("libvirtd is restarting")
        self.done.set()
        return True, self.resumed


def test_the_guard_does_nothing_while_the_reserve_is_free() -> None:
    ender = Ender()
    guard = ScratchGuard(Path("/v"), 100, ender, free=lambda _p: 100)
    assert guard.poll() is None
    assert guard.tripped is None
    assert ender.calls == 0


def test_below_the_reserve_the_guard_ends_the_view_once() -> None:
    ender = Ender(resumed=True)
    free = [50 * MiB]
    guard = ScratchGuard(Path("/v"), 64 * MiB, ender, free=lambda _p: free[0])
    trip = guard.poll()
    assert trip is not None
    assert (trip.ended, trip.resumed, trip.free, trip.reserve) == (True, True, 50 * MiB, 64 * MiB)
    message = trip.message()
    assert "50 MiB free in /v" in message
    assert "reserve of 64 MiB" in message
    assert "ended the backup job" in message
    assert "was resumed" in message
    free[0] = 1 << 40  # (libvirt deleted the scratch files)
    assert guard.poll() == trip
    assert ender.calls == 1


def test_ending_the_view_is_retried_then_reported() -> None:
    ender = Ender(failures=2)
    guard = ScratchGuard(Path("/v"), 10, ender, free=lambda _p: 0, end_retry_delay=0)
    trip = guard.poll()
    assert trip is not None
    assert trip.ended
    assert ender.calls == 3

    never = Ender(failures=99)
    guard = ScratchGuard(Path("/v"), 10, never, free=lambda _p: 0, end_attempts=4, end_retry_delay=0)
    trip = guard.poll()
    assert trip is not None
    assert not trip.ended
    assert trip.error == "libvirtd is restarting"
    assert "could not end the backup job" in trip.message()
    assert never.calls == 4


def test_a_removed_view_directory_is_not_a_trip() -> None:
    def gone(_path: Path) -> int:
        raise FileNotFoundError(2, "No such file or directory")

    ender = Ender()
    assert ScratchGuard(Path("/v"), 10, ender, free=gone).poll() is None
    assert ender.calls == 0


def test_the_thread_watches_until_the_space_runs_low_then_stops() -> None:
    readings = iter([100, 90, 80, 5])
    ender = Ender()
    guard = ScratchGuard(Path("/v"), 10, ender, interval=0.01, free=lambda _p: next(readings, 5))
    guard.start()
    try:
        assert ender.done.wait(30), "the guard never ended the view"
    finally:
        guard.stop()
    trip = guard.tripped
    assert trip is not None
    assert trip.free == 5
    assert ender.calls == 1


def test_a_check_while_the_guard_ends_the_view_waits_for_its_trip() -> None:
    """The job's check may find the backup job gone before the guard has returned: it
    must still report the guard's trip (ScratchSpaceLow), not a job ended elsewhere."""
    release = threading.Event()
    ending = threading.Event()

    def end_view() -> tuple[bool, bool]:
        ending.set()
        assert release.wait(30)
        return True, False

    guard = ScratchGuard(Path("/v"), 10, end_view, free=lambda _p: 0)
    assert guard.result() is None  # control: nothing seen yet
    poller = threading.Thread(target=guard.poll)
    poller.start()
    try:
        assert ending.wait(30)
        results: list[object] = []
        checker = threading.Thread(target=lambda: results.append(guard.result()))
        checker.start()
        release.set()
        checker.join(30)
    finally:
        release.set()
        poller.join(30)
    (trip,) = results
    assert trip == guard.tripped
    assert guard.tripped is not None
    assert guard.tripped.ended
