"""
The relay's public side alone, in-process: µs and Python calls per small request.

A real L{RelaySite} channel on a StringTransport takes pipelined keep-alive requests (a
wrk-like GET), a stand-in connector link answers each at once (RESPONSE_HEAD, one 1 KiB
DATA, END; frames encoded as the real link does), and the caller's response bytes are
discarded.  What is left is the relay's own per-request work on its public side:
parsing, routing, the stream, the REQUEST_HEAD, writing the response.

    python -m benchmarks.relay_public [--requests N] [--runs R] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pipegate import auth
from pipegate.http import frames, visitors
from pipegate.http.ownership import Holder
from pipegate.http.public import RelaySite
from pipegate.http.relay import Relay, RelayConfig

REQUEST = (b"GET /app/index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
           b"User-Agent: wrk\r\nAccept: */*\r\n\r\n")
BODY = b"x" * 1024
HEADERS = ((b"Server", b"nginx"), (b"Date", b"Mon, 07 Dec 2026 04:00:00 GMT"),
           (b"Content-Type", b"text/html"), (b"Content-Length", b"1024"),
           (b"Last-Modified", b"Mon, 07 Dec 2026 03:00:00 GMT"), (b"Connection", b"keep-alive"),
           (b"ETag", b'"abc-400"'), (b"Accept-Ranges", b"bytes"))

ANSWER = [(frames._HEADER.unpack_from(m)[0], m[frames._HEADER.size:]) for m in map(frames.encode, (
    frames.ResponseHead(1, 200, b"OK", HEADERS), frames.Data(1, BODY), frames.End(1)))]


class AnsweringLink:
    """A connector link that answers every request head at once."""

    def __init__(self, tunnel_id: str) -> None:
        self.tunnel_id = tunnel_id
        self.holder = Holder("jti", False, visitors.EMPTY)
        self.streams: dict = {}
        self._next = 1
        self.pending: list = []

    def add_stream(self, stream) -> int:
        number, self._next = self._next, self._next + 1
        self.streams[number] = stream
        return number

    def remove_stream(self, number: int) -> None:
        self.streams.pop(number, None)

    def go_away(self, reason: str) -> None:
        pass

    def send(self, frame) -> None:
        frames.encode(frame)
        if isinstance(frame, frames.RequestHead):
            self.pending.append(frame.stream)

    def answer(self) -> None:
        """Answer the heads received so far (and those their answers let in)."""
        while self.pending:
            number = self.pending.pop(0)
            stream = self.streams[number]
            for kind, message in ANSWER:  # the connector's encoding is not the relay's work
                stream.frame_received(frames.decode(frames._HEADER.pack(kind, number) + message))


def setup():
    clock = Clock()
    relay = Relay(RelayConfig(jwt=auth.JWTSettings(secret="s" * 32)), clock)
    relay.startService()
    site = RelaySite(relay)
    link = AnsweringLink("app")
    relay.tunnels.attach(link)
    peer = IPv4Address("TCP", "127.0.0.2", 40000)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    channel.makeConnection(transport)
    return channel, transport, clock, link


def run(count: int, batch: int = 10) -> float:
    channel, transport, clock, link = setup()
    data = REQUEST * batch
    start = time.process_time()
    for _ in range(count // batch):
        channel.dataReceived(data)
        link.answer()
        transport.clear()
    elapsed = time.process_time() - start
    channel.connectionLost(None)
    for call in clock.getDelayedCalls():
        call.cancel()
    return elapsed / count * 1e6


def check() -> None:
    channel, transport, clock, link = setup()
    channel.dataReceived(REQUEST * 2)
    link.answer()
    out = transport.value()
    assert out.count(b"HTTP/1.1 200 OK") == 2 and out.count(BODY) == 2, out[:400]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    check()
    run(2000)
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        run(args.requests)
        profile.disable()
        stats = pstats.Stats(profile)
        calls = sum(s[1] for s in stats.stats.values())
        print(f"Python calls per request: {calls / args.requests:.0f}")
        stats.sort_stats("tottime").print_stats(45)
        return
    figures = sorted(run(args.requests) for _ in range(args.runs))
    print("µs per request (min, median):", f"{figures[0]:.1f}", f"{figures[len(figures) // 2]:.1f}")


if __name__ == "__main__":
    main()
