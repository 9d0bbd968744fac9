"""
The gateway: opens a gate (a public TCP or UDP port) for every exposed route that
providers announce, and carries each TCP connection or UDP flow to a provider.
"""

from __future__ import annotations

import collections
import ipaddress

import attrs
from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from pipegate._compat import lean_dispatch
from pipegate.core.budget import RATE, TOTAL, Budget, LogThrottle, SourceRate
from pipegate.core.routes import Attempt, RouteTable
from pipegate.drain import Drainer
from pipegate.stats import Stats
from pipegate.mux import frames
from pipegate.core.policy import EMPTY, Decision, Grants, Policy, PolicyError, decide, normalize_ip
from pipegate.core.policydoc import policy_from_bytes
from pipegate.core.bucket import BucketPool
from pipegate.core.window import GrowthBudget
from pipegate.mux.session import LinkChannel
from pipegate.ports.gates import GateConnection, GateFactory, UDPGate, serve_gate
from pipegate.ports.services import Exposure, Service
from pipegate.ports.udp import (
    EVICT_MIN_IDLE, UDP_BUFFER, UDP_HOLD, UDP_HOLD_TOTAL, Flow, Hold, evict_idle, set_buffers,
)
from pipegate.timers import cancel


def parse_port_ranges(text: str) -> tuple[tuple[int, int], ...] | None:
    """
    C{"any"} -> C{None}; C{"80,443,1024-65535"} -> C{((80, 80), (443, 443), (1024, 65535))}.
    C{ValueError} with a one-line message otherwise.
    """
    if text.strip().lower() == "any":
        return None
    ranges = []
    for item in text.split(","):
        item = item.strip()
        low, dash, high = item.partition("-")
        try:
            first, last = int(low), int(high) if dash else int(low)
        except ValueError:
            raise ValueError(f'expected "any" or ports and ranges such as 80,443,1024-65535, got {item!r}') from None
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"ports must be 1-65535, low to high, got {item!r}")
        ranges.append((first, last))
    return tuple(ranges)


def route_service(route: frames.Route) -> Service:
    return Service(gate_port=route.gate_port, service_host=route.service_host,
                   service_port=route.service_port, protocol=route.protocol, tags=tuple(route.tags))


@attrs.frozen
class GatewayConfig:
    listen: str = "127.0.0.1"
    exposure: Exposure = Exposure()
    policy: Policy = EMPTY  # the operator's own rules; they beat every provider's
    open_timeout: float = 5.0
    udp_idle_timeout: float = 120.0
    tcp_idle_timeout: float = 900.0
    # Connection and flow caps (0 = none); pipegate.tap.gateway sizes them from the fd budget.
    tcp_per_source: int = 256        # TCP connections one client IP holds, all gates together
    tcp_total: int = 4096            # TCP connections all clients hold
    tcp_rate_per_source: float = 0   # new TCP connections a second per client IP, bursts of tcp_per_source; 0 = none
    udp_per_source: int = 256        # UDP flows one client IP holds, all gates together
    udp_total: int = 16384           # UDP flows in the table; a full table evicts its longest-idle flow
    gate_backlog: int = 1024         # listen() backlog of TCP gates
    udp_hold: int = UDP_HOLD
    udp_hold_total: int = UDP_HOLD_TOTAL
    gate_ports: tuple[tuple[int, int], ...] | None = None   # ranges announced routes may open; None = any
    window: int = frames.INITIAL_WINDOW
    max_window: int = frames.MAX_WINDOW
    window_budget: int = frames.WINDOW_BUDGET
    drain_timeout: float = 30.0
    udp_buffer: int = UDP_BUFFER


class Opening(LinkChannel):
    """An OPEN in flight to one provider for one client connection or flow."""

    def __init__(self, gateway: Gateway, key, client, attempt: Attempt, link, channel_id: int) -> None:
        self.gateway = gateway
        self.key = key
        self.client = client            # StreamChannel or Flow
        self.attempt = attempt          # the providers still to try after this one
        self.link = link
        self.channel_id = channel_id
        self.timer = gateway.clock.callLater(gateway.config.open_timeout, self._timed_out)

    def frame_received(self, frame) -> None:
        if isinstance(frame, frames.OpenOk):
            self._cancel()
            self.gateway.stats.inc("channel_opens", "ok")
            self.link.bind_channel(self.channel_id, self.client, self)
            self.client.attach(self.link, self.channel_id)
        elif isinstance(frame, frames.OpenFail):
            self._cancel()
            self.gateway.stats.inc("channel_opens", "refused")
            self.link.release_channel(self.channel_id, self)
            # A provider past its caps refuses every OPEN of a flood: one line per gate per 10 s.
            held_back = self.gateway.refusal_log(self.key).allow(self.gateway.clock.seconds())
            if held_back is not None:
                self.gateway.log.info("gate {port}/{proto}: provider {peer} refused channel {channel}: {reason}"
                                      " ({more} more refusals on this gate in the last interval)",
                                      port=self.key[0], proto=self.key[1], peer=self.link.peer_name,
                                      channel=self.channel_id, reason=frame.reason, more=held_back)
            self.gateway.try_open(self.key, self.client, self.attempt)
        elif isinstance(frame, frames.Reset):
            self._cancel()
            self.link.release_channel(self.channel_id, self)
            self.gateway.try_open(self.key, self.client, self.attempt)

    def _timed_out(self) -> None:
        self.timer = None
        self.gateway.stats.inc("channel_opens", "timeout")
        self.link.send(frames.Reset(self.channel_id, "open timed out"))
        self.link.release_channel(self.channel_id, self)
        # A stalled provider times out every OPEN of a flood: one line per gate per 10 s.
        held_back = self.gateway.refusal_log(("timeout",) + tuple(self.key)).allow(self.gateway.clock.seconds())
        if held_back is not None:
            self.gateway.log.info("gate {port}/{proto}: provider {peer} did not answer channel {channel}"
                                  " ({more} more timeouts on this gate in the last interval)",
                                  port=self.key[0], proto=self.key[1], peer=self.link.peer_name,
                                  channel=self.channel_id, more=held_back)
        self.gateway.try_open(self.key, self.client, self.attempt)

    def _cancel(self) -> None:
        self.timer = cancel(self.timer)

    def abandon(self) -> None:
        """The client went away while the OPEN was in flight."""
        self._cancel()
        self.link.send(frames.Reset(self.channel_id, "client went away"))
        self.link.release_channel(self.channel_id, self)

    def link_lost(self) -> None:
        self._cancel()
        self.gateway.try_open(self.key, self.client, self.attempt)


class Gateway(service.Service, Drainer):
    log = Logger()

    # A gate whose port cannot be bound (in use by another process, or a lingering old one)
    # is tried again while some provider still serves it: after 1 s, then twice as long each
    # time, at most every 60 s.
    bind_retry_first = 1.0
    bind_retry_max = 60.0

    def __init__(self, config: GatewayConfig, clock, guard=None) -> None:
        self.config = config
        # A pipegate.accept.EmfileGuard: pauses accepting on the TCP gates when the process
        # runs out of descriptors anyway, and resumes it.
        self.guard = guard
        self.window_budget = GrowthBudget(config.window_budget)
        self.clock = clock
        self.routes: dict[object, tuple[frames.Route, ...]] = {}
        self.links: set = set()
        self.gates: dict[tuple[int, str], object] = {}
        self._binding: set = set()
        self._bind_retries: dict[tuple[int, str], object] = {}   # a gate's pending bind retry
        self._bind_failures: dict[tuple[int, str], int] = {}     # its failed binds in a row
        # The providers serving each exposed gate: round robin, failover, GOAWAY drains.
        self.providers: RouteTable[tuple[int, str], object] = RouteTable()
        self.tcp_clients: set[GateConnection] = set()
        self.link_policies: dict[object, Policy] = {}
        self.grants = Grants()
        self.pool = BucketPool()
        self.denied = 0
        self.dropped_datagrams = 0
        self.route_listeners: list = []  # called with no argument after every route change (Docker helpers)
        self.stats = Stats()
        self.draining = False
        self.tcp_budget = Budget(config.tcp_per_source, config.tcp_total)
        self.tcp_rate = (SourceRate(config.tcp_rate_per_source, config.tcp_per_source or 100)
                         if config.tcp_rate_per_source else None)
        self.udp_budget = Budget(config.udp_per_source, config.udp_total)
        # Every UDP flow, least recently used first: a full table evicts from the front.
        self.udp_flows: collections.OrderedDict[Flow, None] = collections.OrderedDict()
        self.hold = Hold(config.udp_hold, config.udp_hold_total,
                         on_drop=lambda: self.stats.inc("held_datagrams_dropped"))
        self._refusal_logs: dict[str, LogThrottle] = {}

    # -- connection and flow caps
    def startService(self) -> None:
        super().startService()
        lean_dispatch(self.clock)   # (no legacy log context per I/O event: pipegate._compat)

    def refusal_log(self, key) -> LogThrottle:
        """The throttle of the "provider refused channel" line of gate C{key} (and of other keyed lines)."""
        return self._refusal_logs.setdefault(key, LogThrottle())

    def refused(self, kind: str, cap: str, port: int) -> None:
        """Count a refusal past a cap and log it, at most one line per cap every 10 s."""
        label = f"{kind}-{cap}"
        self.stats.inc("cap_refusals", label)
        throttle = self._refusal_logs.setdefault(label, LogThrottle())
        held_back = throttle.allow(self.clock.seconds())
        if held_back is None:
            return
        budget = self.tcp_budget if kind == "tcp" else self.udp_budget
        what = "connection" if kind == "tcp" else "flow"
        if cap == RATE:
            limit = f"{self.tcp_rate.rate:g} new connections a second (bursts of {self.tcp_rate.burst:g})"
        else:
            limit = budget.per_source if cap == "per-source" else budget.total
        self.log.warn("gate {port}/{kind}: new {what} refused: {cap} cap of {limit} reached "
                      "({more} more refused in the last interval)",
                      port=port, kind=kind, what=what, cap=cap, limit=limit, more=held_back)

    def admit_flow(self, source: str, port: int) -> bool:
        """
        Take a UDP flow for C{source}; when the table is full, evict its longest-idle flow
        first, but only for a sender under its own per-IP cap (L{Budget.acquire} answers
        C{"per-source"} before C{"total"}), so that one IP cannot push out other people's flows.
        """
        refused = self.udp_budget.acquire(source)
        if refused == TOTAL and evict_idle(self.udp_flows, self.clock.seconds(), EVICT_MIN_IDLE):
            self.stats.inc("evicted_flows")
            refused = self.udp_budget.acquire(source)
        if refused is not None:
            self.refused("udp", refused, port)
            return False
        return True

    # -- ingress policy and shaping
    def decide(self, key, ip: str) -> Decision:
        """Grants first, then the operator's rules, then those of the providers serving C{key}."""
        policies = [self.config.policy]
        for link in self.providers.links(key):   # (exposed()[key], without building the table)
            policies += self.link_policies.get(link, {}).get(key, [])
        # The usual case, once per connection: no grant and no rule anywhere.  Then decide()
        # can only admit (or refuse a non-address), so it is not run.
        plain = not self.grants
        if plain:
            for policy in policies:
                if policy is not None and not policy.empty:
                    plain = False
                    break
        try:
            if plain:
                normalize_ip(ip)
                return _ADMITTED
            now_ms = self.clock.seconds() * 1000
            policies.insert(0, self.grants.policy(now_ms))
            return decide(policies, ip, key[0], key[1], now_ms)
        except PolicyError:
            return Decision(allow=False, matched="not an IP address")

    def buckets(self, ip: str, limit):
        """The client IP's shared (upload, download) buckets and a function to release them."""
        now = self.clock.seconds()
        ip = str(normalize_ip(ip))  # ::ffff:1.2.3.4 and 1.2.3.4 share one bucket
        keys = []
        up = down = None
        if limit.shapes_upload:
            keys.append((ip, "up", limit.rate, limit.burst))
            up = self.pool.acquire(keys[-1], limit.rate, limit.burst, now)
        if limit.shapes_download:
            keys.append((ip, "down", limit.rate, limit.burst))
            down = self.pool.acquire(keys[-1], limit.rate, limit.burst, now)

        def release():
            for key in keys:
                self.pool.release(key)
        return up, down, release

    # -- links
    def link_admitted(self, link) -> None:
        if self.draining:  # admitted while stopping: it would outlive the drain
            link.go_away("gateway stopping")
            return
        self.links.add(link)
        if link.peer_role == frames.ROLE_OBSERVER:
            link.send(frames.Routes(tuple(r for rs in self.routes.values() for r in rs)))

    def link_lost(self, link) -> None:
        self.links.discard(link)
        self.providers.remove(link)
        self.link_policies.pop(link, None)
        routes = self.routes.pop(link, None)
        if link.peer_role == frames.ROLE_PROVIDER and not link.going_away:
            # Every provider lost, not only a gate's last one: its gates may stay open on
            # other providers, but the operator needs to know one went away.
            self.log.info("provider {peer} lost; it served {routes}", peer=link.peer_name,
                          routes=", ".join(f"{r.gate_port}/{r.protocol}" for r in routes or ()) or "no routes")
        elif link.peer_role == frames.ROLE_PROVIDER:
            self.log.info("provider {peer} left (GOAWAY)", peer=link.peer_name)
        if routes:
            self.sync_gates()

    def link_frame(self, link, frame) -> None:
        if isinstance(frame, frames.Routes):
            if link.peer_role != frames.ROLE_PROVIDER:
                return
            # Each route carries the policy of the provider behind it (a hub's routes come
            # from several providers), so policies are kept per gate.
            parsed: dict[bytes, Policy | None] = {}
            policies: dict[tuple[int, str], list[Policy]] = {}
            routes = []
            for route in frame.routes:
                if route.policy not in parsed:
                    try:
                        parsed[route.policy] = policy_from_bytes(
                            route.policy, f"policy of provider {link.peer_name}")
                    except PolicyError as e:
                        # Fail closed: a route whose policy cannot be read gets no gate.
                        self.log.error("ignoring route {port}/{proto} of provider {peer}: {error}",
                                       port=route.gate_port, proto=route.protocol,
                                       peer=link.peer_name, error=e)
                        parsed[route.policy] = None
                if parsed[route.policy] is None:
                    continue
                if not self.port_allowed(route.gate_port):
                    self.log.warn("ignoring route {port}/{proto} of provider {peer}: gate port outside "
                                  "--gate-ports", port=route.gate_port, proto=route.protocol, peer=link.peer_name)
                    continue
                routes.append(route)
                key = (route.gate_port, route.protocol)
                if parsed[route.policy] not in policies.setdefault(key, []):
                    policies[key].append(parsed[route.policy])
            self.link_policies[link] = policies
            self.routes[link] = tuple(routes)
            self.providers.announce(link, [(r.gate_port, r.protocol) for r in routes
                                           if self.config.exposure.exposes(route_service(r))])
            self.log.info("provider {peer} announces {count} route(s)", peer=link.peer_name,
                          count=len(frame.routes))
            self.sync_gates()
        elif isinstance(frame, frames.GoAway):
            self.providers.drain(link)
            if self.routes.pop(link, None):
                self.sync_gates()
        elif isinstance(frame, frames.Open):
            link.send(frames.OpenFail(frame.channel, "a gateway serves no services"))

    # -- routes and gates
    def port_allowed(self, port: int) -> bool:
        ranges = self.config.gate_ports
        return ranges is None or any(low <= port <= high for low, high in ranges)

    def exposed(self) -> dict[tuple[int, str], list]:
        """Every gate some provider that is not going away serves, with those providers."""
        return self.providers.table()

    def sync_gates(self) -> None:
        if not self.running:
            return
        for listener in list(self.route_listeners):
            listener()
        wanted = self.exposed()
        for key in list(self.gates):
            if key not in wanted:
                self._close_gate(key)
        for key in list(self._bind_retries):
            if key not in wanted:
                self._forget_bind_failures(key)
        for key in wanted:
            if key not in self.gates and key not in self._binding and key not in self._bind_retries:
                self._open_gate(key)

    def _open_gate(self, key) -> None:
        port, proto = key
        reactor = self.clock  # the reactor: IReactorTime, IReactorUDP, IReactorTCP

        if proto == "udp":
            gate = UDPGate(self, key)
            try:
                listening = reactor.listenUDP(port, gate, interface=self.config.listen, maxPacketSize=65535)
            except CannotListenError as e:
                self._bind_failed(key, e.socketError)
                return
            set_buffers(listening, self.config.udp_buffer)
            self._forget_bind_failures(key)
            self.gates[key] = (listening, gate)
            self.log.info("gate {port}/udp open", port=port)
            return
        family = endpoints.TCP6ServerEndpoint if _is_v6(self.config.listen) else endpoints.TCP4ServerEndpoint
        endpoint = family(reactor, port, backlog=self.config.gate_backlog, interface=self.config.listen)
        self._binding.add(key)

        def bound(listening):
            self._binding.discard(key)
            if not self.running or key not in self.exposed():
                return listening.stopListening()
            self._forget_bind_failures(key)
            serve_gate(listening)
            self.gates[key] = (listening, None)
            if self.guard is not None:
                self.guard.ports.append(listening)
            self.log.info("gate {port}/tcp open", port=port)

        def failed(failure):
            self._binding.discard(key)
            if self.running:
                self._bind_failed(key, failure.getErrorMessage())

        endpoint.listen(GateFactory(self, key)).addCallbacks(bound, failed)

    def _bind_failed(self, key, error) -> None:
        """Log a gate's failed bind and try again later (L{bind_retry_first}, doubling)."""
        failures = self._bind_failures[key] = self._bind_failures.get(key, 0) + 1
        delay = min(self.bind_retry_max, self.bind_retry_first * 2 ** min(failures - 1, 16))
        self.stats.inc("gate_bind_failures")
        self.log.error("gate {port}/{proto}: cannot bind: {error} (trying again in {delay:g} s)",
                       port=key[0], proto=key[1], error=error, delay=delay)
        self._bind_retries[key] = self.clock.callLater(delay, self._retry_bind, key)

    def _retry_bind(self, key) -> None:
        del self._bind_retries[key]
        if self.running and key in self.exposed() and key not in self.gates and key not in self._binding:
            self._open_gate(key)

    def _forget_bind_failures(self, key) -> None:
        cancel(self._bind_retries.pop(key, None))
        self._bind_failures.pop(key, None)

    def _close_gate(self, key):
        listening, gate = self.gates.pop(key)
        if gate is not None:
            gate.stop()
        if self.guard is not None and listening in self.guard.ports:
            self.guard.ports.remove(listening)
        self.log.info("gate {port}/{proto} closed", port=key[0], proto=key[1])
        return listening.stopListening()

    # -- channels
    def try_open(self, key, client, attempt: Attempt | None = None) -> None:
        """
        Open a channel for C{client} on the next provider of C{key} (a new L{Attempt}, or
        the one whose last provider refused); close it when none is left.
        """
        client.opening = None   # the previous OPEN, if any, has had its answer
        if attempt is None:
            attempt = self.providers.choose(key, _can_open)
        while (link := attempt.next()) is not None:
            opening = Opening(self, key, client, attempt, link, 0)
            try:
                channel_id = link.allocate_channel(opening)
            except Exception:
                opening._cancel()
                continue
            opening.channel_id = channel_id
            client.opening = opening
            host, port = _client_address(client)
            link.send(frames.Open(channel_id, gate_port=key[0], protocol=key[1],
                                  client_host=host, client_port=port,
                                  labels=getattr(client, "labels", ())))
            return
        client.open_failed()

    def stopService(self):
        """
        Drain: close the gates (no new clients; UDP flows end with their gate), GOAWAY
        every link, let open TCP connections finish for up to C{drain_timeout} seconds,
        then cut the rest and close the links.
        """
        from twisted.internet.defer import gatherResults, maybeDeferred

        super().stopService()
        self.draining = True
        for key in list(self._bind_retries):
            self._forget_bind_failures(key)
        closing = [maybeDeferred(self._close_gate, key) for key in list(self.gates)]
        for link in list(self.links):
            link.announce_going_away("gateway stopping")
        if self.tcp_clients:
            self.log.info("draining: {count} connection(s) open, up to {timeout:g} s (Ctrl-C again to stop now)",
                          count=len(self.tcp_clients), timeout=self.config.drain_timeout)
        drained = self.start_drain(self.clock, self.config.drain_timeout,
                                   lambda: not self.tcp_clients, self._drained)
        return gatherResults(closing + [drained])

    def _drained(self, in_time: bool) -> None:
        cut = len(self.tcp_clients)
        for client in list(self.tcp_clients):
            if client.link is not None:
                client.link.send(frames.Reset(client.channel_id, "gateway stopping: drain timeout"))
            client.abort()
        if cut:
            self.stats.inc("drain_cut", amount=cut)
            self.log.warn("drain timeout: {count} connection(s) cut", count=cut)
        for link in list(self.links):
            link.go_away("gateway stopping")


_ADMITTED = Decision(allow=True)   # (what decide() says when no policy says anything)


def _can_open(link) -> bool:
    """A link an OPEN may go to now: admitted, open, and its peer not going away."""
    return link.admitted and not link.closed and not link.going_away


def _is_v6(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).version == 6
    except ValueError:
        return False


def _client_address(client) -> tuple[str, int]:
    address = client.client_address   # (a gate connection's is its accepted address)
    if address is not None:
        return address[0], address[1]
    peer = client.transport.getPeer()
    return peer.host, peer.port
