"""The scratch guard without a host: the free space and the view's end are fakes."""

from __future__ import annotations

import threading
from pathlib import Path

from imgprep.scratchguard import REACTION, VIEW_ROOM, MiB, ScratchGuard, Trip, view_room_problem


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


class Host:
    """The view directory's free space and the clock, set by the test between looks."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.now = 0.0

    def look(self, guard: ScratchGuard, *, after: float, free: int) -> Trip | None:
        self.now += after
        self.free = free
        return guard.poll()


def guard_on(host: Host, ender: Ender, reserve: int) -> ScratchGuard:
    guard = ScratchGuard(Path("/v"), reserve, ender, free=lambda _p: host.free, clock=lambda: host.now)
    guard.poll()  # the first look: no rate yet
    return guard


def test_a_fast_fall_trips_before_the_reserve_is_crossed() -> None:
    """A prototype overwriting faster than the reserve absorbs between two looks: the
    guard ends the view while the projected free space, not yet the free space, is
    below the reserve (a fixed threshold would be crossed, and the scratch filled,
    before the abort lands)."""
    host, ender = Host(1000 * MiB), Ender()
    guard = guard_on(host, ender, 48 * MiB)
    assert host.look(guard, after=0.1, free=995 * MiB) is None  # 50 MiB/s: 945 MiB left after REACTION
    trip = host.look(guard, after=0.1, free=880 * MiB)  # 1150 MiB/s: empty within REACTION
    assert trip is not None
    assert (trip.free, trip.rate, trip.ended) == (880 * MiB, 1150 * MiB, True)
    assert trip.free > trip.reserve  # control: a fixed threshold would not have tripped yet
    message = trip.message()
    assert "880 MiB free in /v, falling at 1150 MiB/s, below the reserve of 48 MiB" in message
    assert f"within {REACTION:g} s" in message
    assert ender.calls == 1


def test_a_burst_a_moment_ago_still_counts() -> None:
    """The rate is the fastest fall over the last second of looks, not the last one: a
    prototype that wrote in a burst a moment ago may again. A rise (files deleted) is
    no fall."""
    reserve = 1000 * MiB
    slow = [2080, 2060, 2040, 2020, 2000, 1980]  # 200 MiB/s: 1 s of it leaves 1780 MiB

    burst_host, burst = Host(2200 * MiB), Ender()
    guard = guard_on(burst_host, burst, reserve)
    assert burst_host.look(guard, after=0.1, free=2100 * MiB) is None  # 1000 MiB/s: 1100 MiB after 1 s
    assert burst_host.look(guard, after=0.1, free=2110 * MiB) is None  # a rise
    trips = [burst_host.look(guard, after=0.1, free=free * MiB) for free in slow]
    assert trips[:-1] == [None] * 5  # down to 2000: 1000 MiB after 1 s at the burst's rate, not below
    trip = trips[-1]
    assert trip is not None
    assert (trip.free, trip.rate) == (1980 * MiB, 1000 * MiB)
    assert burst.calls == 1

    # control: the same slow fall without the burst never trips
    host, ender = Host(2110 * MiB), Ender()
    guard = guard_on(host, ender, reserve)
    assert [host.look(guard, after=0.1, free=free * MiB) for free in slow] == [None] * 6
    assert ender.calls == 0


def test_a_slow_fall_leaves_the_view_alone_until_the_reserve() -> None:
    host, ender = Host(100 * MiB), Ender()
    guard = guard_on(host, ender, 48 * MiB)
    for free in range(99, 48, -1):  # 1 MiB/s: REACTION takes 1 MiB, still above the reserve
        assert host.look(guard, after=1.0, free=free * MiB) is None, free
    trip = host.look(guard, after=1.0, free=47 * MiB)
    assert trip is not None
    assert "47 MiB free in /v, below the reserve of 48 MiB (scratch_reserve_mib)" in trip.message()


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
    guard = ScratchGuard(Path("/v"), 10, ender, interval=0.01, free=lambda _p: next(readings, 5), reaction=0)
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
