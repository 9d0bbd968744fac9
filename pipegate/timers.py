"""
Pending calls on a clock: dropping one that is still pending (L{cancel}), and an idle
timeout that costs nothing per message (L{IdleTimer}).
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


class IdleTimer:
    """
    Calls C{on_idle()} once C{seconds} have passed without a L{touch}; with C{seconds}
    0 it never does, but still keeps L{last}.

    A touch only records the time: a channel or flow touches once per message, and
    re-arming a DelayedCall each time (C{active} and C{reset}, a heap operation) costs
    more than the message.  When the call comes and the last touch was later, it is made
    again for what is left.
    """

    __slots__ = ("clock", "seconds", "on_idle", "last", "_call")

    def __init__(self, clock: IReactorTime, seconds: float, on_idle: Callable[[], object]) -> None:
        self.clock = clock
        self.seconds = seconds
        self.on_idle = on_idle
        self.last = clock.seconds()   # the last touch
        self._call = clock.callLater(seconds, self._check) if seconds > 0 else None

    def touch(self) -> None:
        self.last = self.clock.seconds()

    def _check(self) -> None:
        remaining = self.last + self.seconds - self.clock.seconds()
        if remaining > 0:
            self._call = self.clock.callLater(remaining, self._check)
            return
        self._call = None
        self.on_idle()

    def active(self) -> bool:
        return self._call is not None

    def cancel(self) -> None:
        self._call = cancel(self._call)


class Deadline:
    """
    Calls C{on_expiry(*args)} once the time last L{set} is reached, unless L{cancel}ed.

    Moving the time later (a stream's request timeout re-armed by each frame of its
    answer) only records it, as L{IdleTimer} does: the one pending call, when it comes
    early, is made again for what is left.  Moving it earlier reschedules the call.  So
    it fires at exactly the time last set, with the C{args} last set.
    """

    __slots__ = ("clock", "on_expiry", "at", "args", "_call")

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

    def _check(self) -> None:
        remaining = self.at - self.clock.seconds()
        if remaining > 0:
            self._call = self.clock.callLater(remaining, self._check)
            return
        self._call = None
        self.on_expiry(*self.args)

    def active(self) -> bool:
        return self._call is not None

    def cancel(self) -> None:
        self._call = cancel(self._call)
