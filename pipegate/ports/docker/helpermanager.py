"""
The gateway's helper containers (Twisted): one per service host learned from
providers, created, replaced and removed through L{pipegate.ports.engine.EngineClient}
as routes change; their names and bodies come from the pure
L{pipegate.ports.docker.helperspec}.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json

from twisted.internet import defer

from pipegate.ports.docker.helperspec import helper_name, helper_spec, secret_free
from pipegate.ports.docker.loop import DEBOUNCE, RefreshLoop, engine_list, ensure_network
from pipegate.ports.engine import EngineClient, EngineError
from pipegate.ports.gateway import route_service

__all__ = ["HelperManager", "spec_digest", "wanted_helpers"]


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


class HelperManager(RefreshLoop):
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
        for entry in engine_list(await self.engine.containers(
                all=True, filters={"label": [f"pipegate.helper.network={self.network}"]}), "GET /containers/json"):
            present.update(n.lstrip("/") for n in entry.get("Names") or () if isinstance(n, str))
        for host, (name, _) in list(self.helpers.items()):
            if name not in present:
                self.log.warn("docker: helper {name} has disappeared; creating it again", name=name)
                del self.helpers[host]

    async def _collect(self) -> None:
        """Remove every helper of this network (on start: those an earlier run left behind)."""
        stale = engine_list(await self.engine.containers(
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
