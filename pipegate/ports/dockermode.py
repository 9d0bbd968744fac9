"""
Docker mode, the Twisted side: the provider's discovery loop (L{DockerDiscovery}) and
the gateway's helper containers (L{HelperManager}).  Both talk to the Engine through
L{pipegate.ports.engine.EngineClient}; the decisions are the pure functions of
L{pipegate.ports.docker}.

Failure model: an Engine that cannot be reached or answers with errors is reported
once (C{log.error}) until it works again (C{log.info}); meanwhile the provider keeps
announcing its C{--services} ones and the Docker services it saw last, and the
gateway keeps its helpers; both retry every refresh period.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from pipegate.ports.docker import (
    MAX_PORTS_PER_CONTAINER, discover, helper_name, helper_spec, secret_free, wants_inspect,
)
from pipegate.ports.engine import EngineClient, EngineError, EventStream
from pipegate.ports.gateway import route_service
from pipegate.ports.services import Service

DEBOUNCE = 0.2  # seconds between an event and the refresh it triggers (events come in bursts)
MAX_CONTAINERS = 10_000  # inspected per refresh; more are reported and ignored


class _Loop(service.MultiService):
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
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        current, self._current = self._current, None
        if current is not None:
            current.cancel()


def _listing(value: object, what: str) -> list[dict]:
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


class DockerDiscovery(_Loop):
    """
    The provider's Docker discovery: running containers on C{network}, turned into
    services by L{pipegate.ports.docker.discover}, handed to C{publish(services)}
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
            listings = _listing(await self.engine.containers(), "GET /containers/json")
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


# ---------------------------------------------------------------------------
# Gateway helpers


def _helper_host(host: str) -> bool:
    """Whether a route's service host can be a network alias (not an address, not localhost)."""
    if not host or host.lower() == "localhost" or any(c.isspace() or c in "/:[]" for c in host):
        return False
    try:
        ipaddress.ip_address(host)
        return False
    except ValueError:
        return True


def wanted_helpers(routes, exposure) -> dict[str, list[tuple[int, str, int]]]:
    """
    C{{service host: [(service port, protocol, gate port), ...]}} for the routes a
    gateway learned (C{frames.Route}s) that its C{exposure} lets through; the first
    route wins when two map one host's port differently.
    """
    table: dict[str, dict[tuple[int, str], int]] = {}
    for route in routes:
        svc = route_service(route)
        if not exposure.exposes(svc) or not _helper_host(svc.service_host):
            continue
        table.setdefault(svc.service_host, {}).setdefault((svc.service_port, svc.protocol), svc.gate_port)
    return {host: sorted((p, proto, gate) for (p, proto), gate in ports.items())
            for host, ports in sorted(table.items())}


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class HelperManager(_Loop):
    """
    The gateway's helper containers: one per service host learned from providers
    (C{gateway.routes}) that passes the gateway's exposure filters, on C{network}, with
    the host as its alias, forwarding each service port to the gate at C{target}
    (default: the network's gateway address, i.e. this host as seen from the network).

    Created, replaced (when the host's ports change) and removed (when its routes go)
    as routes change; all removed when the service stops; helpers left by an earlier
    run (labels C{pipegate.helper.network=<network>}) are removed on start.
    """

    consequence = "helpers stay as they are"

    def __init__(self, engine: EngineClient, gateway, network: str, image: str, clock,
                 target: str | None = None, secret: bytes | None = None, period: float = 20.0,
                 debounce: float = DEBOUNCE) -> None:
        super().__init__(clock, period, debounce)
        self.engine = engine
        self.gateway = gateway
        self.network = network
        self.image = image
        self.target = target
        self.secrets = [secret.hex()] if secret else []
        self.helpers: dict[str, tuple[str, str]] = {}  # host -> (container name, spec digest)
        self._collected = False
        self._network: dict | None = None
        self._refused: set[str] = set()

    def startService(self) -> None:
        self.gateway.route_listeners.append(self.routes_changed)
        super().startService()

    def routes_changed(self) -> None:
        self.schedule(self.debounce)

    def wanted(self) -> dict[str, list[tuple[int, str, int]]]:
        routes = [r for link, rs in self.gateway.routes.items() if not link.going_away for r in rs]
        return wanted_helpers(routes, self.gateway.config.exposure)

    async def refresh(self) -> None:
        try:
            await self._reconcile()
        except EngineError:
            self._network = None  # inspected again next time (it may have been re-created)
            raise

    async def _reconcile(self) -> None:
        if self._network is None:
            self._network = await ensure_network(self.engine, self.network)
        if not self._collected:
            await self._collect()
            self._collected = True
        else:
            await self._forget_missing()
        target = self.target or _network_gateway(self._network)
        if not target:
            raise EngineError(f"network {self.network} has no gateway address; give --helper-target")
        wanted = self.wanted()
        for host in [h for h in self.helpers if h not in wanted]:
            await self._remove(host, "its routes are gone")
        for host, forwards in wanted.items():
            try:
                spec = helper_spec(host, forwards, self.image, self.network, self._network.get("Id"), target)
            except ValueError as e:
                if host not in self._refused:
                    self.log.warn("docker: no helper for {host}: {error}", host=host, error=str(e))
                    self._refused.add(host)
                continue
            digest = spec_digest(spec)
            spec["Labels"]["pipegate.helper.spec"] = digest
            current = self.helpers.get(host)
            if current is not None and current[1] == digest:
                continue
            if current is not None:
                await self._remove(host, "its routes changed")
            await self._create(host, spec, digest)

    async def _forget_missing(self) -> None:
        """Helpers removed behind our back (C{docker rm}) are forgotten, so they are created again."""
        present = set()
        for entry in _listing(await self.engine.containers(
                all=True, filters={"label": [f"pipegate.helper.network={self.network}"]}), "GET /containers/json"):
            present.update(n.lstrip("/") for n in entry.get("Names") or () if isinstance(n, str))
        for host, (name, _) in list(self.helpers.items()):
            if name not in present:
                self.log.warn("docker: helper {name} has disappeared; creating it again", name=name)
                del self.helpers[host]

    async def _collect(self) -> None:
        """Remove every helper of this network (on start: those an earlier run left behind)."""
        stale = _listing(await self.engine.containers(
            all=True, filters={"label": [f"pipegate.helper.network={self.network}"]}), "GET /containers/json")
        for entry in stale:
            cid = entry.get("Id")
            if isinstance(cid, str) and cid:
                await self._delete(cid)
                self.log.info("docker: removed stale helper {name}", name=_name(entry))

    async def _create(self, host: str, spec: dict, digest: str) -> None:
        name = helper_name(host)
        for secret in self.secrets:
            if not secret_free(spec, secret) or not secret_free(name, secret):
                raise AssertionError("a helper spec contains the router secret")  # never sent
        try:
            await self.engine.create_container(name, spec)
        except EngineError as e:
            if e.status != 409:
                raise
            await self._delete(name)  # a leftover with that name
            await self.engine.create_container(name, spec)
        self.helpers[host] = (name, digest)
        self.log.info("docker: helper {name} for {host} ({ports})", name=name, host=host,
                      ports=" ".join(spec["Cmd"][4:]))
        try:
            await self.engine.start(name)
        except EngineError as e:
            if e.status is None:
                raise
            self.log.error("docker: helper {name} created but not started: {error}", name=name, error=str(e))

    async def _remove(self, host: str, why: str) -> None:
        name, _ = self.helpers[host]
        await self._delete(name)
        del self.helpers[host]
        self.log.info("docker: removed helper {name} ({why})", name=name, why=why)

    async def _delete(self, container: str) -> None:
        try:
            await self.engine.remove(container)
        except EngineError as e:
            if e.status != 404:
                raise

    def stopService(self):
        super().stopService()
        if self.routes_changed in self.gateway.route_listeners:
            self.gateway.route_listeners.remove(self.routes_changed)
        return defer.ensureDeferred(self._remove_all())

    async def _remove_all(self) -> None:
        async def remove(host: str) -> None:
            name = self.helpers[host][0]
            try:
                await self._remove(host, "gateway stopping")
            except EngineError as e:
                self.log.error("docker: helper {name} not removed: {error}", name=name, error=str(e))
                self.helpers.pop(host, None)

        await defer.gatherResults([defer.ensureDeferred(remove(h)) for h in list(self.helpers)])
        if self.healthy is not False:  # None: stopped during the first refresh
            # A create cut short by the stop may have left a helper this run did not record.
            try:
                await self._collect()
            except EngineError as e:
                self.log.error("docker: could not look for leftover helpers: {error}", error=str(e))


def _network_gateway(network: dict) -> str | None:
    ipam = network.get("IPAM")
    for config in (ipam.get("Config") if isinstance(ipam, dict) else None) or ():
        if isinstance(config, dict) and isinstance(config.get("Gateway"), str) and config["Gateway"]:
            address = config["Gateway"].split("/")[0]
            if ":" not in address:  # prefer IPv4 (UDP forwards use it too)
                return address
    return None


def _name(entry: dict) -> str:
    names = entry.get("Names")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0].lstrip("/")
    return str(entry.get("Id", "?"))[:12]
