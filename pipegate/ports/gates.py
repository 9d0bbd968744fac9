"""
The gateway's gates: the public listeners a stranger reaches.  A TCP gate's factory
applies the ingress policy and the connection caps at accept time and shapes the client
(L{GateConnection}, one channel each); a UDP gate (L{UDPGate}) keeps a flow per client
address.  Each asks its L{pipegate.ports.gateway.Gateway} to open a channel to a provider.
"""

from __future__ import annotations

import collections
from typing import Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.logger import Logger

from pipegate.core.budget import RATE, Budget, SourceRate, source_key
from pipegate.core.window import GrowthBudget
from pipegate.core.policy import Decision
from pipegate.mux.channel import StreamChannel
from pipegate.mux.frames import MAX_DATAGRAM
from pipegate.sockets import read_waiting
from pipegate.stats import Stats
from pipegate.tcpclient import PromptClose
from pipegate.core.bucket import datagram_allowed
from pipegate.throttle import Shaper
from pipegate.ports.udp import Flow, Hold, datagram_sender


class GateOwner(TypingProtocol):
    """What a gate needs from its gateway (L{pipegate.ports.gateway.Gateway})."""

    log: Logger
    clock: IReactorTime
    config: object              # GatewayConfig
    stats: Stats
    window_budget: GrowthBudget
    tcp_budget: Budget
    tcp_rate: SourceRate | None
    udp_budget: Budget
    tcp_clients: set
    udp_flows: collections.OrderedDict
    hold: Hold
    denied: int
    dropped_datagrams: int

    def decide(self, key, ip: str) -> Decision: ...

    def buckets(self, ip: str, limit): ...

    def refused(self, kind: str, cap: str, port: int) -> None: ...

    def admit_flow(self, source: str, port: int) -> bool: ...

    def try_open(self, key, client, attempt=None) -> None: ...


class GateServer(PromptClose, tcp.Server):
    """A client's TCP connection to a gate, as Twisted's own, with a L{PromptClose}."""


def serve_gate(port) -> None:
    """Make the connections C{port} (a gate's listening port) accepts L{GateServer}s."""
    if isinstance(port, tcp.Port):   # (its public transport attribute; a test's fake port stays as it is)
        port.transport = GateServer


class GateFactory(Factory):
    noisy = False

    def __init__(self, gateway: GateOwner, key) -> None:
        self.gateway = gateway
        self.key = key

    def buildProtocol(self, addr):
        """Apply the ingress policy at accept time: a denied client gets no protocol at all."""
        gateway = self.gateway
        decision = gateway.decide(self.key, addr.host)
        if not decision.allow:
            gateway.denied += 1
            gateway.stats.inc("policy_denials")
            gateway.log.info("gate {port}/tcp: connection refused by ingress policy ({matched})",
                             port=self.key[0], matched=decision.matched)
            return None
        source = source_key(addr.host)   # an IPv6 client by its /64
        refused = gateway.tcp_budget.acquire(source)
        rate = gateway.tcp_rate
        if refused is None and rate is not None and not rate.allow(source, gateway.clock.seconds()):
            # One address opening and closing connections one after another: each costs the
            # gateway and the provider a channel and a connection to the service.
            gateway.tcp_budget.release(source)
            refused = RATE
        if refused is not None:
            gateway.refused("tcp", refused, self.key[0])
            return None
        channel = GateConnection(gateway.config.window, gateway.config.max_window, gateway.window_budget)
        channel.gateway = gateway
        channel.source = source
        channel.key = self.key
        channel.factory = self
        channel.labels = decision.labels
        channel.client_address = (addr.host, addr.port)   # (for the OPEN: no getPeer)
        if decision.limit is None:
            return channel
        up, down, release = gateway.buckets(addr.host, decision.limit)
        return Shaper(_Release(release, gateway.stats), channel, gateway.clock, read_bucket=up, write_bucket=down)


class _Release:
    """Stands in for a WrappingFactory: gives the client IP's buckets back on disconnect."""

    def __init__(self, release, stats: Stats | None = None) -> None:
        self.release = release
        self.stats = stats

    def registerProtocol(self, protocol) -> None:
        pass

    def unregisterProtocol(self, protocol) -> None:
        if self.stats is not None:
            self.stats.inc("throttled_seconds", "up", protocol.read_throttled_seconds)
            self.stats.inc("throttled_seconds", "down", protocol.write_throttled_seconds)
        release, self.release = self.release, None
        if release is not None:
            release()


class GateConnection(StreamChannel):
    """A client's TCP connection to a gate."""

    gateway: GateOwner
    key: tuple[int, str]
    opening: object | None = None   # the gateway's Opening while the OPEN is in flight
    source: str | None = None   # the client's source_key, while it holds a unit of the TCP budget
    client_address: tuple | None = None   # (host, port), set at accept

    def connectionMade(self) -> None:
        super().connectionMade()
        self.gateway.tcp_clients.add(self)
        self.set_idle_timeout(self.gateway.clock, self.gateway.config.tcp_idle_timeout)
        self.on_done = self.gateway.tcp_clients.discard
        self.gateway.try_open(self.key, self)
        if self.link is None and not self.done:
            # The client's first bytes, usually here already, are held for OPEN_OK now
            # rather than after one more wakeup (a plain socket only: not through a Shaper).
            read_waiting(self.transport, self.dataReceived)

    def connectionLost(self, reason=None) -> None:
        if self.opening is not None and self.link is None:
            self.opening.abandon()
            self.opening = None
        source, self.source = self.source, None
        if source is not None:
            self.gateway.tcp_budget.release(source)
        self.gateway.tcp_clients.discard(self)
        super().connectionLost(reason)

    def open_failed(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def attach(self, link, channel_id: int) -> None:
        self.opening = None
        super().attach(link, channel_id)


class UDPGate(DatagramProtocol):
    """One UDP gate: a flow (and a channel) per client address."""

    def __init__(self, gateway: GateOwner, key) -> None:
        self.gateway = gateway
        self.key = key
        self.flows: dict[tuple, Flow] = {}
        self._send = None   # datagram_sender(self.transport), made when the gate starts listening

    def startProtocol(self) -> None:
        self._send = datagram_sender(self.transport, self._dropped)

    def datagramReceived(self, data, addr):
        if len(data) > MAX_DATAGRAM:
            # Over IPv6 a datagram may carry up to 65,527 bytes, more than a DATAGRAM frame
            # (the largest IPv4 payload): sent on, it closed the whole link to the provider.
            self._dropped()
            return
        gateway = self.gateway
        flow = self.flows.get(addr)
        if flow is None:
            decision = gateway.decide(self.key, addr[0])
            if not decision.allow:
                gateway.denied += 1
                gateway.dropped_datagrams += 1
                gateway.stats.inc("policy_denials")
                gateway.stats.inc("dropped_datagrams")
                return
            source = source_key(addr[0])   # an IPv6 client by its /64
            if not gateway.admit_flow(source, self.key[0]):
                gateway.dropped_datagrams += 1
                gateway.stats.inc("dropped_datagrams")
                return
            up = down = release = None
            if decision.limit is not None:
                up, down, release = gateway.buckets(addr[0], decision.limit)

            send = self._send
            if down is None:
                def deliver(datagram, addr=addr):
                    send(datagram, addr)
            else:
                def deliver(datagram, addr=addr, down=down):
                    if datagram_allowed(down, len(datagram), gateway.clock.seconds(), down.burst):
                        send(datagram, addr)
                    else:
                        self._dropped()

            def done(f, addr=addr, release=release, source=source):
                self.flows.pop(addr, None)
                gateway.udp_budget.release(source)
                if release is not None:
                    release()

            flow = Flow(gateway.clock, gateway.config.udp_idle_timeout, deliver, done, gateway.hold)
            flow.client_address = addr
            flow.labels = decision.labels
            flow.up = up
            flow.open_failed = lambda f=flow: f.close(notify=False)
            self.flows[addr] = flow
            flow.table = gateway.udp_flows
            gateway.udp_flows[flow] = None
            self._outbound(flow, data)
            gateway.try_open(self.key, flow)
        else:
            self._outbound(flow, data)

    def _outbound(self, flow: Flow, data: bytes) -> None:
        up = flow.up
        if up is None or datagram_allowed(up, len(data), self.gateway.clock.seconds(), up.burst):
            flow.outbound(data)
        else:
            self._dropped()

    def _dropped(self) -> None:
        self.gateway.dropped_datagrams += 1
        self.gateway.stats.inc("dropped_datagrams")

    def stop(self) -> None:
        for flow in list(self.flows.values()):
            flow.close()

