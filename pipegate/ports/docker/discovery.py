"""
The provider's Docker discovery (Twisted): running containers on a network, looked up
through L{pipegate.ports.engine.EngineClient}, turned into services by the pure
L{pipegate.ports.docker.containers.discover} and handed on whenever they change.
"""

from __future__ import annotations

from collections.abc import Callable

from pipegate.ports.docker.containers import MAX_PORTS_PER_CONTAINER, discover, wants_inspect
from pipegate.ports.docker.loop import DEBOUNCE, RefreshLoop, engine_list, ensure_network
from pipegate.ports.engine import EngineClient, EngineError, EventStream
from pipegate.ports.services import Service

__all__ = ["MAX_CONTAINERS", "DockerDiscovery"]

MAX_CONTAINERS = 10_000  # inspected per refresh; more are reported and ignored


class DockerDiscovery(RefreshLoop):
    """
    The provider's Docker discovery: running containers on C{network}, turned into
    services by L{pipegate.ports.docker.containers.discover}, handed to C{publish(services)}
    whenever they change (the caller merges them with the static services).
    """

    consequence = "services from --services and the Docker services seen last stay announced"

    def __init__(self, engine: EngineClient, network: str, period: float,
                 publish: Callable[[list[Service]], None], clock, debounce: float = DEBOUNCE,
                 events: bool = True, max_ports: int = MAX_PORTS_PER_CONTAINER) -> None:
        super().__init__(clock, period, debounce)
        self.max_ports = max_ports
        self.claims: dict = {}   # gate ports and aliases: which container holds each (kept across refreshes)
        self.engine = engine
        self.network = network
        self.publish = publish
        self.discovered: list[Service] | None = None
        self._network_ok = False
        self._reported: set[str] = set()
        self.events = None
        if events:
            self.events = EventStream(engine, self._event, lambda: self.schedule(self.debounce))
            self.events.setServiceParent(self)

    def _event(self, event: dict) -> None:
        self.schedule(self.debounce)

    async def refresh(self) -> None:
        try:
            if not self._network_ok:
                await ensure_network(self.engine, self.network)
                self._network_ok = True
            listings = engine_list(await self.engine.containers(), "GET /containers/json")
        except EngineError:
            self._network_ok = False
            raise
        wanted = [entry for entry in listings if wants_inspect(entry, self.network)]
        if len(wanted) > MAX_CONTAINERS:
            self.log.warn("docker: {count} containers on {network}; only the first {max} are looked at",
                          count=len(wanted), network=self.network, max=MAX_CONTAINERS)
            wanted = wanted[:MAX_CONTAINERS]
        inspects: dict[str, dict] = {}
        for entry in wanted:
            cid = entry.get("Id")
            if not isinstance(cid, str) or not cid:
                continue
            try:
                result = await self.engine.inspect(cid)
            except EngineError as e:
                if e.status == 404:  # removed since the listing
                    continue
                raise
            if isinstance(result, dict):
                inspects[cid] = result
        messages: list[str] = []
        services = discover(listings, inspects, self.network, messages.append, self.claims, self.max_ports)
        for message in messages:
            if message not in self._reported:
                self.log.warn("{text}", text=message)
        self._reported = set(messages)
        if services != self.discovered:
            self.discovered = services
            self.log.info("docker: {count} service(s) on network {network}: {services}",
                          count=len(services), network=self.network,
                          services=", ".join(s.describe() for s in services) or "none")
            self.publish(services)
