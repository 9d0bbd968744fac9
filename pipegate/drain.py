"""
Graceful shutdown: wait for a service's work in flight to end, up to a drain timeout.

twistd turns SIGTERM into C{reactor.stop()}, which stops the application's services
and waits for the Deferreds their C{stopService} returns.  A draining service stops
accepting, tells its peers GOAWAY, and returns L{drain}'s Deferred; L{AfterDrain}
holds back the services that must outlive the drain (the links a node dialled, the
metrics listener) until it is over.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

POLL_INTERVAL = 0.05

#: The checks of the drains under way (L{cut_drains} ends them; a second Ctrl-C).
_under_way: set = set()


def drain(clock: IReactorTime, timeout: float, idle: Callable[[], bool],
          interval: float = POLL_INTERVAL) -> defer.Deferred[bool]:
    """Fires with True once C{idle()} holds, or False when C{timeout} seconds pass first."""
    result: defer.Deferred[bool] = defer.Deferred()
    if idle():
        result.callback(True)
        return result
    deadline = clock.seconds() + timeout

    def check(cut: bool = False) -> None:
        if idle():
            end(True)
        elif cut or clock.seconds() >= deadline:
            end(False)

    def end(in_time: bool) -> None:
        _under_way.discard(check)
        if poller.running:
            poller.stop()
        result.callback(in_time)

    poller = LoopingCall(check)
    poller.clock = clock
    poller.start(interval, now=False)
    _under_way.add(check)
    return result


def cut_drains() -> int:
    """End every drain under way now, as if its timeout had passed; says how many there were."""
    checks = list(_under_way)
    for check in checks:
        check(cut=True)
    return len(checks)


class Drainer:
    """
    Mixed into a service: C{start_drain} runs the drain once; C{when_drained()} gives a
    Deferred that fires after it (at once when no drain was started).
    """

    _drain_d: defer.Deferred | None = None
    _drain_waiters: list

    def start_drain(self, clock: IReactorTime, timeout: float, idle: Callable[[], bool],
                    finish: Callable[[bool], object]) -> defer.Deferred:
        """Wait for C{idle()}, then call C{finish(drained_in_time)}; returns the whole."""
        self._drain_d = d = drain(clock, timeout, idle)  # may have fired already
        d.addCallback(finish)
        d.addBoth(self._drain_done)
        return d

    def _drain_done(self, result):
        waiters, self._drain_waiters = getattr(self, "_drain_waiters", []), []
        self._drain_d = None
        for waiter in waiters:
            waiter.callback(None)
        return result

    def when_drained(self) -> defer.Deferred:
        if self._drain_d is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        if not hasattr(self, "_drain_waiters"):
            self._drain_waiters = []
        self._drain_waiters.append(waiter)
        return waiter


class AfterDrain(service.MultiService):
    """Children that stop only once C{node.when_drained()} has fired."""

    def __init__(self, node: Drainer) -> None:
        super().__init__()
        self.node = node

    def stopService(self):
        d = self.node.when_drained()
        d.addCallback(lambda _: service.MultiService.stopService(self))
        return d

