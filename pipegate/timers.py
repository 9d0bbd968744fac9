"""
Pending calls on a clock: dropping one that is still pending (L{cancel}), and a
timeout that costs nothing when it moves later: an idle timeout touched per message or
per frame (L{IdleTimer}, all of a clock's on one pending call).
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


def cancel(call: IDelayedCall | IdleTimer | Deferred | None) -> None:
    """
    Cancel C{call} unless it is gone already (C{None}, fired or cancelled): a pending
    call on a clock, an L{IdleTimer} or a L{Deferred} still waiting for its result.
    Returns C{None}, so that C{self._timer = cancel(self._timer)} forgets it in the
    same line.
    """
    if isinstance(call, Deferred):
        if not call.called:
            call.cancel()
    elif call is not None and call.active():
        call.cancel()
    return None


class IdleTimer:
    """
    Calls C{on_idle()} once C{seconds} have passed without a L{touch}; with C{seconds}
    0 it never does, but still keeps L{last}.  A channel or flow touches once per
    message: a touch only records the time.

    All the idle timers of one clock share one pending call (L{_IdleSchedule}): a timer
    is an entry of a heap, about 120 bytes, not a C{DelayedCall} of its own (about 450
    with its dict, arguments and bound method), and there is one per tunnelled
    connection and per UDP flow.
    """

    __slots__ = ("clock", "seconds", "on_idle", "last", "_entry", "_schedule")

    def __init__(self, clock: IReactorTime, seconds: float, on_idle: Callable[[], object]) -> None:
        self.clock = clock
        self.seconds = seconds
        self.on_idle = on_idle
        self.last = clock.seconds()   # the last touch
        self._entry: tuple | None = None
        if seconds > 0:
            # (kept: one lookup per timer, not one more per cancel)
            self._schedule = _schedule_of(clock)
            self._schedule.add(self, self.last + seconds)

    def touch(self) -> None:
        self.last = self.clock.seconds()

    def active(self) -> bool:
        return self._entry is not None

    def cancel(self) -> None:
        if self._entry is not None:
            self._entry = None
            self._schedule.dropped()
        # Its heap entry stays until it comes due or the heap is compacted: the callback (a
        # bound method of a channel, a flow, a stream or a relay connection) must not keep its
        # owner alive that long.  A cancelled timer is never armed again.
        self.on_idle = _cancelled


def _cancelled() -> None:
    """The callback of a cancelled L{IdleTimer} (never called: its heap entry is dead)."""


class _IdleSchedule:
    """
    The idle timers of one clock: a heap of C{(due, number, timer)} and one pending call
    for the earliest.  A touch moves nothing: a timer found touched when its entry comes
    due is pushed again for what is left.  A cancelled
    timer's entry stays until it comes due or the heap is rebuilt (when more than half of
    it is cancelled entries), and with no timer left the pending call goes too.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.heap: list[tuple[float, int, IdleTimer]] = []
        self.live = 0
        self.numbers = itertools.count()
        self.call: IDelayedCall | None = None

    def add(self, timer: IdleTimer, due: float) -> None:
        self.live += 1
        self._push(timer, due)

    def _push(self, timer: IdleTimer, due: float) -> None:
        entry = (due, next(self.numbers), timer)
        timer._entry = entry
        heapq.heappush(self.heap, entry)
        call = self.call
        if call is None or not call.active():
            # (not active: cancelled by someone else, as trial does to a test's leftover calls)
            self.call = self.clock.callLater(max(0.0, self.heap[0][0] - self.clock.seconds()), self._run)
        elif due < call.getTime():
            call.reset(max(0.0, due - self.clock.seconds()))

    def dropped(self) -> None:
        self.live -= 1
        if self.live == 0:
            self.heap.clear()
            self.call = cancel(self.call)
        elif len(self.heap) > 64 and self.live < len(self.heap) // 2:
            # (in place: _run may be looping over this list, an on_idle having cancelled others)
            self.heap[:] = [entry for entry in self.heap if entry[2]._entry is entry]
            heapq.heapify(self.heap)

    def _run(self) -> None:
        self.call = None
        heap, now = self.heap, self.clock.seconds()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            timer = entry[2]
            if timer._entry is not entry:
                continue   # cancelled (or pushed again: this is its old entry)
            left = timer.last + timer.seconds - now
            if left > 0:
                self._push(timer, now + left)
                continue
            timer._entry = None
            self.live -= 1
            try:
                timer.on_idle()
            except Exception:
                self.log.failure("idle timeout callback {callback!r} failed", callback=timer.on_idle)
        if self.live == 0:
            heap.clear()   # only cancelled entries are left: nothing to wake up for
        elif heap and self.call is None:
            self.call = self.clock.callLater(max(0.0, heap[0][0] - now), self._run)


_schedules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _schedule_of(clock: IReactorTime) -> _IdleSchedule:
    schedule = _schedules.get(clock)
    if schedule is None:
        schedule = _schedules[clock] = _IdleSchedule(clock)
    return schedule
