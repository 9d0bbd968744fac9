"""
Hostile callers and peers on real loopback sockets (issue 7): the relay against
slowloris, oversized heads, smuggling, path tricks, header injection and a connector
answering for streams it does not own; the gateway's mux port against garbage, TLS
without a Hello, huge declared lengths, 1,000 half-open handshakes and a replayed
Hello.  Every case checks that the abuser is refused or closed AND that legitimate
traffic keeps flowing meanwhile.
"""

from __future__ import annotations

import gc
import json
import re
import socket
import struct

import attrs
from twisted.internet import defer, endpoints, protocol, reactor, ssl, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from zope.interface import implementer

from pipegate.http import frames as http_frames
from pipegate.mux import frames, tls
from pipegate.mux.session import LinkConfig, LinkFactory, MuxLink
from pipegate.ports.services import Service
from tests.support import (
    Loopback, TestApp, connect_raw, eventually, raw_request, read_steadily, request, split_response,
    token_for, ws_connect,
)
from tests.test_ports_e2e import CERT, SECRET, PortPlane
from tests.support import free_port


def by_length(raw: bytes) -> list[tuple[bytes, bytes]]:
    """The answers in C{raw} as a proxy reads them: each head, then as many bytes as its Content-Length says."""
    answers = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        size = int(length.group(1)) if length else len(rest)
        answers.append((head.split(b"\r\n", 1)[0], rest[:size]))
        raw = rest[size:]
    return answers


def elapsed_since(start: float) -> float:
    return reactor.seconds() - start


class RelayAbuse(unittest.TestCase):
    """One relay, two tunnels (t1, t2) with their own apps and real connectors."""

    async def setUp(self):
        self.loop = Loopback(self)
        self.app1, self.app2 = TestApp(), TestApp()
        self.app1_port = await self.loop.app(self.app1)
        self.app2_port = await self.loop.app(self.app2)
        self.relay, self.port = await self.loop.relay(idle_timeout=1.0, request_timeout=30)
        await self.loop.connector(self.port, self.app1_port, "t1")
        await self.loop.connector(self.port, self.app2_port, "t2")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def still_serving(self):
        """Both tunnels answer a normal request."""
        agent = self.loop.agent()
        for tunnel in ("t1", "t2"):
            response, body = await request(agent, b"GET", f"{self.base}/{tunnel}/ok")
            self.assertEqual(response.code, 200)
            self.assertEqual(json.loads(body)["uri"], "/ok")

    async def trickle(self, first: bytes, drip: bytes, every: float):
        """Connect, send C{first}, then C{drip} every C{every} s until the relay closes."""
        proto = await connect_raw(self.port, first)
        start = reactor.seconds()
        sent = 0

        def drip_once():
            nonlocal sent
            if proto.transport.connected and not proto.done.called:
                proto.transport.write(drip)
                sent += 1
        loop = task.LoopingCall(drip_once)
        loop.start(every, now=False)
        try:
            received = await defer.Deferred.fromCoroutine(self.wait_closed(proto))
        finally:
            loop.stop()
        return received, elapsed_since(start), sent

    async def wait_closed(self, proto):
        await eventually(lambda: proto.done.called, timeout=15)
        return await proto.done

    async def test_slowloris_headers_are_cut_by_the_head_deadline(self):
        # One header line every 0.3 s keeps the connection busy, never idle: only a
        # deadline for the whole head stops it.
        received, elapsed, sent = await self.trickle(
            b"GET /t1/ok HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n", 0.3)
        self.assertGreaterEqual(elapsed, 1.0)
        self.assertGreaterEqual(sent, 2)   # it really was active past the idle timeout
        self.assertFalse(any(seen["uri"] == "/ok" for seen in self.app1.seen))
        self.assertNotIn(b"200 OK", received)
        await self.still_serving()

    async def test_slowloris_body_stalled_is_closed_and_the_stream_freed(self):
        proto = await connect_raw(self.port, b"POST /t1/echo HTTP/1.1\r\nHost: x\r\n"
                                             b"Content-Length: 1000\r\n\r\n" + b"a" * 10)
        start = reactor.seconds()
        received = await defer.Deferred.fromCoroutine(self.wait_closed(proto))
        self.assertGreaterEqual(elapsed_since(start), 1.0)
        self.assertNotIn(b"200 OK", received)
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 0)
        await self.still_serving()

    async def test_a_body_trickled_inside_the_idle_timeout_gets_408(self):
        # A byte every 0.3 s is progress for the 1 s idle timeout: without --min-body-rate
        # such a caller holds its slot of the tunnel for as long as it likes (slow POST).
        self.relay.config = attrs.evolve(self.relay.config, min_body_rate=1000, body_grace=1.0)
        received, elapsed, sent = await self.trickle(
            b"POST /t1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", b"a", 0.3)
        self.assertTrue(received.startswith(b"HTTP/1.1 408 "), received[:100])
        self.assertIn(b"request body too slow (under 1000 bytes/s)", received)
        self.assertGreaterEqual(elapsed, 1.0)
        self.assertGreaterEqual(sent, 3)   # it really kept sending, past the idle timeout
        self.assertFalse(any(seen["uri"] == "/echo" for seen in self.app1.seen))
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 0)
        await self.still_serving()

    async def test_oversized_heads_are_refused(self):
        cases = {
            "one huge header": (b"GET /t1/ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
                                b"HTTP/1.1 431 Request Header Fields Too Large"),
            "a header line over 16 KiB": (b"GET /t1/ok HTTP/1.1\r\nCookie: " + b"c" * 16_400 + b"\r\n\r\n",
                                          b"HTTP/1.1 431 Request Header Fields Too Large"),
            "many headers": (b"GET /t1/ok HTTP/1.1\r\nHost: x\r\n" + b"X-N: 1\r\n" * 2000 + b"\r\n",
                             b"HTTP/1.1 400 Bad Request"),
            "huge request line": (b"GET /t1/" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                                  b"HTTP/1.1 414 URI Too Long"),
        }
        for name, (payload, expected) in cases.items():
            raw = await raw_request(self.port, payload)
            self.assertEqual(raw.split(b"\r\n", 1)[0], expected, name)
        self.assertEqual(self.app1.seen, [])
        await self.still_serving()

    async def test_an_oversized_request_line_after_a_request_is_answered_after_it(self):
        raw = await raw_request(self.port, b"GET /t1/ok HTTP/1.1\r\nHost: x\r\n\r\n"
                                b"GET /t1/" + b"a" * 16_400 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(re.findall(rb"HTTP/1\.1 (\d{3})", raw), [b"200", b"414"])
        self.assertEqual([r["uri"] for r in self.app1.seen], ["/ok"])
        await self.still_serving()

    async def test_conflicting_lengths_never_desync_the_app(self):
        # The relay re-frames bodies, so what the app reads is exactly what the relay
        # parsed: no request can hide inside another's body.
        smuggled = b"GET /t1/admin HTTP/1.1\r\nHost: x\r\n\r\n"
        cases = [
            b"POST /t1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n0\r\n\r\n" + smuggled,
            b"POST /t1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 40\r\n"
            b"Connection: close\r\n\r\nhello" + smuggled,
            b"POST /t1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"
            b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + smuggled,
            b"POST /t1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n" + smuggled,
            b"POST /t1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\nConnection: close\r\n\r\n" + smuggled,
            b"POST /t1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\nConnection: close\r\n\r\nhello"
            + smuggled,
        ]
        for payload in cases:
            await raw_request(self.port, payload)
        for seen in self.app1.seen:
            self.assertNotEqual(seen["uri"], "/admin", seen)
            names = [name.lower() for name, _ in seen["headers"]]
            self.assertNotIn("transfer-encoding", names, seen)
            lengths = [value for name, value in seen["headers"] if name.lower() == "content-length"]
            self.assertLessEqual(len(lengths), 1, seen)
            if lengths:
                self.assertEqual(int(lengths[0]), seen["body_len"], seen)
        await self.still_serving()

    async def test_path_tricks_on_the_connection_id(self):
        tricks = [b"/../t2/x", b"/t1/../t2/x", b"/t1/%2e%2e/t2/x", b"/t1%2F..%2Ft2/x", b"/%2e%2e/t2/x",
                  b"/t1/..%2ft2/x", b"/t1/%2E%2E%2F%2E%2E/etc/passwd", b"/healthz/../t2/x", b"//t2/x",
                  b"/t1/./../t2/x", b"/T2/x", b"/t2%00/x", b"/t1\\..\\t2/x"]
        for path in tricks:
            raw = await raw_request(self.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertTrue(raw.startswith(b"HTTP/1.1 "), (path, raw[:60]))
        for app in (self.app1, self.app2):
            for seen in app.seen:
                segments = seen["uri"].split("?")[0].split("/")
                decoded = [s.lower().replace("%2e", ".") for s in segments]
                self.assertNotIn("..", decoded, seen["uri"])
        # t2 is reachable only through a path whose first segment is t2 after normalisation.
        for seen in self.app2.seen:
            self.assertEqual(seen["uri"], "/x", seen)
        await self.still_serving()

    async def test_reserved_and_invalid_ids_cannot_log_in(self):
        for tunnel in ("healthz", "HEALTHZ"):
            factory, proto = await ws_connect(self.loop, self.port, f"/{tunnel}",
                                              protocols=[http_frames.SUBPROTOCOL],
                                              headers={"Authorization": "Bearer " + token_for("t1")})
            with self.assertRaises(Exception):
                await factory.opened
        raw = await raw_request(self.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b'"status": "ok"', raw)
        self.assertEqual(sorted(self.relay.tunnels), ["t1", "t2"])

    async def test_header_injection_and_forwarding_spoofs(self):
        raw = await raw_request(
            self.port,
            b"GET /t1/headers HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"X-Forwarded-Host: evil.example\r\nX-Forwarded-Prefix: /evil\r\nX-Forwarded-Proto: gopher\r\n"
            b"x-pipegate-correlation-id: forged\r\nConnection: close\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:80])
        headers = {}
        for name, value in self.app1.seen[-1]["headers"]:
            headers.setdefault(name.lower(), []).append(value)
        # Appended, not replaced: the real caller is the last hop.
        self.assertEqual(headers["x-forwarded-for"], ["6.6.6.6, 127.0.0.1"])
        self.assertEqual(headers["x-forwarded-prefix"], ["/t1"])
        self.assertEqual(headers["x-forwarded-proto"], ["http"])
        self.assertNotIn("evil.example", headers.get("x-forwarded-host", []))
        self.assertEqual(len(headers["x-pipegate-correlation-id"]), 1)
        self.assertNotEqual(headers["x-pipegate-correlation-id"], ["forged"])
        # A bare CR or a NUL inside a value: refused, or at least never passed on raw.
        for bad in (b"a\rb", b"a\x00b", b"a\r\n b"):
            seen = len(self.app1.seen)
            raw = await raw_request(self.port, b"GET /t1/headers HTTP/1.1\r\nHost: x\r\nX-Bad: " + bad
                                    + b"\r\nConnection: close\r\n\r\n")
            self.assertTrue(raw.startswith(b"HTTP/1.1 "), raw[:80])
            for info in self.app1.seen[seen:]:
                for name, value in info["headers"]:
                    self.assertFalse(set(value) & {"\r", "\n", "\x00"}, (bad, name, value))
        await self.still_serving()

    async def rogue_connector(self, tunnel: str):
        """A hand-driven connector: raw pipegate.v1 frames over a real WebSocket login."""
        factory, proto = await ws_connect(self.loop, self.port, f"/{tunnel}",
                                          protocols=[http_frames.SUBPROTOCOL],
                                          headers={"Authorization": "Bearer " + token_for(tunnel)})
        await factory.opened
        return factory, proto

    async def test_connector_cannot_answer_for_another_tunnels_streams(self):
        factory, rogue = await self.rogue_connector("t3")
        agent = self.loop.agent()
        pending = defer.ensureDeferred(request(agent, b"GET", f"{self.base}/t1/slow/0.5"))
        await eventually(lambda: any(s["uri"] == "/slow/0.5" for s in self.app1.seen))
        # Stream ids 1..20 on the relay's other links: the rogue answers them all.
        for stream in range(1, 21):
            for frame in (http_frames.ResponseHead(stream, 200, b"OK", ((b"x-rogue", b"1"),)),
                          http_frames.Data(stream, b"rogue body"), http_frames.End(stream)):
                rogue.sendMessage(http_frames.encode(frame), isBinary=True)
        response, body = await pending
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"late answer")
        self.assertFalse(response.headers.hasHeader(b"x-rogue"))
        await self.still_serving()

    async def test_response_splitting_by_a_connector_is_refused(self):
        heads = {
            "header name": (b"OK", ((b"x-b\r\nSet-Cookie: name", b"2"),)),
            "header value": (b"OK", ((b"x-a", b"1\r\nSet-Cookie: evil=1"),)),
            "reason": (b"OK\r\nSet-Cookie: reason=1", ()),
            "nul in value": (b"OK", ((b"x-a", b"1\x00Set-Cookie: nul=1"),)),
        }
        for case, (reason, headers) in heads.items():
            factory, rogue = await self.rogue_connector("t3")
            answered = []

            def on_message(payload, isBinary, rogue=rogue, reason=reason, headers=headers, answered=answered):
                frame = http_frames.decode(payload)
                if isinstance(frame, http_frames.RequestHead):
                    head = http_frames.ResponseHead(frame.stream, 200, reason, headers)
                    for out in (head, http_frames.Data(frame.stream, b"ok"), http_frames.End(frame.stream)):
                        rogue.sendMessage(http_frames.encode(out), isBinary=True)
                    answered.append(frame.stream)
            rogue.onMessage = on_message
            raw = await raw_request(self.port, b"GET /t3/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertEqual(len(answered), 1, case)
            status, headers_seen, _ = split_response(raw)
            self.assertIn(b" 502 ", status, (case, raw))
            self.assertNotIn(b"set-cookie", [name for name, _ in headers_seen], (case, raw))
            await eventually(lambda: "t3" not in self.relay.tunnels or not self.relay.tunnels["t3"].links)
        self.assertTrue(any("not valid HTTP" in str(e.get("reason")) for e in self.events))
        await self.still_serving()

    async def test_a_ping_flood_from_a_connector_that_never_reads_gets_few_pongs(self):
        # Autobahn answers every ping with a pong, and a connector that does not read makes
        # the relay keep them all: memory as fast as the connector can send.
        factory, rogue = await self.rogue_connector("t3")
        pongs = []
        rogue.onPong = pongs.append
        rogue.transport.pauseProducing()           # reads nothing from here on
        for n in range(5000):
            rogue.sendPing(b"%124d" % n)
        await task.deferLater(reactor, 0.5, lambda: None)
        rogue.transport.resumeProducing()
        await eventually(lambda: pongs)
        await task.deferLater(reactor, 1.5, lambda: None)
        self.assertLessEqual(len(pongs), 3)        # one a second, for the most recent ping (RFC 6455 5.5.3)
        self.assertEqual(pongs[-1], b"%124d" % 4999)
        await self.still_serving()

    async def test_a_connector_cannot_frame_an_answer_past_its_content_length(self):
        # A proxy in front of the relay may carry other callers' requests (for other
        # tunnels) on the same connection: bytes past an answer's Content-Length would be
        # the answer to the next of them, and an answer shorter than it would swallow it.
        evil = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nEVIL!\n"
        cases = {   # target: (Content-Length values, body, whether the head carries the end)
            b"/t3/long": ((b"5",), b"hello" + evil, False),
            b"/t3/short": ((b"500",), b"hello", False),
            b"/t3/empty": ((b"10",), b"", True),
            b"/t3/two": ((b"5", b"61"), b"hello" + evil, False),
        }
        factory, rogue = await self.rogue_connector("t3")

        def on_message(payload, isBinary):
            frame = http_frames.decode(payload)
            if isinstance(frame, http_frames.RequestHead):
                lengths, body, end = cases[b"/t3" + frame.target]
                head = http_frames.ResponseHead(frame.stream, 200, b"OK", tuple((b"content-length", v) for v in lengths),
                                                end=end)
                rest = [] if end else [http_frames.Data(frame.stream, body)] * bool(body) + [http_frames.End(frame.stream)]
                for out in [head, *rest]:
                    rogue.sendMessage(http_frames.encode(out), isBinary=True)
        rogue.onMessage = on_message
        # HEAD, 204 and 304 carry no body whatever their Content-Length says.
        cases[b"/t3/head"] = ((b"40",), b"", False)
        raw = await raw_request(self.port, b"HEAD /t3/head HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw)
        del cases[b"/t3/head"]
        for target in cases:   # (the last, two lengths, is a protocol error: it closes the link)
            raw = await raw_request(self.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /t3/long HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertNotIn(b"EVIL", raw, target)
            # Read as a proxy reads it, by Content-Length: the relay's own answers (502 for
            # what it could refuse before a byte went out), or the first answer cut short.
            answers = by_length(raw)
            self.assertLessEqual(len(answers), 2, (target, raw))
            for status, body in answers:
                self.assertTrue(status[9:12] in (b"502", b"404") or body == b"hello", (target, raw))
        self.assertEqual(len(by_length(raw)), 2)   # (/two: 502 at its head, then 404 for the pipelined one)
        await self.still_serving()



# -- the mux port before admission ----------------------------------------------------------


@implementer(IHandshakeListener)
class Raw(protocol.Protocol):
    """Sends bytes on connect (and optionally later); records what it gets and when it ends."""

    def __init__(self, payload: bytes = b"", use_tls: bool = False) -> None:
        self.payload = payload
        self.use_tls = use_tls
        self.received = bytearray()
        self.lost = defer.Deferred()
        self.handshake = defer.Deferred()

    def connectionMade(self):
        if self.payload:
            self.transport.write(self.payload)

    def handshakeCompleted(self):
        self.handshake.callback(None)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        # Only a TLS test awaits the handshake; a plain one must leave no failed Deferred behind.
        if self.use_tls and not self.handshake.called:
            self.handshake.errback(reason)
        self.lost.callback(None)


class CapturingLink(MuxLink):
    """A real provider link that keeps the Hello it sent."""

    captured: list[bytes] = []

    def _write(self, frame) -> None:
        if isinstance(frame, frames.Hello):
            CapturingLink.captured.append(frames.encode(frame))
        super()._write(frame)


class CapturingFactory(LinkFactory):
    def buildProtocol(self, addr):
        link = CapturingLink(self.node, self.config, self.clock, self.is_tls_client, owner=self)
        link.factory = self
        return link


HANDSHAKE_TIMEOUT = 1.5


class MuxPortAbuse(PortPlane):
    async def setUp(self):
        # Last cleanup: collect now, so a failed Deferred left behind is reported here.
        self.addCleanup(gc.collect)
        super().setUp()
        self.backend = await self.backend_echo()
        self.gw, self.mux = await self.gateway_with_timeout()
        self.mux_port = self.mux.getHost().port

    async def gateway_with_timeout(self):
        from pipegate.ports.gateway import Gateway, GatewayConfig
        gw = Gateway(GatewayConfig(), reactor)
        gw.startService()
        self.cleanups.append(gw.stopService)
        config = LinkConfig(secret=SECRET, role=frames.ROLE_GATEWAY, ping_interval=0.5, ping_deadline=2,
                            handshake_timeout=HANDSHAKE_TIMEOUT)
        self.wrapper_factory = tls.server_factory(CERT, LinkFactory(gw, config, reactor, False))
        mux = await self.listen_tcp(self.wrapper_factory)
        self.cleanups.append(lambda: self._drop_links(gw))
        return gw, mux

    async def raw(self, payload: bytes = b"", use_tls: bool = False) -> Raw:
        proto = Raw(payload, use_tls)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.mux_port)
        if use_tls:
            endpoint = endpoints.wrapClientTLS(ssl.CertificateOptions(verify=False), endpoint)
        await endpoints.connectProtocol(endpoint, proto)
        self.cleanups.append(lambda: proto.transport.abortConnection() if proto.transport.connected else None)
        return proto

    async def legitimate_provider_works(self, gate: int | None = None):
        gate = gate or free_port()
        prov = self.provider(self.mux, [Service(gate, "127.0.0.1", self.backend.getHost().port)])
        await self.open_tcp_gate(self.gw, gate)
        client = await self.connect(gate)
        client.transport.write(b"still admitted")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.closed, b"still admittedbye")
        return prov

    async def test_plain_garbage_is_dropped(self):
        garbage = await self.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 4)
        await garbage.lost
        self.assertEqual(self.gw.links, set())
        await self.legitimate_provider_works()

    async def test_tls_without_hello_is_closed_at_the_handshake_timeout(self):
        silent = await self.raw(use_tls=True)
        await silent.handshake
        start = reactor.seconds()
        provider = await self.legitimate_provider_works()   # admitted while the silent one waits
        await silent.lost
        self.assertGreaterEqual(elapsed_since(start) + 0.2, HANDSHAKE_TIMEOUT - 0.2)
        self.assertTrue(self.logged("no admission within the handshake timeout"))
        self.assertEqual(len(self.gw.links), 1)   # only the provider: the silent peer is gone
        self.assertEqual(len(provider.links), 1)

    async def test_huge_declared_length_after_tls(self):
        bomb = await self.raw(use_tls=True)
        await bomb.handshake
        bomb.transport.write(b"\x7f\xff\xff\xff" + b"\x01" * 1000)
        await bomb.lost
        self.assertTrue(self.logged("exceeds"))
        await self.legitimate_provider_works()

    async def test_a_big_frame_before_admission_is_refused_at_once(self):
        """
        A stranger (no secret) that completes TLS may send nothing but a Hello (75 bytes)
        before admission.  A frame declared up to the link's max frame size (1 MiB) was
        held until the handshake timeout: 1 MiB per connection for 10 s, 2 GiB at the
        default --mux-max-conns of 2,000, from any 20 addresses.
        """
        bomb = await self.raw(use_tls=True)
        await bomb.handshake
        size = 1_000_000
        bomb.transport.write(struct.pack(">IBI", size, frames.HELLO, 0) + bytes(size - 5 - 1000))
        await bomb.lost
        self.assertTrue(self.logged("before admission without a whole Hello"))
        self.assertFalse(self.logged("no admission within the handshake timeout"))
        await self.legitimate_provider_works()

    async def test_frame_before_hello_after_tls(self):
        early = await self.raw(use_tls=True)
        await early.handshake
        early.transport.write(frames.encode(frames.Routes((frames.Route(free_port(), "tcp", "h", 1),))))
        await early.lost
        self.assertEqual(self.gw.gates, {})
        await self.legitimate_provider_works()

    async def test_replayed_hello_from_a_captured_session_is_refused(self):
        CapturingLink.captured = []
        gate = free_port()
        prov_config = LinkConfig(secret=SECRET, role=frames.ROLE_PROVIDER, ping_interval=0.5, ping_deadline=2)
        from pipegate.ports.provider import Provider, ProviderConfig
        prov = Provider(ProviderConfig(services=(Service(gate, "127.0.0.1", self.backend.getHost().port),)),
                        reactor)
        prov.startService()
        self.cleanups.append(prov.stopService)
        endpoint = tls.client_endpoint(reactor, f"tcp:127.0.0.1:{self.mux_port}")
        link = await endpoint.connect(CapturingFactory(prov, prov_config, reactor, True))
        await self.open_tcp_gate(self.gw, gate)
        self.cleanups.append(lambda: link.fail("test over"))
        self.assertEqual(len(CapturingLink.captured), 1)
        # The captured Hello, sent again on a new TLS session, proves nothing there.
        replay = await self.raw(use_tls=True)
        await replay.handshake
        replay.transport.write(CapturingLink.captured[0])
        await replay.lost
        self.assertTrue(self.logged("admission failed: the peer does not know the router secret"))
        self.assertEqual(len(self.gw.links), 1)
        await self.legitimate_provider_works()

    async def test_a_thousand_half_open_tls_handshakes(self):
        # 1,000 connections that start a TLS handshake (a ClientHello prefix) and stop.
        hello_prefix = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20
        half_open = []
        for _ in range(1000):
            half_open.append(await self.raw(hello_prefix))
        start = reactor.seconds()
        await self.legitimate_provider_works()
        await defer.DeferredList([p.lost for p in half_open])
        self.assertGreaterEqual(elapsed_since(start) + 0.5, HANDSHAKE_TIMEOUT - 0.5)
        self.assertEqual(len(self.gw.links), 1)

    test_a_thousand_half_open_tls_handshakes.timeout = 120



class SlowReaders(unittest.TestCase):
    """
    Slow read: a caller asks for a large answer and takes it a little at a time, enough to
    keep the answer moving inside --request-timeout.  The answer's head frees the caller's
    share of the tunnel (--caller-share), so one address could hold every slot of a tunnel
    (--max-in-flight) for as long as it kept reading a trickle.
    """

    async def setUp(self):
        self.loop = Loopback(self)
        self.app = TestApp()
        app_port = await self.loop.app(self.app)
        self.relay, self.port = await self.loop.relay(
            idle_timeout=30, request_timeout=30, max_in_flight=4, caller_share=50,
            min_download_rate=200_000, download_grace=1.0)
        await self.loop.connector(self.port, app_port, "t1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    def slow_reader(self, size: int, chunk: int = 4096, every: float = 0.25, close: bool = False) -> defer.Deferred:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, chunk)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", self.port.getHost().port))
        sock.sendall(b"GET /t1/big/%d HTTP/1.1\r\nHost: x\r\n%s\r\n" % (size, b"Connection: close\r\n" if close else b""))
        sock.setblocking(False)
        reading = defer.ensureDeferred(read_steadily(sock, chunk, every, timeout=30))

        async def stop():
            try:
                sock.shutdown(socket.SHUT_RDWR)   # (the reading loop sees the end)
            except OSError:
                pass                              # (the relay cut it: the loop has ended)
            await reading
            sock.close()
        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        return reading

    async def test_slow_readers_cannot_hold_every_slot_of_a_tunnel(self):
        size = 50_000_000
        reading = []
        for held in range(1, 5):   # one after another: each answer's head frees its share
            # Each takes 4 KiB every 0.25 s (16 KB/s): always some progress, far below the 200 kB/s asked.
            reading.append(self.slow_reader(size))
            await eventually(lambda: self.relay.tunnels["t1"].in_flight == held
                             and all(s._responding for s in self.relay.tunnels["t1"].links[0].streams.values()))
        agent = self.loop.agent()
        codes = []

        async def bystander_served():
            response, _ = await request(agent, b"GET", f"{self.base}/t1/ok")
            codes.append(response.code)
            return response.code == 200
        start = reactor.seconds()
        while not await bystander_served():
            self.assertLess(elapsed_since(start), 15, f"bystander never served: {codes}")
            await task.deferLater(reactor, 0.25, lambda: None)
        self.assertEqual(codes[0], 503)          # the readers did hold every slot at first
        for ended in reading:
            how, got = await ended
            self.assertLess(len(got), size, how)  # cut off, not served to the end
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 0)

    async def test_a_reader_above_the_rate_gets_the_whole_answer(self):
        size = 8_000_000   # more than the loopback buffers hold (about 3 MB), so it does push back
        # 64 KiB every 0.05 s (1.3 MB/s), with the relay asking for 200 kB/s.
        how, got = await self.slow_reader(size, chunk=65536, every=0.05, close=True)
        self.assertEqual(how, "eof")
        self.assertTrue(got.startswith(b"HTTP/1.1 200 "), got[:40])
        self.assertGreater(len(got), size)


class HostTricks(unittest.TestCase):
    """Subdomain routing (--domain): requests whose tunnel a proxy in front could read differently."""

    async def setUp(self):
        self.loop = Loopback(self)
        self.app1, self.app2 = TestApp(), TestApp()
        app1_port, app2_port = await self.loop.app(self.app1), await self.loop.app(self.app2)
        self.relay, self.port = await self.loop.relay(domain="example.test")
        await self.loop.connector(self.port, app1_port, "t1")
        await self.loop.connector(self.port, app2_port, "t2")

    async def get(self, target: bytes, *hosts: bytes) -> bytes:
        lines = b"".join(b"Host: " + host + b"\r\n" for host in hosts)
        return await raw_request(self.port, b"GET " + target + b" HTTP/1.1\r\n" + lines + b"Connection: close\r\n\r\n")

    async def test_ambiguous_hosts_are_refused(self):
        cases = [
            (b"/x", b"t1.example.test", b"t2.example.test"),   # the relay routed by the last one
            (b"/x", b"t2.example.test", b"t2.example.test"),
            (b"http://t2.example.test/x", b"t1.example.test"),  # RFC 9112: the target's authority wins
            (b"http://t1.example.test/x",),
        ]
        for target, *hosts in cases:
            raw = await self.get(target, *hosts)
            self.assertTrue(raw.startswith(b"HTTP/1.1 400 "), (target, hosts, raw[:80]))
        self.assertEqual((self.app1.seen, self.app2.seen), ([], []))

    async def test_one_host_still_routes(self):
        for target, host in [(b"/x", b"t2.example.test"), (b"/x", b"T2.EXAMPLE.TEST.:80"),
                             (b"http://t2.example.test/x", b"t2.example.test")]:
            raw = await self.get(target, host)
            self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), (target, host, raw[:80]))
        self.assertEqual([seen["uri"] for seen in self.app2.seen], ["/x"] * 3)
        self.assertEqual(self.app1.seen, [])
