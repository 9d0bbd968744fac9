"""
Load, scaled for CI (issue 7): many HTTP requests at concurrency 100 through one tunnel
with nothing lost or mixed up, and 2,000 concurrent TCP channels on one mux link, each
byte-exact.  The full-size runs (100,000 requests; 2,000 x 1 MiB; the soak) are
`python -m benchmarks.reliability` with real processes; their figures are in
docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import resource

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from zope.interface import implementer

from pipegate.mux import linkio
from pipegate.ports.services import Service
from tests.support import Loopback, TestApp, eventually, free_port, pattern
from tests.test_ports_e2e import PortPlane

HTTP_REQUESTS = 3_000
HTTP_CONCURRENCY = 100
CHANNELS = 2_000
CHANNEL_BYTES = 64 * 1024


class HTTPLoad(unittest.TestCase):
    async def test_requests_at_concurrency_100_nothing_lost(self):
        loop = Loopback(self)
        app = TestApp()
        app_port = await loop.app(app)
        # One client address at full concurrency: let it hold every slot (--caller-share 100).
        relay, relay_port = await loop.relay(max_in_flight=HTTP_CONCURRENCY, caller_share=100)
        await loop.connector(relay_port, app_port, "t1")
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = HTTP_CONCURRENCY
        pool.retryAutomatically = False
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        base = f"http://127.0.0.1:{relay_port.getHost().port}/t1"
        semaphore = defer.DeferredSemaphore(HTTP_CONCURRENCY)
        answers: dict[int, tuple[int, str]] = {}
        errors: list = []

        async def one(i: int):
            try:
                response = await agent.request(b"GET", f"{base}/n/{i}?q={i}".encode())
                body = await readBody(response)
                answers[i] = (response.code, json.loads(body)["uri"])
            except Exception as e:  # counted, then asserted empty
                errors.append((i, repr(e)))

        await defer.gatherResults([semaphore.run(lambda i=i: defer.ensureDeferred(one(i)))
                                   for i in range(HTTP_REQUESTS)])
        self.assertEqual(errors, [])
        self.assertEqual(len(answers), HTTP_REQUESTS)
        for i, (code, uri) in answers.items():
            self.assertEqual((code, uri), (200, f"/n/{i}?q={i}"))
        self.assertEqual(len(app.seen), HTTP_REQUESTS)
        self.assertEqual(relay.tunnels["t1"].in_flight, 0)

    test_requests_at_concurrency_100_nothing_lost.timeout = 300


@implementer(IHalfCloseableProtocol)
class Digest(protocol.Protocol):
    """Backend: reads until EOF, answers the SHA-256 of what it read and closes."""

    def connectionMade(self):
        self.hash = hashlib.sha256()
        self.size = 0

    def dataReceived(self, data):
        self.hash.update(data)
        self.size += len(data)

    def readConnectionLost(self):
        self.transport.write(self.hash.hexdigest().encode() + b" %d" % self.size)
        self.transport.loseConnection()


class Sender(protocol.Protocol):
    """Client: writes its payload with backpressure, half-closes, collects the answer."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.offset = 0
        self.received = bytearray()
        self.done = defer.Deferred()

    def connectionMade(self):
        self.paused = True   # until go(): every channel is open before any byte moves

    def go(self):
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.offset < len(self.payload):
            chunk = self.payload[self.offset:self.offset + 16384]
            self.offset += len(chunk)
            self.transport.write(chunk)
        if self.offset >= len(self.payload) and self.offset != -1:
            self.offset = -1
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.paused = True

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(bytes(self.received))


def channel_budget(wanted: int, fds_per_channel: int = 4, spare: int = 500) -> int:
    """Raise the fd soft limit to the hard one; the channels that fit in it (all of them here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return min(wanted, (hard - spare) // fds_per_channel)


class TCPLoad(PortPlane):
    async def test_2000_concurrent_channels_on_one_link_byte_exact(self):
        channels = channel_budget(CHANNELS)
        self.assertEqual(channels, CHANNELS, "the fd limit is too low for this test")
        factory = protocol.Factory.forProtocol(Digest)
        factory.noisy = False
        backend = await self.listen_tcp(factory)
        # Every client here is 127.0.0.1: no per-IP cap (the caps have their own tests).
        gw, mux = await self.gateway(tcp_per_source=0)
        gate = free_port()
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)], backends_per_source=0)
        await self.open_tcp_gate(gw, gate)
        self.assertEqual(len(gw.links), 1)
        link = next(iter(gw.links))
        senders = []
        for i in range(channels):
            payload = pattern(CHANNEL_BYTES, seed=i)
            sender = Sender(payload)
            sender.expected = hashlib.sha256(payload).hexdigest().encode() + b" %d" % CHANNEL_BYTES
            await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate), sender)
            senders.append(sender)
        # All channels open on the one link at the same time, then every one moves its bytes.
        await eventually(lambda: len(link.channels) == channels, timeout=120)
        for sender in senders:
            sender.go()
        answers = await defer.gatherResults([s.done for s in senders])
        for sender, answer in zip(senders, answers):
            self.assertEqual(answer, sender.expected)
        self.assertEqual(gw.links, {link})       # one link carried them all
        self.assertEqual(link.channels, {})

    async def test_link_socket_buffers_4_mib_before_pausing_its_channels(self):
        # Regression: with Twisted's 64 KiB, 2,000 busy channels (1 MiB each, real processes)
        # spent the link pausing and resuming every channel, and data almost stopped.
        gw, mux = await self.gateway()
        prov = self.provider(mux, [])
        await eventually(lambda: gw.links and prov.links)
        for link in (next(iter(gw.links)), next(iter(prov.links))):
            tcp = link.transport.transport          # under the TLS layer
            self.assertIsInstance(tcp, FileDescriptor)
            self.assertGreaterEqual(tcp.bufferSize, linkio.LINK_WRITE_BUFFER)
            self.assertEqual(linkio.LINK_WRITE_BUFFER, 4 * 1024 * 1024)

    test_2000_concurrent_channels_on_one_link_byte_exact.timeout = 300
