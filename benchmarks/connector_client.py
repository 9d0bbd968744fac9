"""
The connector's per-request Python cost, in process (issue 22 target 2):

    PYTHONPATH=TREE python -m benchmarks.connector_client [--requests 5000] [--repeat 7]

A L{ConnectorSession} gets a small GET as a REQUEST_HEAD frame, writes it to the local
app's connection (a StringTransport kept alive across requests), reads a small answer
(about 1 KiB) and sends RESPONSE_HEAD, DATA and END to a link that only encodes them.
No sockets, no reactor: what is timed is the connector's own work per request (frames
in and out, the HTTP client), the minimum of C{--repeat} runs, in microseconds.
Works against a tree with Twisted's Agent (before issue 22's connector client) too.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from pipegate.core import window
from pipegate.http import frames
from pipegate.http.connector import ConnectorSession
from pipegate.http.target import ConnectorConfig, Target

BODY = b"x" * 1024
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 07 Dec 2026 04:00:00 GMT\r\n"
          b"Content-Type: text/plain\r\nContent-Length: %d\r\nLast-Modified: Mon, 07 Dec 2026 03:00:00 GMT\r\n"
          b"Connection: keep-alive\r\nETag: \"abc-400\"\r\nAccept-Ranges: bytes\r\n\r\n" % len(BODY)) + BODY
HEADERS = ((b"Host", b"127.0.0.1:8080"), (b"User-Agent", b"wrk"), (b"Accept", b"*/*"))


class Link:
    def __init__(self) -> None:
        self.sent = 0

    def send(self, frame) -> None:
        frames.encode(frame)
        self.sent += 1

    @contextmanager
    def corked(self):
        # (for trees from c97016d to 5f5789e, whose connector corked its link around each
        # read from the app; their AppPool is measured here without that cork)
        yield


class App:
    """An endpoint whose connections are StringTransports; the benchmark answers on them."""

    def __init__(self) -> None:
        self.protocols = []

    def endpointForURI(self, uri):  # (as Agent's endpoint factory)
        return self

    def connect(self, factory):
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3000))
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return defer.succeed(protocol)


def session():
    clock = MemoryReactorClock()
    app = App()
    link = Link()
    config = ConnectorConfig(Target.parse("http://127.0.0.1:3000"))
    budget = window.GrowthBudget(config.window_budget)
    try:
        from pipegate.http.appclient import AppPool
        client = AppPool(clock, app, max_idle=16)
    except ImportError:
        from twisted.web.client import Agent, HTTPConnectionPool
        pool = HTTPConnectionPool(clock, persistent=True)
        client = Agent.usingEndpointFactory(clock, app, pool=pool)
    return ConnectorSession(link, config, client, clock, budget), app, link


def run(requests: int) -> float:
    s, app, link = session()
    stream = 1
    start = time.perf_counter()
    for _ in range(requests):
        s.frame_received(frames.RequestHead(stream, b"GET", b"/bench/small", headers=HEADERS,
                                            client=b"127.0.0.1", correlation=b"c", end=True))
        protocol = app.protocols[-1] if len(app.protocols) == 1 else _busy(app)
        protocol.transport.clear()
        protocol.dataReceived(ANSWER)
        stream += 2
    elapsed = time.perf_counter() - start
    assert link.sent == 3 * requests, (link.sent, requests)
    assert len(app.protocols) == 1, len(app.protocols)
    return elapsed / requests * 1e6


def _busy(app):
    return next(p for p in app.protocols if p.transport.value())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.connector_client")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    run(200)  # warm-up
    times = [run(args.requests) for _ in range(args.repeat)]
    print(f"connector, per small request: min {min(times):.1f} us, "
          f"all {', '.join(f'{t:.1f}' for t in sorted(times))}")


if __name__ == "__main__":
    main()
