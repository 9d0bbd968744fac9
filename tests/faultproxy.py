"""
A TCP proxy for fault injection on loopback: it forwards every connection to one
target, records the bytes each way, and on command stalls (stops forwarding without
closing: packets stop, no FIN) or drops (aborts both legs) every connection through it.
"""

from __future__ import annotations

from twisted.internet import endpoints, protocol, reactor, task


class _Leg(protocol.Protocol):
    """One side of a proxied connection; C{peer} is the other side."""

    def __init__(self, proxy: FaultProxy, direction: str) -> None:
        self.proxy = proxy
        self.direction = direction     # "up" (client to target) or "down"
        self.peer: _Leg | None = None
        self.held: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if self.proxy.record:
            self.proxy.recorded[self.direction] += data
        if self.proxy.stalled or self.peer is None:
            self.held.append(data)
            return
        self.peer.transport.write(data)

    def flush(self) -> None:
        held, self.held = self.held, []
        if self.peer is not None and self.peer.transport is not None:
            for data in held:
                self.peer.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.proxy.legs.discard(self)
        if self.peer is not None and self.peer.transport is not None and not self.proxy.stalled:
            self.peer.transport.loseConnection()


class _Inbound(_Leg):
    def connectionMade(self) -> None:
        self.proxy.legs.add(self)
        self.proxy.connections += 1
        self.transport.pauseProducing()
        outbound = _Leg(self.proxy, "down")
        endpoint = endpoints.TCP4ClientEndpoint(reactor, self.proxy.host, self.proxy.port)
        d = endpoints.connectProtocol(endpoint, outbound)

        def connected(_):
            if self.transport is None or not self.transport.connected:
                outbound.transport.abortConnection()
                return
            self.proxy.legs.add(outbound)
            self.peer, outbound.peer = outbound, self
            self.flush()
            self.transport.resumeProducing()

        def failed(_):
            self.transport.abortConnection()
        d.addCallbacks(connected, failed)


class FaultProxy(protocol.Factory):
    """Listen with C{listen()}; C{stall()}, C{resume()}, C{drop()} act on every connection."""

    noisy = False

    def __init__(self, host: str, port: int, record: bool = True) -> None:
        self.record = record    # keep every byte in C{recorded} (off for long fault runs)
        self.host = host
        self.port = port
        self.stalled = False
        self.legs: set[_Leg] = set()
        self.connections = 0
        self.recorded = {"up": bytearray(), "down": bytearray()}
        self.listening = None

    def buildProtocol(self, addr):
        leg = _Inbound(self, "up")
        leg.factory = self
        return leg

    async def listen(self, port: int = 0):
        self.listening = await endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(self)
        return self.listening.getHost().port

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open (no FIN, no RST)."""
        self.stalled = True

    def resume(self) -> None:
        self.stalled = False
        for leg in list(self.legs):
            leg.flush()

    def drop(self) -> None:
        """Abort every connection through the proxy (RST both ways)."""
        for leg in list(self.legs):
            if leg.transport is not None:
                leg.transport.abortConnection()

    async def close(self) -> None:
        self.stalled = False
        if self.listening is not None:
            await self.listening.stopListening()
        self.drop()
        while self.legs:
            await task.deferLater(reactor, 0.01, lambda: None)

    def address(self):
        """Something with C{getHost().port}, as the loopback helpers expect of a port."""
        return self.listening
