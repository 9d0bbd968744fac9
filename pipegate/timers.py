"""
Pending calls on a clock: dropping one that is still pending (L{cancel}), and two
timeouts that cost nothing when they move later, on one lazily re-made call: an idle
timeout touched per message (L{IdleTimer}) and a deadline set per frame (L{Deadline}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime


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


class _LazyCall:
    """
    One pending call on a clock for a time that may move later at no cost: moving it only
    records the new time, and the call, when it comes early, is made again for what is
    left (a re-armed DelayedCall, C{active} and C{reset}, is a heap operation).  Subclasses
    say how much is left (L{_remaining}) and what happens then (L{_expire}).
    """

    __slots__ = ("clock", "_call")

    def _remaining(self) -> float:
        raise NotImplementedError

    def _expire(self) -> None:
        raise NotImplementedError

    def _check(self) -> None:
        remaining = self._remaining()
        if remaining > 0:
            self._call = self.clock.callLater(remaining, self._check)
            return
        self._call = None
        self._expire()

    def active(self) -> bool:
        return self._call is not None

    def cancel(self) -> None:
        self._call = cancel(self._call)


class IdleTimer(_LazyCall):
    """
    Calls C{on_idle()} once C{seconds} have passed without a L{touch}; with C{seconds}
    0 it never does, but still keeps L{last}.  A channel or flow touches once per
    message: a touch only records the time.
    """

    __slots__ = ("seconds", "on_idle", "last")

    def __init__(self, clock: IReactorTime, seconds: float, on_idle: Callable[[], object]) -> None:
        self.clock = clock
        self.seconds = seconds
        self.on_idle = on_idle
        self.last = clock.seconds()   # the last touch
        self._call = clock.callLater(seconds, self._check) if seconds > 0 else None

    def touch(self) -> None:
        self.last = self.clock.seconds()

    def _remaining(self) -> float:
        return self.last + self.seconds - self.clock.seconds()

    def _expire(self) -> None:
        self.on_idle()


class Deadline(_LazyCall):
    """
    Calls C{on_expiry(*args)} once the time last L{set} is reached, unless L{cancel}ed.

    Moving the time later (a stream's request timeout re-armed by each frame of its
    answer) only records it; moving it earlier reschedules the call.  So it fires at
    exactly the time last set, with the C{args} last set.
    """

    __slots__ = ("on_expiry", "at", "args")

    def __init__(self, clock: IReactorTime, on_expiry: Callable[..., object]) -> None:
        self.clock = clock
        self.on_expiry = on_expiry
        self.at = 0.0
        self.args: tuple = ()
        self._call: IDelayedCall | None = None

    def set(self, seconds: float, *args: object) -> None:
        """Expire C{seconds} from now, calling C{on_expiry(*args)}."""
        self.at = self.clock.seconds() + seconds
        self.args = args
        call = self._call
        if call is None:
            self._call = self.clock.callLater(seconds, self._check)
        elif call.getTime() > self.at:
            call.reset(seconds)

    def _remaining(self) -> float:
        return self.at - self.clock.seconds()

    def _expire(self) -> None:
        self.on_expiry(*self.args)

    def close(self) -> None:
        """
        Cancel for good: the callback and its arguments are dropped too.  An owner whose
        bound method is the callback (owner -> deadline -> method -> owner) is then freed
        by reference counting when it is done, instead of waiting for the cycle collector.
        """
        self.cancel()
        self.on_expiry = _closed
        self.args = ()


def _closed(*args: object) -> None:
    """The callback of a closed L{Deadline} (never called: it has no pending call)."""
