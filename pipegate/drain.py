"""
Graceful shutdown: wait for a service's work in flight to end, up to a drain timeout.

twistd turns SIGTERM into C{reactor.stop()}, which stops the application's services
and waits for the Deferreds their C{stopService} returns.  A draining service stops
accepting, tells its peers GOAWAY, and returns L{drain}'s Deferred; L{AfterDrain}
holds back the services that must outlive the drain (the links a node dialled, the
metrics listener) until it is over.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

POLL_INTERVAL = 0.05


def drain(clock: IReactorTime, timeout: float, idle: Callable[[], bool],
          interval: float = POLL_INTERVAL) -> defer.Deferred[bool]:
    """Fires with True once C{idle()} holds, or False when C{timeout} seconds pass first."""
    result: defer.Deferred[bool] = defer.Deferred()
    if idle():
        result.callback(True)
        return result
    deadline = clock.seconds() + timeout

    def check() -> None:
        if idle():
            poller.stop()
            result.callback(True)
        elif clock.seconds() >= deadline:
            poller.stop()
            result.callback(False)

    poller = LoopingCall(check)
    poller.clock = clock
    poller.start(interval, now=False)
    return result


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


class RepeatedStopSignal(service.Service):
    """
    A second SIGTERM (or SIGINT) while the service drains.  twistd's handler would call
    C{reactor.stop()} again, which raises C{ReactorNotRunning} and logs a critical
    traceback; this logs one line instead and lets the drain go on (bounded by
    C{--drain-timeout}, and under systemd by C{TimeoutStopSec=}).

    The reactor installs its handlers when it starts running, after C{startService}: this
    wraps them from C{callWhenRunning} (public API; it relies only on signal.getsignal
    returning the reactor's handler, whatever that is, and calls it for the first signal;
    checked with Twisted 26.10).  Ignored or default handlers are left alone.
    """

    log = Logger()

    def __init__(self, reactor, signals=signal, numbers=(signal.SIGTERM, signal.SIGINT)) -> None:
        self.reactor = reactor
        self.signals = signals
        self.numbers = numbers
        self.stopping = False
        self._previous: dict[int, Callable] = {}

    _trigger = None

    def startService(self):
        super().startService()
        if self._trigger is None:
            self._trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self._shutting_down)
        self.reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running:
            return
        for number in self.numbers:
            previous = self.signals.getsignal(number)
            if callable(previous) and number not in self._previous:
                self._previous[number] = previous
                self.signals.signal(number, self._handle)

    def _shutting_down(self) -> None:
        self.stopping = True

    def _handle(self, number, frame) -> None:
        if not self.stopping:
            self.stopping = True
            self._previous[number](number, frame)
            return
        self.reactor.callFromThread(self._again, number)

    def _again(self, number) -> None:
        self.log.warn("{signal} again while stopping: the drain goes on (up to --drain-timeout); "
                      "SIGKILL ends the process at once", signal=signal.Signals(number).name)

    def stopService(self):
        # Stopped as part of a shutdown: keep catching repeats until the process ends.
        # Stopped on its own (tests): give the handlers back.
        if not self.stopping:
            for number, previous in self._previous.items():
                self.signals.signal(number, previous)
            self._previous.clear()
            if self._trigger is not None:   # (MemoryReactor hands out no trigger ids)
                self.reactor.removeSystemEventTrigger(self._trigger)
                self._trigger = None   # (a tree may be stopped twice)
        return super().stopService()
