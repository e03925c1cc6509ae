"""The scratch space of a running prototype's point-in-time view, watched.

While a pull-mode backup job runs, QEMU copies every block the prototype overwrites
for the first time into a scratch file in the view directory. QEMU 7.2's
copy-before-write filter fails the *prototype's* write when that copy fails
(``on-cbw-error=break-guest-write``; with the default disk error policy QEMU then
pauses the prototype on ENOSPC), and neither libvirt 9.0 nor QMP can choose otherwise
for libvirt's backup job (docs/capture.md, *Scratch space*). So imgprep never lets
the directory fill:

* before the job: the view directory must have ``scratch_reserve`` free plus
  :data:`VIEW_ROOM` for the overlays and the first scratch blocks
  (:func:`view_room_problem`, part of validation);
* during it: :class:`ScratchGuard`, a thread polling the directory's free space, ends
  the backup job (the view) as soon as less than the reserve is left, or would be
  within :data:`REACTION` at the rate the free space is falling (a prototype writing
  fast crosses any fixed reserve between two looks), and resumes a prototype QEMU
  paused by a write error meanwhile. The job then fails with ``ScratchSpaceLow``: the
  view is gone, the prototype runs on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MiB = 1 << 20
VIEW_ROOM = 64 * MiB  # beyond the reserve: the overlays, logs and the first scratch blocks
POLL_INTERVAL = 0.1  # seconds between two looks at the free space (a statvfs: cheap)
# What the free space may still lose before the view is gone, in seconds at its current
# rate of fall: the next look, a libvirt connection and the abort (~0.3 s measured on a
# loaded 2-core host), with room to spare.
REACTION = 1.0
RATE_SAMPLES = 10  # the rate of fall is the fastest over this many recent looks (1 s)
END_ATTEMPTS = 30  # ending the view is retried (libvirtd may be restarting) ...
END_RETRY_DELAY = 1.0  # ... this many seconds apart


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer (QEMU's user) can still write where ``path`` lives."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (the view directory may not exist yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def view_room_problem(view_dir: Path, reserve: int, free: Callable[[Path], int] = free_bytes) -> str | None:
    """Validation: a problem line if the view directory cannot hold a view of a running
    prototype (the reserve the guard keeps, and room to begin with)."""
    need = reserve + VIEW_ROOM
    try:
        have = free(_existing(view_dir))
    except OSError as exc:
        return f"view_dir {view_dir}: cannot measure its free space: {exc.strerror}"
    if have >= need:
        return None
    return (
        f"not enough free space in view_dir {view_dir} for a point-in-time view of the running VM: "
        f"{have // MiB} MiB free, it needs {need // MiB} MiB (scratch_reserve_mib {reserve // MiB} "
        f"+ {VIEW_ROOM // MiB}); free space there, or point view_dir elsewhere"
    )


@dataclasses.dataclass(frozen=True)
class Trip:
    """What the guard saw and did when the free space fell below the reserve (or was
    falling fast enough to, within its reaction time)."""

    directory: str
    free: int
    reserve: int
    rate: int = 0  # bytes per second the free space was falling at (the fastest recent fall)
    ended: bool = False  # the backup job was ended
    resumed: bool = False  # the prototype, paused by a write error meanwhile, was resumed
    error: str | None = None  # ending the view failed (cleanup tries again)

    def message(self) -> str:
        action = (
            "imgprep ended the backup job before its scratch file could fill it and fail the prototype's writes"
            if self.ended
            else f"imgprep could not end the backup job ({self.error})"
            if self.error
            else "the backup job had already ended"
        )
        resumed = "; the prototype, paused by a write error meanwhile, was resumed" if self.resumed else ""
        where = (
            f"below the reserve of {self.reserve // MiB} MiB (scratch_reserve_mib)"
            if self.free < self.reserve
            else f"falling at {self.rate // MiB} MiB/s, below the reserve of {self.reserve // MiB} MiB "
            f"(scratch_reserve_mib) within {REACTION:g} s"
        )
        return (
            f"the scratch space of the point-in-time view ran low: {self.free // MiB} MiB free in {self.directory}, "
            f"{where}; {action}{resumed}. "
            "The prototype overwrote more during the job than the view directory could hold: no image is made "
            "from the ended view; free space in view_dir (or point it elsewhere) and run the job again"
        )

    def as_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


EndView = Callable[[], tuple[bool, bool]]  # -> (a backup job was ended, the prototype was resumed)


def projected(free: int, rate: float, reaction: float = REACTION) -> float:
    """The free space left after ``reaction`` seconds of falling at ``rate`` bytes/s."""
    return free - rate * reaction


class ScratchGuard:
    """Ends the view (``end_view``) once ``directory`` has less than ``reserve`` bytes
    free, or would have within ``reaction`` seconds at the fastest rate the free space
    fell between two recent looks; trips once. :meth:`poll` is one look (what the thread
    repeats every ``interval`` seconds); ``free`` and ``clock`` are the host's,
    replaceable in tests."""

    def __init__(
        self,
        directory: Path,
        reserve: int,
        end_view: EndView,
        *,
        interval: float = POLL_INTERVAL,
        free: Callable[[Path], int] = free_bytes,
        clock: Callable[[], float] = time.monotonic,
        reaction: float = REACTION,
        end_attempts: int = END_ATTEMPTS,
        end_retry_delay: float = END_RETRY_DELAY,
    ) -> None:
        self.directory = directory
        self.reserve = reserve
        self._end_view = end_view
        self.interval = interval
        self._free = free
        self._clock = clock
        self.reaction = reaction
        self._last: tuple[float, int] | None = None  # the previous look: (clock, free)
        self._rates: deque[float] = deque(maxlen=RATE_SAMPLES)  # bytes/s fallen between recent looks
        self._end_attempts = end_attempts
        self._end_retry_delay = end_retry_delay
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trip: Trip | None = None
        self._lock = threading.Lock()
        self._low: tuple[int, int] | None = None  # the free space and rate that tripped (the view is being ended)
        self._done = threading.Event()  # ... and ended: the trip is recorded

    @property
    def tripped(self) -> Trip | None:
        with self._lock:
            return self._trip

    def result(self, timeout: float = 90.0) -> Trip | None:
        """The trip, once the guard began ending the view (waiting, bounded, for it to
        finish: the job's check may see the backup job gone before the guard returns)."""
        with self._lock:
            low = self._low
        if low is None:
            return None
        self._done.wait(timeout)
        free, rate = low
        return self.tripped or Trip(str(self.directory), free, self.reserve, rate, error="still ending the backup job")

    def poll(self) -> Trip | None:
        """Look once; trip (end the view) if the free space is below the reserve, or will
        be within the reaction time at the recent rate of fall."""
        if self.tripped is not None:
            return self.tripped
        try:
            free = self._free(self.directory)
        except FileNotFoundError:
            return None  # the view directory is gone: the job is being cleaned up
        rate = self._rate(free)
        if free >= self.reserve and projected(free, rate, self.reaction) >= self.reserve:
            return None
        log.error(
            "view directory %s: %d MiB free, falling at %d MiB/s, reserve %d MiB: ending the view",
            self.directory,
            free // MiB,
            int(rate) // MiB,
            self.reserve // MiB,
        )
        with self._lock:
            self._low = (free, int(rate))
        trip = self._end(free, int(rate))
        with self._lock:
            self._trip = trip
        self._done.set()
        log.error("%s", trip.message())
        return trip

    def _rate(self, free: int) -> float:
        """Record this look; the fastest fall of the free space (bytes/s) over the recent
        looks (a rise, as when files are deleted, counts as no fall)."""
        now = self._clock()
        if self._last is not None and now > self._last[0]:
            self._rates.append(max(0.0, (self._last[1] - free) / (now - self._last[0])))
        self._last = (now, free)
        return max(self._rates, default=0.0)

    def _end(self, free: int, rate: int) -> Trip:
        last = ""
        for attempt in range(1, self._end_attempts + 1):
            try:
                ended, resumed = self._end_view()
                return Trip(str(self.directory), free, self.reserve, rate, ended=ended, resumed=resumed)
            except Exception as exc:  # any failure is retried, then reported in the trip
                last = str(exc)
                log.warning("ending the backup job failed (attempt %d): %s", attempt, last)
                if attempt < self._end_attempts and self._stop.wait(self._end_retry_delay):
                    break  # stopped: cleanup takes over
        return Trip(str(self.directory), free, self.reserve, rate, error=last or "stopped")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.poll() is not None:
                return

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="imgprep-scratch-guard", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
