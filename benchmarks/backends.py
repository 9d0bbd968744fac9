"""
Backends the harness runs as separate processes (each prints its port(s) as one JSON line):

    python -m benchmarks.backends small-http   # HTTP/1.1 keep-alive, every GET answered with 1 KiB
    python -m benchmarks.backends echo         # TCP echo (half-close aware) and UDP echo

The small HTTP app is a bare Twisted protocol, not twisted.web, so that the direct path
is as fast as a small app can be on this machine and the ratio shows the tunnel's cost.
C{GET /_stats} answers its counters (connections accepted, requests answered).
"""

from __future__ import annotations

import json
import sys

BODY = b"x" * 1024
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY


def small_http() -> None:
    from twisted.internet import protocol, reactor

    counts = {"connections": 0, "requests": 0}

    class Small(protocol.Protocol):
        def connectionMade(self) -> None:
            self.buf = b""
            self.body_left = 0
            counts["connections"] += 1

        def dataReceived(self, data: bytes) -> None:
            buf = self.buf + data
            out = []
            close = False
            while True:
                if self.body_left:  # skip a request body (Content-Length only)
                    n = min(self.body_left, len(buf))
                    self.body_left -= n
                    buf = buf[n:]
                    if self.body_left:
                        break
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end].lower()
                buf = buf[end + 4:]
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    self.body_left = int(head[i + 17:].split(b"\r\n", 1)[0])
                if head.startswith(b"get /_stats "):  # the harness's counters, not a benchmark request
                    body = json.dumps(counts).encode()
                    out.append(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                else:
                    counts["requests"] += 1
                    out.append(RESPONSE)
                if b"\r\nconnection: close" in head:
                    close = True
                    break
            self.buf = buf
            if out:
                self.transport.write(b"".join(out))
            if close:
                self.transport.loseConnection()

    factory = protocol.Factory.forProtocol(Small)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
    print(json.dumps({"http": port.getHost().port}), flush=True)
    reactor.run()


def echo() -> None:
    from twisted.internet import protocol, reactor
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from zope.interface import implementer

    @implementer(IHalfCloseableProtocol)
    class Echo(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

        def readConnectionLost(self) -> None:
            self.transport.loseConnection()

        def writeConnectionLost(self) -> None:
            pass

    class UDPEcho(protocol.DatagramProtocol):
        def datagramReceived(self, data, addr) -> None:
            self.transport.write(data, addr)

    factory = protocol.Factory.forProtocol(Echo)
    factory.noisy = False
    tcp = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
    from twisted.internet.error import CannotListenError
    try:
        udp = reactor.listenUDP(tcp.getHost().port, UDPEcho(), interface="127.0.0.1")
    except CannotListenError:
        udp = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")
    print(json.dumps({"tcp": tcp.getHost().port, "udp": udp.getHost().port}), flush=True)
    reactor.run()


if __name__ == "__main__":
    {"small-http": small_http, "echo": echo}[sys.argv[1]]()
