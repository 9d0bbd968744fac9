"""
Docker mode, the Twisted side shared by the provider's discovery
(L{pipegate.ports.docker.discovery}) and the gateway's helpers
(L{pipegate.ports.docker.helpermanager}): a refresh loop and the Engine calls both make.

Failure model: an Engine that cannot be reached or answers with errors is reported
once (C{log.error}) until it works again (C{log.info}); meanwhile the provider keeps
announcing its C{--services} ones and the Docker services it saw last, and the
gateway keeps its helpers; both retry every refresh period.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from pipegate.ports.engine import EngineClient, EngineError
from pipegate.timers import cancel

__all__ = ["DEBOUNCE", "RefreshLoop", "engine_list", "ensure_network"]

DEBOUNCE = 0.2  # seconds between an event and the refresh it triggers (events come in bursts)


class RefreshLoop(service.MultiService):
    """A refresh run now, after events (debounced) and every C{period} seconds; one at a time."""

    log = Logger()

    def __init__(self, clock, period: float, debounce: float = DEBOUNCE) -> None:
        super().__init__()
        self.clock = clock
        self.period = period
        self.debounce = debounce
        self._timer = None
        self._current: defer.Deferred | None = None
        self._again = False
        self.healthy: bool | None = None
        self.refreshes = 0

    def startService(self) -> None:
        super().startService()
        self.schedule(0)

    def schedule(self, delay: float) -> None:
        """Refresh in C{delay} seconds at the latest."""
        if not self.running:
            return
        if self._current is not None:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() - self.clock.seconds() <= delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._timer = None
        d = defer.ensureDeferred(self._guarded())
        self._current = d

        def done(_):
            if self._current is d:
                self._current = None
            again, self._again = self._again, False
            self.schedule(self.debounce if again else self.period)
        d.addBoth(done)

    async def _guarded(self) -> None:
        try:
            await self.refresh()
        except defer.CancelledError:
            return
        except EngineError as e:
            if self.healthy is not False:
                self.log.error("docker: {error}; {consequence}; retrying every {period:g} s",
                               error=str(e), consequence=self.consequence, period=self.period)
            self.healthy = False
            return
        except Exception:
            self.log.failure("docker: refresh failed")
            return
        self.refreshes += 1
        if self.healthy is False:
            self.log.info("docker: the engine answers again")
        self.healthy = True

    consequence = "nothing changes until it works again"

    async def refresh(self) -> None:
        raise NotImplementedError

    def wait(self) -> defer.Deferred:
        """Fires when the refresh in progress (if any) is over."""
        if self._current is None:
            return defer.succeed(None)
        waiting: defer.Deferred = defer.Deferred()
        self._current.addBoth(lambda r: (waiting.callback(None), r)[1])
        return waiting

    def stopService(self):
        super().stopService()
        self._timer = cancel(self._timer)
        self._current = cancel(self._current)


def engine_list(value: object, what: str) -> list[dict]:
    """C{value} (a decoded Engine answer to C{what}) if it is a list of objects, else an L{EngineError}."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise EngineError(f"{what}: expected a JSON list of objects from the engine")
    return value


async def ensure_network(engine: EngineClient, name: str) -> dict:
    """The network's inspect result; the network is created (bridge) when it does not exist."""
    try:
        found = await engine.network(name)
    except EngineError as e:
        if e.status != 404:
            raise
        await engine.create_network(name)
        Logger().info("docker: created network {network}", network=name)
        found = await engine.network(name)
    if not isinstance(found, dict):
        raise EngineError(f"GET /networks/{name}: expected a JSON object from the engine")
    return found
