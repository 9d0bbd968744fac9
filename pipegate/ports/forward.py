"""
C{pipegate forward}: the program inside a gateway's Docker helper container.  A plain
TCP/UDP forwarder: each C{PORT/PROTO=GATE_PORT} listens on C{PORT} and carries every
connection (TCP, with backpressure both ways) or datagram flow (UDP, one connected
socket per client, closed when idle) to C{TARGET:GATE_PORT}, the gateway's gate.  It
knows no secret: the gate it reaches is the gateway's public gate.
"""

from __future__ import annotations

import re

import attrs
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pipegate.ports.services import PROTOCOLS
from pipegate.sockets import connect_protocol

_FORWARD_RE = re.compile(r"([0-9]{1,5})/([a-zA-Z]+)=([0-9]{1,5})")
MAX_UDP_FLOWS = 4096


@attrs.frozen
class Forward:
    port: int
    protocol: str
    gate_port: int


def parse_forward(text: str) -> Forward:
    """C{"3306/tcp=3306"} -> L{Forward}; C{ValueError} with a one-line message otherwise."""
    match = _FORWARD_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"expected PORT/PROTO=GATE_PORT (e.g. 3306/tcp=3306), got {text!r}")
    port, protocol, gate = int(match[1]), match[2].lower(), int(match[3])
    if protocol not in PROTOCOLS:
        raise ValueError(f'protocol must be "tcp" or "udp", got {match[2]!r}')
    for number in (port, gate):
        if not 1 <= number <= 65535:
            raise ValueError(f"port must be 1-65535, got {number}")
    return Forward(port, protocol, gate)


@implementer(IHalfCloseableProtocol)
class _Leg(Protocol):
    """One side of a forwarded TCP connection; the peers are each other's producers, half-close is carried."""

    peer: _Leg | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def readConnectionLost(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        peer, self.peer = self.peer, None
        if peer is not None and peer.transport is not None:
            peer.peer = None
            peer.transport.loseConnection()


class _Inbound(_Leg):
    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # nothing is read until the gate answers
        factory = self.factory
        endpoint = endpoints.HostnameEndpoint(factory.reactor, factory.host, factory.port, timeout=10)
        connect_protocol(endpoint, _Leg()).addCallbacks(self._connected, self._failed)

    def _connected(self, outbound: _Leg) -> None:
        if self.transport is None or not self.connected:
            outbound.transport.loseConnection()
            return
        self.peer, outbound.peer = outbound, self
        self.transport.registerProducer(outbound.transport, True)
        outbound.transport.registerProducer(self.transport, True)
        self.transport.resumeProducing()

    def _failed(self, failure) -> None:
        ForwardFactory.log.info("forward to {host}:{port} failed: {error}", host=self.factory.host,
                                port=self.factory.port, error=failure.getErrorMessage())
        self.transport.loseConnection()


class ForwardFactory(Factory):
    """TCP connections to C{host:port}, with backpressure both ways and half-close."""

    log = Logger()
    noisy = False
    protocol = _Inbound

    def __init__(self, reactor, host: str, port: int) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port


class _Backend(DatagramProtocol):
    noisy = False

    def __init__(self, relay: UDPForwarder, client) -> None:
        self.relay = relay
        self.client = client

    def datagramReceived(self, data, addr):
        self.relay.touch(self.client)
        self.relay.transport.write(data, self.client)

    def connectionRefused(self):
        pass


class UDPForwarder(DatagramProtocol):
    """Datagrams from each client go out of their own connected socket to the target."""

    log = Logger()
    noisy = False

    def __init__(self, reactor, target_ip: str, gate_port: int, idle_timeout: float = 120.0,
                 max_flows: int = MAX_UDP_FLOWS) -> None:
        self.reactor = reactor
        self.target_ip = target_ip
        self.gate_port = gate_port
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self.flows: dict[tuple, tuple] = {}   # client -> (listening port, idle timer)

    def datagramReceived(self, data, addr):
        flow = self.flows.get(addr)
        if flow is None:
            if len(self.flows) >= self.max_flows:
                return  # dropped, as UDP may drop
            interface = "::" if ":" in self.target_ip else "0.0.0.0"
            port = self.reactor.listenUDP(0, _Backend(self, addr), interface=interface, maxPacketSize=65535)
            port.connect(self.target_ip, self.gate_port)
            flow = (port, self.reactor.callLater(self.idle_timeout, self.expire, addr))
            self.flows[addr] = flow
        else:
            self.touch(addr)
        flow[0].write(data)

    def touch(self, client) -> None:
        flow = self.flows.get(client)
        if flow is not None and flow[1].active():
            flow[1].reset(self.idle_timeout)

    def expire(self, client) -> defer.Deferred | None:
        flow = self.flows.pop(client, None)
        if flow is None:
            return None
        if flow[1].active():
            flow[1].cancel()
        return flow[0].stopListening()

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([defer.maybeDeferred(self.expire, c) for c in list(self.flows)])


async def start(reactor, target: str, forwards: list[Forward], listen: str = "0.0.0.0",
                idle_timeout: float = 120.0) -> list:
    """Open every forward; returns the listening ports (UDP ports carry their forwarder as C{.forwarder})."""
    ports = []
    udp_target = None
    for forward in forwards:
        if forward.protocol == "tcp":
            factory = ForwardFactory(reactor, target, forward.gate_port)
            endpoint = endpoints.TCP4ServerEndpoint(reactor, forward.port, interface=listen)
            ports.append(await endpoint.listen(factory))
        else:
            if udp_target is None:
                udp_target = target if _is_ip(target) else await reactor.resolve(target)
            forwarder = UDPForwarder(reactor, udp_target, forward.gate_port, idle_timeout)
            port = reactor.listenUDP(forward.port, forwarder, interface=listen, maxPacketSize=65535)
            port.forwarder = forwarder
            ports.append(port)
    return ports


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def main(target: str, specs: list[str], listen: str = "0.0.0.0") -> int:
    """Run the forwarder until SIGTERM/SIGINT; 2 on a bad argument, 1 when a port cannot be opened."""
    import sys

    try:
        forwards = [parse_forward(s) for s in specs]
    except ValueError as e:
        print(f"pipegate forward: {e}", file=sys.stderr)
        return 2
    if not forwards:
        print("pipegate forward: give at least one PORT/PROTO=GATE_PORT", file=sys.stderr)
        return 2
    from twisted.internet import task
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    status = [0]

    async def run(reactor):
        try:
            await start(reactor, target, forwards, listen)
        except Exception as e:
            print(f"pipegate forward: {e}", file=sys.stderr)
            status[0] = 1
            return
        print(f"pipegate forward: {' '.join(specs)} -> {target}", flush=True)
        await defer.Deferred()  # until the reactor stops

    def go(reactor):
        return defer.ensureDeferred(run(reactor))

    try:
        task.react(go)
    except SystemExit:
        pass
    return status[0]
