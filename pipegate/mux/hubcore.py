"""
The hub's routing core (C{pipegate-server --mux}), without I/O: peers by router, the
routes each router's gateways see, and the splices that join a gateway's channel to a
provider's.  Every L{HubCore} method takes an event and returns effects (L{Send},
L{Close}) for the shell (L{pipegate.mux.hub}) to carry out.  Providers are chosen by the
shared route table (L{pipegate.core.routes}): round robin, failover on OPEN_FAIL,
draining providers left out.  See docs/protocol.md section 2.13.
"""

from __future__ import annotations

from typing import Any

import attrs

from pipegate.core.routes import Attempt, RouteTable
from pipegate.mux import frames

GATEWAY, PROVIDER = "gateway", "provider"   # the two sides of a splice
_OTHER = {GATEWAY: PROVIDER, PROVIDER: GATEWAY}
# What a side may no longer send on a channel once it has sent its FIN (protocol.md 2.3.7).
_AFTER_FIN = {frames.Data: "DATA", frames.Fin: "FIN"}
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
        if side in splice.fins and type(frame) in _AFTER_FIN:
            return [Close(key, f"{_AFTER_FIN[type(frame)]} on channel {frame.channel} after its FIN")]
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


_ROLE_NAMES = {frames.ROLE_PROVIDER: "provider", frames.ROLE_GATEWAY: "gateway",
               frames.ROLE_OBSERVER: "observer"}
