"""
The hub: the relay as a meeting point of the port plane (C{pipegate-server --mux}).

Providers and gateways that both sit behind NAT dial the hub.  The hub admits each link
by one of its router secrets (the secret a peer proves decides its router), and is a
peer of the other kind to each of them: to a gateway it is a provider announcing the
routes of every provider of the same router; to a provider it is a gateway.  An OPEN from
a gateway becomes an OPEN to a provider offering that gate (round robin, failover on
OPEN_FAIL), and the two channels are spliced: DATA, WINDOW, FIN, RESET and DATAGRAM pass
through with their channel ids rewritten.  Credit is passed on one for one, so the end
points keep their flow control and the hub never holds more than one window per channel
and direction.

L{HubCore} is the routing logic without I/O (events in, L{Send}/L{Close} out);
L{HubNode} and L{HubLink} are the Twisted shell around it.  See docs/protocol.md §2.13.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.application import service, strports
from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python import usage

from pipegate.core.codec import FrameError
from pipegate.core.budget import Budget, LogThrottle, source_key
from pipegate.core.routes import Attempt, RouteTable
from pipegate.config import auto_or_positive_int, non_negative_int, positive_int
from pipegate.mux import frames, tls
from pipegate.mux.node import MuxOptions
from pipegate.mux.session import LinkConfig, LinkError, LinkFactory, MuxLink
from pipegate.drain import Drainer
from pipegate.stats import Stats

GATEWAY, PROVIDER = "gateway", "provider"   # the two sides of a splice
_OTHER = {GATEWAY: PROVIDER, PROVIDER: GATEWAY}
_ROUTES_OVERHEAD = 4 + frames.HEADER_SIZE + 2   # length, type + channel, count


@attrs.frozen
class Send:
    peer: Any
    frame: Any


@attrs.frozen
class Close:
    peer: Any
    reason: str


@attrs.frozen
class HubConfig:
    window: int = frames.INITIAL_WINDOW
    max_window: int = frames.HUB_MAX_WINDOW  # the most credit an end may grow a channel's window to
    max_peers: int = 1000
    max_peers_per_router: int = 0       # 0 = no cap of its own (only max_peers)
    max_channels: int = 10_000          # per link
    max_frame_size: int = frames.MAX_FRAME_SIZE
    drain_timeout: float = 30.0         # seconds channels through the hub may take to end on stop


@attrs.define(eq=False)
class Peer:
    """One admitted link as the hub sees it."""

    key: Any                 # the shell's link object
    router: int
    role: int
    routes: tuple = ()
    ends: dict = attrs.Factory(dict)   # channel id -> (Splice, side)
    next_channel: int = 1

    @property
    def is_provider(self) -> bool:
        return self.role == frames.ROLE_PROVIDER


@attrs.define(eq=False)
class Splice:
    """A gateway's channel joined to a provider's channel."""

    key: tuple[int, str]
    open: frames.Open
    gateway: Peer
    gateway_channel: int
    attempt: Attempt             # the providers still to try
    provider: Peer | None = None
    provider_channel: int = 0
    established: bool = False
    credit: dict = attrs.Factory(dict)   # side -> DATA bytes the hub may still send to it
    fins: set = attrs.Factory(set)       # sides that sent FIN
    reason: str = "no provider offers this gate"

    def peer(self, side: str) -> Peer | None:
        return self.gateway if side == GATEWAY else self.provider

    def channel(self, side: str) -> int:
        return self.gateway_channel if side == GATEWAY else self.provider_channel


class HubCore:
    """
    The hub's routing: peers by router, the routes each router's gateways see, and the
    splices.  Every method takes an event and returns the frames to send and the links
    to close; the caller does the I/O.
    """

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.peers: dict[Any, Peer] = {}
        # The providers serving each (router, gate): round robin, failover, GOAWAY drains.
        self.providers: RouteTable[tuple[int, tuple[int, str]], Peer] = RouteTable()
        self._announced: dict[int, tuple] = {}
        self.truncated_routes = 0

    # -- peers
    def admit(self, key, router: int, role: int) -> list:
        if len(self.peers) >= self.config.max_peers:
            return [Close(key, f"the hub serves at most {self.config.max_peers} peers")]
        cap = self.config.max_peers_per_router
        if cap and sum(1 for p in self.peers.values() if p.router == router) >= cap:
            return [Close(key, f"the hub serves at most {cap} peers per router")]
        peer = self.peers[key] = Peer(key, router, role)
        if peer.is_provider:
            self.providers.announce(peer, ())
            return []
        return [Send(key, frames.Routes(self.routes_for(router)))]

    def lost(self, key) -> list:
        peer = self.peers.pop(key, None)
        if peer is None:
            return []
        self.providers.remove(peer)
        out: list = []
        for channel, (splice, side) in list(peer.ends.items()):
            out += self._peer_gone(splice, side)
        peer.ends.clear()
        if peer.is_provider:
            out += self._announce(peer.router)
        return out

    def _peer_gone(self, splice: Splice, side: str) -> list:
        other = _OTHER[side]
        if side == PROVIDER and not splice.established:
            self._drop_end(splice.provider, splice.provider_channel)
            splice.reason = "provider link lost"
            return self._try_next(splice)
        self._end(splice)
        peer = splice.peer(other)
        if peer is None or peer.key not in self.peers:
            return []
        return [Send(peer.key, frames.Reset(splice.channel(other), f"{side} link lost"))]

    # -- routes
    def routes_for(self, router: int) -> tuple:
        """The union of the routes of a router's providers, as one ROUTES frame can carry."""
        routes: list = []
        seen: set = set()
        size = _ROUTES_OVERHEAD
        truncated = False
        for peer in self.peers.values():
            if peer.router != router or not peer.is_provider or self.providers.draining(peer):
                continue
            for route in peer.routes:
                if route in seen:
                    continue
                length = len(frames.encode(frames.Routes((route,)))) - _ROUTES_OVERHEAD
                if len(routes) >= frames.ROUTES_MAX or size + length > self.config.max_frame_size:
                    truncated = True
                    continue
                seen.add(route)
                routes.append(route)
                size += length
        if truncated:
            self.truncated_routes += 1
        return tuple(routes)

    def _announce(self, router: int) -> list:
        routes = self.routes_for(router)
        if self._announced.get(router) == routes:
            return []
        self._announced[router] = routes
        return [Send(p.key, frames.Routes(routes)) for p in self.peers.values()
                if p.router == router and not p.is_provider]

    def offering(self, router: int, key: tuple[int, str]) -> Attempt:
        """The providers of C{router} offering gate C{key}, in round-robin order, to try in turn."""
        return self.providers.choose((router, key))

    # -- frames
    def frame(self, key, frame) -> list:
        peer = self.peers.get(key)
        if peer is None:
            return []
        match frame:
            case frames.Routes(routes):
                if not peer.is_provider:
                    return []
                peer.routes = routes
                self.providers.announce(peer, [(peer.router, (r.gate_port, r.protocol)) for r in routes])
                return self._announce(peer.router)
            case frames.GoAway():
                self.providers.drain(peer)
                return self._announce(peer.router) if peer.is_provider else []
            case frames.Open():
                return self._open(peer, frame)
        end = peer.ends.get(frame.channel)
        if end is None:
            return []   # a frame in flight for a channel already closed
        splice, side = end
        match frame:
            case frames.OpenOk():
                if side != PROVIDER or splice.established:
                    return [Close(key, f"unexpected OPEN_OK for channel {frame.channel}")]
                splice.established = True
                splice.credit = {GATEWAY: self.config.window, PROVIDER: self.config.window}
                return [Send(splice.gateway.key, frames.OpenOk(splice.gateway_channel))]
            case frames.OpenFail(_, reason):
                if side != PROVIDER or splice.established:
                    return [Close(key, f"unexpected OPEN_FAIL for channel {frame.channel}")]
                self._drop_end(peer, splice.provider_channel)
                splice.reason = reason
                return self._try_next(splice)
            case frames.Reset(_, reason):
                return self._reset(splice, side, reason)
        if not splice.established:
            if side == GATEWAY and isinstance(frame, frames.Datagram):
                return []   # no channel yet: dropped, as UDP would
            return [Close(key, f"{type(frame).__name__} on channel {frame.channel} before OPEN_OK")]
        other = _OTHER[side]
        target = splice.peer(other)
        channel = splice.channel(other)
        match frame:
            case frames.Data(_, data):
                if len(data) > splice.credit[other]:
                    return [Close(key, f"DATA beyond the granted credit on channel {frame.channel}")]
                splice.credit[other] -= len(data)
                return [Send(target.key, frames.Data(channel, data))]
            case frames.Window(_, increment):
                splice.credit[side] += increment
                if splice.credit[side] > max(self.config.window, self.config.max_window):
                    return [Close(key, f"WINDOW beyond the window on channel {frame.channel}")]
                return [Send(target.key, frames.Window(channel, increment))]
            case frames.Fin():
                if side in splice.fins:
                    return []
                splice.fins.add(side)
                if len(splice.fins) == 2:
                    self._end(splice)
                return [Send(target.key, frames.Fin(channel))]
            case frames.Datagram(_, data):
                return [Send(target.key, frames.Datagram(channel, data))]
        return []

    def _open(self, peer: Peer, frame: frames.Open) -> list:
        if peer.is_provider:
            return [Send(peer.key, frames.OpenFail(frame.channel, "a provider's OPEN is refused"))]
        if frame.channel in peer.ends:
            return [Close(peer.key, f"OPEN for channel {frame.channel} already in use")]
        if len(peer.ends) >= self.config.max_channels:
            return [Send(peer.key, frames.OpenFail(frame.channel, "overloaded"))]
        key = (frame.gate_port, frame.protocol)
        splice = Splice(key, frame, peer, frame.channel, self.offering(peer.router, key))
        peer.ends[frame.channel] = (splice, GATEWAY)
        return self._try_next(splice)

    def _try_next(self, splice: Splice) -> list:
        """Send the OPEN to the next candidate; answer OPEN_FAIL when none is left."""
        while (provider := splice.attempt.next()) is not None:
            if len(provider.ends) >= self.config.max_channels:
                splice.reason = "overloaded"
                continue
            channel = self._allocate(provider)
            provider.ends[channel] = (splice, PROVIDER)
            splice.provider, splice.provider_channel = provider, channel
            return [Send(provider.key, attrs.evolve(splice.open, channel=channel))]
        self._drop_end(splice.gateway, splice.gateway_channel)
        splice.provider = None
        if splice.gateway.key not in self.peers:
            return []
        return [Send(splice.gateway.key, frames.OpenFail(splice.gateway_channel, splice.reason))]

    def _reset(self, splice: Splice, side: str, reason: str) -> list:
        other = _OTHER[side]
        target = splice.peer(other)
        self._end(splice)
        if target is None:
            return []
        return [Send(target.key, frames.Reset(splice.channel(other), reason))]

    # -- channel bookkeeping
    @staticmethod
    def _allocate(peer: Peer) -> int:
        while peer.next_channel in peer.ends or peer.next_channel == 0:
            peer.next_channel = (peer.next_channel + 1) & 0xFFFFFFFF
        channel = peer.next_channel
        peer.next_channel = (channel + 1) & 0xFFFFFFFF
        return channel

    @staticmethod
    def _drop_end(peer: Peer | None, channel: int) -> None:
        if peer is not None:
            peer.ends.pop(channel, None)

    def _end(self, splice: Splice) -> None:
        self._drop_end(splice.gateway, splice.gateway_channel)
        if splice.provider is not None:
            self._drop_end(splice.provider, splice.provider_channel)

    def splices(self) -> int:
        """Channels through the hub (each has one end on a gateway)."""
        return sum(len(p.ends) for p in self.peers.values() if not p.is_provider)

    def summary(self) -> dict[int, dict[str, int]]:
        """
        For each router with an admitted link: its links by role, the routes last
        announced to its gateways, and its channels through the hub.
        """
        out: dict[int, dict[str, int]] = {}
        for peer in self.peers.values():
            row = out.get(peer.router)
            if row is None:
                row = out[peer.router] = {"providers": 0, "gateways": 0, "observers": 0,
                                          "routes": len(self._announced.get(peer.router, ())), "channels": 0}
            row[_ROLE_NAMES.get(peer.role, "observer") + "s"] += 1
            if not peer.is_provider:
                row["channels"] += len(peer.ends)
        return out


# --- the Twisted shell ---------------------------------------------------------------


class HubLink(MuxLink):
    """
    A link accepted by the hub.  It waits for the peer's HELLO, finds the router secret
    that verifies it, and only then answers with its own HELLO under that secret, taking
    the role opposite to the peer's (provider to a gateway, gateway to anyone else).
    """

    def __init__(self, node, config: LinkConfig, clock, secrets: tuple[bytes, ...], owner=None) -> None:
        super().__init__(node, config, clock, is_tls_client=False, owner=owner)
        self.secrets = secrets
        self.router: int | None = None

    def handshakeCompleted(self) -> None:
        try:
            self._exporter = self.transport.getHandle().export_keying_material(
                frames.EXPORTER_LABEL, frames.EXPORTER_LENGTH)
        except Exception as e:
            self.fail(f"TLS exporter unavailable: {e}")

    def _admit(self, hello) -> None:
        if self._exporter is None:
            raise LinkError("Hello before the TLS handshake completed")
        if hello.version != frames.VERSION:
            raise LinkError(f"unsupported mux version {hello.version}")
        for router, secret in enumerate(self.secrets):
            if frames.verify_hello(secret, self._exporter, hello, True):
                break
        else:
            self.stats.inc("admission_failures", "secret")
            raise LinkError("admission failed: the peer knows none of the hub's router secrets")
        self.router = router
        role = frames.ROLE_PROVIDER if hello.role == frames.ROLE_GATEWAY else frames.ROLE_GATEWAY
        nonce = os.urandom(frames.NONCE_SIZE)
        self._write(frames.Hello(version=frames.VERSION, role=role, nonce=nonce,
                                 mac=frames.hello_mac(secret, self._exporter, role, nonce, False)))
        self._admitted(hello)

    def _frame(self, frame) -> None:
        # Channel frames go to the hub, not to a channel table: the hub splices them.
        if self.admitted and not isinstance(frame, (frames.Hello, frames.Ping, frames.Pong, frames.GoAway)):
            self.node.link_frame(self, frame)
        else:
            super()._frame(frame)


class HubLinkFactory(LinkFactory):

    def __init__(self, node, config: LinkConfig, clock, secrets: tuple[bytes, ...]) -> None:
        super().__init__(node, config, clock, is_tls_client=False)
        self.secrets = secrets

    def buildProtocol(self, addr):
        link = HubLink(self.node, self.config, self.clock, self.secrets, owner=self)
        link.factory = self
        return link


class CappedFactory(WrappingFactory):
    """
    Connections to the hub's --mux listener, per source IP and in total, counted from
    accept (before TLS and admission) until the connection is gone: past a cap a new one
    is closed at once, counted (C{admission_failures{reason="cap"}}) and logged at most
    once per 10 s.  Peers behind one NAT share an address, hence a generous per-IP cap.
    """

    log = Logger()
    noisy = False

    def __init__(self, wrapped, budget: Budget, stats: Stats, clock) -> None:
        super().__init__(wrapped)
        self.budget = budget
        self.stats = stats
        self.clock = clock
        self._sources: dict = {}
        self._log = LogThrottle()

    def buildProtocol(self, addr):
        host = getattr(addr, "host", None)
        source = source_key(host) if host else None   # an IPv6 peer by its /64
        refused = self.budget.acquire(source)
        if refused is not None:
            self.stats.inc("admission_failures", "cap")
            held_back = self._log.allow(self.clock.seconds())
            if held_back is not None:
                self.log.warn("hub: mux connection refused: {cap} cap reached ({more} more refused in the "
                              "last interval)", cap=refused, more=held_back)
            return None
        protocol = super().buildProtocol(addr)
        self._sources[protocol] = source
        return protocol

    def unregisterProtocol(self, protocol) -> None:
        super().unregisterProtocol(protocol)
        if protocol in self._sources:
            self.budget.release(self._sources.pop(protocol))


class HubNode(Drainer, service.Service):
    """The links of the hub and the L{HubCore} that routes between them."""

    log = Logger()

    def __init__(self, config: HubConfig, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.core = HubCore(config)
        self.links: set = set()
        # admission_failures (counted by the links), dropped_datagrams and drain_cut;
        # exported with a hub_ prefix next to the relay's own counters.
        self.stats = Stats()

    def link_admitted(self, link) -> None:
        if not self.running:   # admitted while stopping: it would outlive the drain
            link.go_away("hub stopping")
            return
        self.links.add(link)
        self.log.info("hub: {role} {peer} joined router #{router}",
                      role=_ROLE_NAMES.get(link.peer_role, "?"), peer=link.peer_name, router=link.router)
        self._do(self.core.admit(link, link.router, link.peer_role))

    def link_lost(self, link) -> None:
        self.links.discard(link)
        self._do(self.core.lost(link))

    def link_frame(self, link, frame) -> None:
        self._do(self.core.frame(link, frame))

    def _do(self, outputs: list) -> None:
        for out in outputs:
            if isinstance(out, Close):
                out.peer.fail(out.reason)
            elif isinstance(out.frame, frames.Datagram) and out.peer.paused:
                self.stats.inc("dropped_datagrams")   # the link is full: dropped, as UDP would
            else:
                try:
                    out.peer.send(out.frame)
                except FrameError as e:   # a frame the peer's limits refuse
                    out.peer.fail(f"cannot forward {type(out.frame).__name__}: {e}")

    def stopService(self):
        """
        Drain: GOAWAY every link (gateways open no new channels here), let the channels
        through the hub end for up to C{drain_timeout} seconds, then close the links.
        """
        super().stopService()
        for link in list(self.links):
            link.announce_going_away("hub stopping")
        channels = self.core.splices()
        if channels:
            self.log.info("hub draining: {count} channel(s) open, up to {timeout:g} s",
                          count=channels, timeout=self.core.config.drain_timeout)
        return self.start_drain(self.clock, self.core.config.drain_timeout,
                                lambda: self.core.splices() == 0, self._drained)

    def _drained(self, in_time: bool) -> None:
        cut = self.core.splices()
        if cut:
            self.stats.inc("drain_cut", amount=cut)
            self.log.warn("hub drain timeout: {count} channel(s) cut", count=cut)
        for link in list(self.links):
            link.go_away("hub stopping")


_ROLE_NAMES = {frames.ROLE_PROVIDER: "provider", frames.ROLE_GATEWAY: "gateway",
               frames.ROLE_OBSERVER: "observer"}


# --- options -----------------------------------------------------------------------

# The link options of pipegate-provider/-gateway, as --mux-<name> on pipegate-server.
_SHARED = ("tls-key", "tls-cert", "max-frame-size", "window", "max-window", "ping-interval", "ping-deadline",
           "handshake-timeout", "max-channels")
# The hub's --mux-max-window bounds what the ends may grant, so its default is the largest
# --max-window an end has had by default (4 MiB before the ends' default went to 2 MiB).
_HUB_OWN = {"max-window": [str(frames.HUB_MAX_WINDOW), "The most credit per channel and direction an end "
                           "may grant, in bytes (at least the ends' --max-window)."]}
HUB_PARAMETERS = [["mux-" + p[0], None, *_HUB_OWN.get(p[0], [p[2], p[3].replace("--tls-key", "--mux-tls-key")])]
                  for p in MuxOptions.optParameters if p[0] in _SHARED] + [
    ["mux-max-peers", None, "1000", "Links the hub accepts at once (providers, gateways and observers)."],
    ["mux-max-conns-per-ip", None, "100", "Connections to --mux from one IP address, admitted or not "
                                          "(TLS handshakes count); 0 = no cap."],
    ["mux-max-conns", None, "2000", "Connections to --mux in all, admitted or not; 0 = no cap."],
    ["mux-max-peers-per-router", None, "auto", "Links of one router the hub accepts at once, so that one "
                                               "router's peers cannot lock out another's; auto = "
                                               "--mux-max-peers divided by the number of routers."],
]
HUB_CONVERTERS = {"mux-" + name: convert for name, convert in MuxOptions.converters.items() if name in _SHARED}
HUB_CONVERTERS["mux-max-peers"] = positive_int
HUB_CONVERTERS["mux-max-peers-per-router"] = auto_or_positive_int
HUB_CONVERTERS["mux-max-conns-per-ip"] = non_negative_int
HUB_CONVERTERS["mux-max-conns"] = non_negative_int


class HubOptions:
    """C{--mux} and C{--mux-router}, repeatable, for an L{EnvOptions} that lists L{HUB_PARAMETERS}."""

    def init_hub(self) -> None:
        self["mux"] = []
        self["mux-router"] = []

    def opt_mux(self, value: str) -> None:
        """Server endpoint where providers and gateways meet (port plane hub, TLS added); repeatable."""
        self.append("mux", value)

    def opt_mux_router(self, value: str) -> None:
        """A router secret the hub admits (64 hex characters); repeatable, one router each."""
        self.append("mux-router", value)

    def apply_hub_env(self) -> None:
        for name in ("mux", "mux-router"):
            self.repeatable_from_env(name, split=True)

    def check_hub(self) -> None:
        if not self["mux"]:
            if self["mux-router"]:
                raise usage.UsageError("--mux-router: needs --mux (where providers and gateways meet)")
            return
        if not self["mux-router"]:
            raise usage.UsageError("--mux-router: at least one router secret is required with --mux")
        secrets: list[bytes] = []
        for value in self["mux-router"]:
            try:
                secret = frames.parse_router_secret(value)
            except ValueError as e:
                raise usage.UsageError(f"--mux-router: {e}") from None
            if secret not in secrets:
                secrets.append(secret)
        self["mux-secrets"] = tuple(secrets)
        from twisted.internet import reactor

        for value in self["mux"]:
            try:
                endpoints.serverFromString(reactor, value)
            except Exception as e:
                raise usage.UsageError(f"--mux: {value}: {e or type(e).__name__}") from None
        if bool(self["mux-tls-key"]) != bool(self["mux-tls-cert"]):
            raise usage.UsageError("--mux-tls-key and --mux-tls-cert go together")
        for name in ("mux-tls-key", "mux-tls-cert"):
            if self[name] and not os.path.isfile(self[name]):
                raise usage.UsageError(f"--{name}: no such file: {self[name]}")
        if self["mux-max-frame-size"] < frames.MIN_MAX_FRAME_SIZE:
            raise usage.UsageError(f"--mux-max-frame-size: must be at least {frames.MIN_MAX_FRAME_SIZE}")
        if self["mux-ping-deadline"] <= self["mux-ping-interval"]:
            raise usage.UsageError("--mux-ping-deadline: must be longer than --mux-ping-interval")


def hub_node(options) -> HubNode | None:
    """The hub that C{--mux} asks for, not yet started; None without C{--mux}."""
    if not options["mux"]:
        return None
    per_router = options["mux-max-peers-per-router"]
    if per_router is None:
        per_router = max(1, options["mux-max-peers"] // len(options["mux-secrets"]))
    return HubNode(HubConfig(window=options["mux-window"], max_window=options["mux-max-window"],
                             max_peers=options["mux-max-peers"], max_peers_per_router=per_router,
                             max_channels=options["mux-max-channels"],
                             max_frame_size=options["mux-max-frame-size"],
                             drain_timeout=options["drain-timeout"]))


def add_hub(top: service.MultiService, options, reactor, hub: HubNode | None) -> None:
    """Add C{hub} (from L{hub_node}) and its --mux listeners to C{top}, if there is one."""
    if hub is None:
        return
    secrets = options["mux-secrets"]
    link_config = LinkConfig(
        secret=secrets[0], role=frames.ROLE_GATEWAY, max_frame_size=options["mux-max-frame-size"],
        window=options["mux-window"], ping_interval=options["mux-ping-interval"],
        ping_deadline=options["mux-ping-deadline"], handshake_timeout=options["mux-handshake-timeout"],
        max_channels=options["mux-max-channels"])
    if options["mux-tls-key"]:
        certificate = tls.load_certificate(options["mux-tls-key"], options["mux-tls-cert"])
    else:
        certificate = tls.generated_certificate()
    budget = Budget(options["mux-max-conns-per-ip"], options["mux-max-conns"])   # all --mux listeners
    for description in options["mux"]:
        factory = tls.server_factory(certificate, HubLinkFactory(hub, link_config, reactor, secrets))
        factory = CappedFactory(factory, budget, hub.stats, reactor)
        strports.service(description, factory, reactor=reactor).setServiceParent(top)
    hub.setServiceParent(top)   # added last so that it stops first: links get a GOAWAY
