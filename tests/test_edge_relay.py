"""
The relay's public edge against hostile callers (issue 17, relay items 1, 2, 5, 9, 11, 12,
14, 15 and the fd budget).  Each attack runs against the real relay, a real connector and a
raw local app on loopback, with attackers on 127.0.0.2 and bystanders on 127.0.0.3; the fd
attacks run `twistd pipegate-server` as a child process under a lowered RLIMIT_NOFILE.
Pure parts (the response-head parser, body framing, backlog strings, /status access) are
tested without sockets first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from pipegate.accept import ConnectionGate, with_backlog
from pipegate.core.budget import Budget
from pipegate.http.public import RelaySite
from pipegate.http.upgrade import BodyEnd, UpgradeError, parse_response_head
from pipegate.status import StatusAccess
from tests.support import (
    SECRET, Loopback, RawApp, connect_raw, eventually, free_port, limited_twistd, raw_request, read_steadily,
    split_response,
)
from tests.test_processes import child_env, spawn

ATTACKER, BYSTANDER = "127.0.0.2", "127.0.0.3"
UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"


def upgrade_request(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET /t1" + path + b" HTTP/1.1\r\nHost: x\r\n" + UPGRADE + extra + b"\r\n"


# -- pure parts


class ResponseHeadTests(unittest.TestCase):

    def test_incomplete_then_complete(self):
        self.assertIsNone(parse_response_head(b"HTTP/1.1 101 Switching"))
        head, rest = parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nDATA")
        self.assertEqual((head.status, head.headers, rest), (101, ((b"Upgrade", b"x"),), b"DATA"))

    def test_not_http_and_too_large(self):
        self.assertRaises(UpgradeError, parse_response_head, b"SSH-2.0-OpenSSH\r\n")
        self.assertRaises(UpgradeError, parse_response_head, b"HTTP/1.1 200 OK\r\n" + b"a: b\r\n" * 20000)
        self.assertRaises(UpgradeError, parse_response_head, b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n")

    def test_closing_replaces_connection_headers(self):
        head, _ = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n"
                                      b"Content-Length: 2\r\n\r\n")
        self.assertEqual(head.closing(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n")

    def _end(self, raw_head: bytes, method: bytes = b"GET") -> BodyEnd:
        return BodyEnd(parse_response_head(raw_head)[0], method)

    def test_body_by_length(self):
        end = self._end(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertIsNone(end.feed(b"abc"))
        self.assertEqual(end.feed(b"deGET / HTTP/1.1"), 2)

    def test_body_chunked_split_anywhere(self):
        body = b"5;x=y\r\nhello\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\nTrailer: 1\r\n\r\n"
        for cut in range(len(body) + 1):
            end = self._end(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            first = end.feed(body[:cut])
            if first is not None:
                self.assertEqual(first, len(body))
                continue
            self.assertEqual(end.feed(body[cut:] + b"NEXT"), len(body) - cut, cut)

    def test_no_body(self):
        self.assertTrue(self._end(b"HTTP/1.1 204 No Content\r\n\r\n").done_at_head)
        self.assertTrue(self._end(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", b"HEAD").done_at_head)
        self.assertFalse(self._end(b"HTTP/1.1 200 OK\r\n\r\n").done_at_head)  # until the app closes
        self.assertIsNone(self._end(b"HTTP/1.1 200 OK\r\n\r\n").feed(b"x" * 100))


class Sink:
    """The link side of an UpgradePipe: records frames and closed streams."""

    def __init__(self):
        self.frames, self.closed = [], []

    def send(self, frame):
        self.frames.append(frame)

    def stream_closed(self, stream_id):
        self.closed.append(stream_id)


class UpgradePipeTests(unittest.TestCase):
    """The pipe on a StringTransport with a task.Clock: no sockets."""

    def pipe(self, **kwargs):
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from pipegate.http.upgrade import UpgradePipe

        self.clock, self.sink, self.transport = Clock(), Sink(), StringTransport()
        pipe = UpgradePipe(self.sink, 1, clock=self.clock, method=b"GET", idle_timeout=10, **kwargs)
        pipe.makeConnection(self.transport)
        return pipe

    def data(self, pipe, data):
        from pipegate.http import frames

        pipe.frame_received(frames.Data(1, data))

    def test_caller_bytes_wait_for_the_101(self):
        from pipegate.http import frames

        pipe = self.pipe(held=b"early")
        pipe.dataReceived(b"+more")
        pipe.frame_received(frames.Window(1, 100000))
        self.assertEqual([f for f in self.sink.frames if isinstance(f, frames.Data)], [])
        self.data(pipe, b"HTTP/1.1 101 Switching Protocols\r\n\r\nhi")
        self.assertEqual(self.transport.value(), b"HTTP/1.1 101 Switching Protocols\r\n\r\nhi")
        self.assertEqual(b"".join(f.data for f in self.sink.frames if isinstance(f, frames.Data)), b"early+more")

    def test_holding_too_much_pauses_the_caller(self):
        from pipegate.http import frames
        from pipegate.http.upgrade import MAX_HELD

        pipe = self.pipe()
        pipe.dataReceived(b"x" * (MAX_HELD + 1))
        self.assertEqual(self.transport.producerState, "paused")
        pipe.frame_received(frames.Window(1, 100000))  # credit alone does not resume it
        self.assertEqual(self.transport.producerState, "paused")

    def test_the_app_closing_without_an_answer_is_a_502(self):
        from pipegate.http import frames

        pipe = self.pipe()
        pipe.frame_received(frames.End(1))
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.sink.closed, [1])

    def test_an_answer_that_never_ends_is_cut_when_idle(self):
        pipe = self.pipe()
        self.data(pipe, b"HTTP/1.1 200 OK\r\n\r\nstreaming")
        self.clock.advance(9)
        self.data(pipe, b" more")
        self.clock.advance(9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.sink.closed, [1])
        self.assertEqual(pipe.status, 200)
        pipe.connectionLost(None)   # (the caller had read what was queued)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_a_caller_that_never_reads_the_close_is_aborted_an_idle_timeout_later(self):
        pipe = self.pipe()
        self.data(pipe, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
        self.assertTrue(self.transport.disconnecting)   # asked to close: after the flush
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnected)    # aborted
        pipe.connectionLost(None)
        self.assertFalse(self.clock.getDelayedCalls())


class BacklogTests(unittest.TestCase):

    def test_added_where_possible(self):
        self.assertEqual(with_backlog("tcp:8000", 1024), "tcp:8000:backlog=1024")
        self.assertEqual(with_backlog("tcp:8000:interface=127.0.0.1", 7), "tcp:8000:interface=127.0.0.1:backlog=7")
        self.assertEqual(with_backlog("ssl:443:privateKey=k.pem", 9), "ssl:443:privateKey=k.pem:backlog=9")
        self.assertEqual(with_backlog("unix:/run/p.sock", 9), "unix:/run/p.sock:backlog=9")
        self.assertEqual(with_backlog("haproxy:tcp:8000", 9), "haproxy:tcp:8000:backlog=9")
        from twisted.internet import endpoints
        for description in ("tcp:0:backlog=9", "haproxy:tcp:0:backlog=9", "unix:/tmp/x.sock:backlog=9"):
            endpoints.serverFromString(reactor, description)  # every form parses

    def test_left_alone(self):
        for description in ("tcp:8000:backlog=5", "systemd:domain=INET:index=0", "tcp:8000:backlog=5:interface=::"):
            self.assertEqual(with_backlog(description, 1024), description)


class StatusAccessTests(unittest.TestCase):

    def _request(self, host: str, authorization: bytes | None = None):
        from twisted.internet.address import IPv4Address
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b"status"])
        request.client = IPv4Address("TCP", host, 1234)
        if authorization:
            request.requestHeaders.setRawHeaders(b"authorization", [authorization])
        return request

    def test_loopback_only_without_a_token(self):
        access = StatusAccess()
        self.assertIsNone(access.refusal(self._request("127.0.0.1")))
        self.assertEqual(access.refusal(self._request("192.0.2.1"))[0], 403)

    def test_token_required_from_everyone(self):
        access = StatusAccess("s3cret-token")
        self.assertEqual(access.refusal(self._request("127.0.0.1"))[0], 401)
        self.assertEqual(access.refusal(self._request("192.0.2.1", b"Bearer wrong"))[0], 401)
        self.assertIsNone(access.refusal(self._request("192.0.2.1", b"Bearer s3cret-token")))


class EdgeRelay(unittest.TestCase):
    """One relay, tunnel t1 to a RawApp through a real connector."""

    async def start(self, **config):
        self.loop = Loopback(self)
        self.app = RawApp()
        self.app_port = await self.loop.listen(self.app)
        config.setdefault("request_timeout", 30)
        self.relay, self.port = await self.loop.relay(**config)
        await self.loop.connector(self.port, self.app_port, "t1")
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def closed(self, proto, timeout: float = 10.0) -> bytes:
        await eventually(lambda: proto.done.called, timeout=timeout)
        return bytes(proto.received)

    async def bystander_ok(self):
        raw = await raw_request(self.port, b"GET /t1/ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                BYSTANDER)
        self.assertIn(b" 200 ", split_response(raw)[0])

    # item 1: smuggling through an upgrade the app refused
    async def test_requests_after_a_refused_upgrade_never_reach_the_app(self):
        await self.start()
        proto = await connect_raw(self.port, upgrade_request(b"/no"), ATTACKER)
        await eventually(lambda: b"hello" in proto.received)
        # The attacker's next request on that connection, aimed past the tunnel's base path.
        if not proto.done.called:
            proto.transport.write(b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
        raw = await self.closed(proto)
        status, headers, body = split_response(raw)
        self.assertEqual((status, body), (b"HTTP/1.1 200 OK", b"hello"))
        self.assertIn((b"connection", b"close"), headers)
        self.assertEqual(len(self.app.heads), 1)
        self.assertEqual(self.app.after, [])
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 0)
        self.assertEqual(self.relay.stats.get("upgrades", "refused"), 1)
        await self.bystander_ok()

    async def test_refused_upgrade_with_a_chunked_answer_ends_with_it(self):
        await self.start()
        proto = await connect_raw(self.port, upgrade_request(b"/chunked"), ATTACKER)
        raw = await self.closed(proto)
        self.assertEqual(split_response(raw)[2], b"3\r\nabc\r\n0\r\n\r\n")

    # item 14: an upgrade and a second request in one write
    async def test_pipelined_after_a_refused_upgrade_closes_deterministically(self):
        await self.start()
        proto = await connect_raw(self.port, upgrade_request(b"/no")
                                  + b"GET /t1/ok HTTP/1.1\r\nHost: x\r\n\r\n", ATTACKER)
        raw = await self.closed(proto)
        self.assertEqual(split_response(raw)[2], b"hello")
        self.assertEqual(len(self.app.heads), 1)
        self.assertEqual(self.app.after, [])

    async def test_pipelined_bytes_after_an_accepted_upgrade_are_kept(self):
        await self.start()
        proto = await connect_raw(self.port, upgrade_request(b"/ws") + b"early bytes", ATTACKER)
        await eventually(lambda: proto.received.endswith(b"early bytes"))
        self.assertTrue(proto.received.startswith(b"HTTP/1.1 101 "))
        proto.transport.write(b"+more")
        await eventually(lambda: proto.received.endswith(b"early bytes+more"))
        proto.transport.loseConnection()
        await self.closed(proto)

    async def test_pipelined_while_waiting_for_a_connector(self):
        await self.start(offline_grace=5)
        proto = await connect_raw(self.port, b"GET /t2/ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n"
                                  + b"GET /t2/ok HTTP/1.1\r\nHost: x\r\n\r\n", ATTACKER)
        await eventually(lambda: "t2" in self.relay.tunnels)
        await self.loop.connector(self.port, self.app_port, "t2")
        await eventually(lambda: b"GET /t2/ok" in proto.received)  # echoed by the app after its 101
        self.assertTrue(proto.received.startswith(b"HTTP/1.1 101 "))
        proto.transport.loseConnection()
        await self.closed(proto)

    # item 2: slot starvation
    async def test_one_caller_cannot_hold_every_slot(self):
        await self.start(max_in_flight=8, caller_share=25)  # 2 waiting per caller IP
        held = [await connect_raw(self.port, upgrade_request(b"/silent"), ATTACKER) for _ in range(2)]
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 2)
        refused = [await connect_raw(self.port, upgrade_request(b"/silent"), ATTACKER) for _ in range(6)]
        for proto in refused:  # answered; the connection stays in plain HTTP handling
            await eventually(lambda: b"\r\n\r\n" in proto.received)
            self.assertIn(b" 503 ", split_response(bytes(proto.received))[0])
            proto.transport.loseConnection()
        self.assertEqual(self.relay.stats.get("caller_share_refusals"), 6)
        self.assertEqual(self.relay.tunnels["t1"].in_flight, 2)
        for _ in range(3):
            await self.bystander_ok()
        for proto in held:
            proto.transport.loseConnection()
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 0)
        self.assertEqual(self.relay.tunnels["t1"].callers.held(), 0)

    async def test_a_full_tunnel_counts_its_refusals_by_tunnel(self):
        """Operator: a 503 for --max-in-flight was only a 503 in requests_total, with no reason."""
        await self.start(max_in_flight=2, caller_share=100)
        held = [await connect_raw(self.port, upgrade_request(b"/silent"), ATTACKER) for _ in range(2)]
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 2)
        refused = await connect_raw(self.port, upgrade_request(b"/silent"), ATTACKER)
        await eventually(lambda: b"\r\n\r\n" in refused.received)
        self.assertIn(b" 503 ", split_response(bytes(refused.received))[0])
        refused.transport.loseConnection()
        self.assertEqual(self.relay.stats.by_label("in_flight_refusals"), {"t1": 1})
        from pipegate.status import relay_status

        self.assertEqual(relay_status(self.relay)["tunnels"][0]["refused_full"], 1)   # pipegate status
        self.assertEqual(self.relay.stats.get("caller_share_refusals"), 0)
        for proto in held:
            proto.transport.loseConnection()
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 0)

    async def test_one_ipv6_64_is_one_caller(self):
        """Issue 17 review: each IPv6 address had its own share, so one host's /64 took every slot."""
        from pipegate.http.forwarded import parse_trusted_proxies

        await self.start(max_in_flight=8, caller_share=25, trusted_proxies=parse_trusted_proxies(ATTACKER))

        def via_proxy(ip):
            return connect_raw(self.port, upgrade_request(b"/silent", b"X-Forwarded-For: " + ip + b"\r\n"),
                               ATTACKER)
        held = [await via_proxy(b"2001:db8:1:2::%d" % n) for n in (1, 2)]
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 2)
        refused = await via_proxy(b"2001:db8:1:2::3")           # same /64: its share is used up
        await eventually(lambda: b"\r\n\r\n" in refused.received)
        self.assertIn(b" 503 ", split_response(bytes(refused.received))[0])
        refused.transport.loseConnection()
        held.append(await via_proxy(b"2001:db8:1:3::1"))         # the next /64 is another caller
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 3)
        self.assertEqual(self.relay.stats.get("caller_share_refusals"), 1)
        for proto in held:
            proto.transport.loseConnection()
        await eventually(lambda: self.relay.tunnels["t1"].callers.held() == 0)

    async def test_waiting_for_an_answer_head_times_out(self):
        await self.start(request_timeout=0.5)
        proto = await connect_raw(self.port, upgrade_request(b"/silent"), ATTACKER)
        raw = await self.closed(proto)
        self.assertIn(b" 504 ", split_response(raw)[0])
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 0)
        self.assertEqual(self.relay.stats.by_label("upgrades"), {"failed": 1})

    async def test_an_idle_upgraded_pipe_is_closed(self):
        await self.start(upgrade_idle_timeout=0.5)
        proto = await connect_raw(self.port, upgrade_request(b"/ws"), ATTACKER)
        await eventually(lambda: b"101" in proto.received)
        await self.closed(proto)
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 0)
        self.assertEqual(self.relay.tunnels["t1"].callers.held(), 0)

    # item 5: no spooling before routing
    async def test_no_body_is_read_before_routing(self):
        await self.start(max_body_bytes=1000)
        head = (b"POST /%s HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"Content-Length: 1000000000\r\n\r\n")
        # Each is answered from the head alone: unknown tunnel, too large, health.
        for path, code in ((b"nobody/x", b" 413 "), (b"t1/x", b" 413 "), (b"-/x", b" 404 ")):
            proto = await connect_raw(self.port, head % path, ATTACKER)
            raw = await self.closed(proto)
            self.assertIn(code, split_response(raw)[0], path)
        for method, code in ((b"GET", b" 200 "), (b"POST", b" 405 ")):
            proto = await connect_raw(self.port, method + b" /healthz HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: 1000000000\r\n\r\n", ATTACKER)
            raw = await self.closed(proto)
            self.assertIn(code, split_response(raw)[0])
        # A login with a body is refused at its head too.
        proto = await connect_raw(self.port, b"GET /t1 HTTP/1.1\r\nHost: x\r\n" + UPGRADE
                                  + b"Sec-WebSocket-Protocol: pipegate.v1\r\nContent-Length: 999999999\r\n\r\n",
                                  ATTACKER)
        raw = await self.closed(proto)
        self.assertIn(b" 400 ", split_response(raw)[0])
        self.assertEqual(self.app.heads, [])

    async def test_an_upgrade_with_a_body_is_a_plain_bounded_request(self):
        await self.start(max_body_bytes=1000)
        raw = await raw_request(self.port, b"POST /t1/ok HTTP/1.1\r\nHost: x\r\n" + UPGRADE
                                + b"Content-Length: 4\r\nConnection: close\r\n\r\nbody", ATTACKER)
        self.assertIn(b" 200 ", split_response(raw)[0])
        self.assertNotIn(b"upgrade:", self.app.heads[0].lower())
        self.assertIn(b"content-length: 4", self.app.heads[0].lower())

    # item 12: upgraded connections are access-logged
    async def test_an_upgraded_connection_gets_one_access_line(self):
        await self.start(access_log=True)
        proto = await connect_raw(self.port, upgrade_request(b"/ws?token=secret"), ATTACKER)
        await eventually(lambda: b"101" in proto.received)
        proto.transport.write(b"abc")
        await eventually(lambda: proto.received.endswith(b"abc"))
        proto.transport.loseConnection()
        await self.closed(proto)

        def lines():
            return [formatEvent(e) for e in self.events if "/t1/ws" in formatEvent(e)]
        await eventually(lambda: len(lines()) == 1)
        line = lines()[0]
        self.assertIn('"GET /t1/ws?token=<redacted> HTTP/1.1" 101', line)
        self.assertIn("upgrade duration=", line)
        self.assertIn(" up=3 ", line)
        self.assertNotIn("secret", line)


class ConnectionCaps(unittest.TestCase):
    """Item 9 in process: the gate in front of a real relay."""

    async def test_per_ip_and_total_caps_refuse_and_others_keep_working(self):
        from pipegate.http.forwarded import parse_trusted_proxies
        from pipegate.tap.server import _TrustedPeers

        loop = Loopback(self)
        relay, _ = await loop.relay()
        refused = []
        budget = Budget(per_source=3, total=8, exempt=_TrustedPeers(parse_trusted_proxies("127.0.0.4")))
        gate = ConnectionGate(RelaySite(relay), budget, reactor, what="relay", on_refused=refused.append)
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(gate)
        self.addCleanup(port.stopListening)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        idle = [await connect_raw(port, b"", ATTACKER) for _ in range(3)]
        await eventually(lambda: budget.held(ATTACKER) == 3)
        extra = [await connect_raw(port, b"", ATTACKER) for _ in range(20)]
        for proto in extra:
            await eventually(lambda: proto.done.called)
        self.assertEqual(refused, ["per-source"] * 20)
        warnings = [formatEvent(e) for e in events if "connection refused" in str(e.get("log_format", ""))]
        self.assertEqual(len(warnings), 1, warnings)
        # Existing connections still work, and so does everyone else.
        idle[0].transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: b" 200 " in idle[0].received)
        raw = await raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", BYSTANDER)
        self.assertIn(b" 200 ", raw)
        # A trusted proxy is held to the total cap only.
        proxied = [await connect_raw(port, b"", "127.0.0.4") for _ in range(5)]
        await eventually(lambda: budget.held("127.0.0.4") == 5)
        late = await connect_raw(port, b"", BYSTANDER)
        await eventually(lambda: late.done.called)
        self.assertEqual(refused[-1], "total")
        for proto in idle + proxied:
            proto.transport.loseConnection()
        await eventually(lambda: budget.held() == 0 and not gate.protocols)


class BigAnswer(protocol.Protocol):
    """A local app that answers every request head with C{size} bytes (a 200, or a refused upgrade)."""

    size = 200_000

    def dataReceived(self, data):
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size
                                 + b"x" * self.size)


def unread_socket(port, source: str) -> socket.socket:
    """A connection from C{source} that reads nothing: a 4 KiB receive buffer, set before it connects."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port.getHost().port))
    sock.setblocking(False)
    return sock


class UnreadAnswers(unittest.TestCase):
    """
    A caller asks for an answer on a connection that closes after it, and never reads it.
    twisted.web's loseConnection waits until the caller has read the whole answer, with no
    timer running once the answer is done: the connection, its fd and its unit of the per-IP
    and total caps stayed for ever.  Now the idle timeout runs from the answer's end.
    """

    async def caller(self, head: bytes, **config):
        """A caller from ATTACKER with 4 KiB buffers both ends, that has sent C{head}: (relay, budget, socket)."""
        loop = Loopback(self)
        app = await loop.listen(protocol.Factory.forProtocol(BigAnswer))
        relay, _ = await loop.relay(idle_timeout=1.0, upgrade_idle_timeout=1.0, request_timeout=30, **config)
        budget = Budget(per_source=5, total=100)
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            ConnectionGate(RelaySite(relay), budget, reactor, what="relay"))
        self.addCleanup(port.stopListening)
        await loop.connector(port, app, "t1")
        gate = port.factory
        sock = unread_socket(port, ATTACKER)
        self.addCleanup(sock.close)
        await eventually(lambda: budget.held(ATTACKER) == 1)
        # The kernel's buffers kept small at the relay's end too (4 KiB), so that most of the
        # answer (within one stream window, 256 KiB) waits in the relay's transport.
        [caller] = [p for p in gate.protocols if p.transport.getPeer().host == ATTACKER]
        caller.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.send(head)
        return relay, budget, sock

    async def attack(self, head: bytes, answered):
        relay, budget, sock = await self.caller(head)
        await eventually(lambda: relay.tunnels["t1"].in_flight == 0 and answered(relay.stats))
        self.assertEqual(budget.held(ATTACKER), 1)   # the answer is done, its end still queued
        done = reactor.seconds()
        await eventually(lambda: budget.held(ATTACKER) == 0, timeout=5)
        self.assertGreater(reactor.seconds() - done, 0.5)   # not at once: an idle timeout after

    async def test_a_closing_connection_whose_caller_never_reads(self):
        await self.attack(b"GET /t1/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                          lambda stats: stats.get("requests", "200"))

    async def test_a_refused_login_after_an_unread_answer(self):
        # A keep-alive answer the caller does not read, then, pipelined, a connector login
        # with a bad token: Autobahn takes the connection over, refuses the login and waits,
        # with no timer, for the caller to read the answer queued ahead of its refusal.
        login = (b"GET /t1 HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"Sec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: pipegate.v1\r\n"
                 b"Authorization: Bearer not-a-token\r\n\r\n")
        await self.attack(b"GET /t1/big HTTP/1.1\r\nHost: x\r\n\r\n" + login,
                          lambda stats: stats.get("requests", "200"))

    async def test_a_refused_upgrade_whose_caller_never_reads(self):
        await self.attack(upgrade_request(b"/big"), lambda stats: stats.get("upgrades", "refused"))

    async def test_a_caller_that_takes_a_trickle_of_its_unread_answer_is_cut(self):
        # Acknowledging a little in each idle timeout kept the connection, and the answer's
        # buffers at the relay, for as long as the caller liked: each timeout must now see
        # --min-download-rate bytes a second taken (100 kB/s here; the caller takes 8 KB/s).
        for head in (b"GET /t1/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", upgrade_request(b"/big")):
            relay, budget, sock = await self.caller(head, min_download_rate=100_000)
            await eventually(lambda: relay.tunnels["t1"].in_flight == 0)
            reading = defer.ensureDeferred(read_steadily(sock, 4096, 0.5, timeout=30))
            await eventually(lambda: budget.held(ATTACKER) == 0, timeout=5)
            ended, got = await reading
            self.assertLess(len(got.partition(b"\r\n\r\n")[2]), BigAnswer.size, head)

    async def answer_read_steadily(self, head: bytes) -> tuple[str, int]:
        """Send C{head}, then read 4 KiB every 50 ms (about 80 KB/s: never 1 s without a byte)
        until the end: (how it ended, the body's length)."""
        relay, budget, sock = await self.caller(head)
        ended, got = await read_steadily(sock, 4096, 0.05, timeout=20)
        return ended, len(got.partition(b"\r\n\r\n")[2])

    async def test_a_slow_but_steady_reader_gets_the_whole_answer(self):
        # The idle timeout that cuts a caller who never reads moves on while the caller takes
        # its answer (pipegate.sockets.UnreadAbort): the review found these cut mid-answer.
        for head in (b"GET /t1/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                     b"GET /t1/big HTTP/1.0\r\nHost: x\r\n\r\n", upgrade_request(b"/big")):
            self.assertEqual(await self.answer_read_steadily(head), ("eof", BigAnswer.size), head)


# -- child processes under a lowered RLIMIT_NOFILE


class RelayProcess(unittest.TestCase):

    def setUp(self):
        self.port = free_port()
        self.metrics = free_port()

    def start(self, *options: str, nofile: int = 128):
        argv = limited_twistd(nofile) + ["-n", "--pidfile=", "pipegate-server", "--listen",
                                         f"tcp:{self.port}:interface=127.0.0.1",
                                         "--metrics", f"tcp:{self.metrics}:interface=127.0.0.1", *options]
        self.child = spawn(self, argv, child_env(PIPEGATE_JWT_SECRET=SECRET))

    async def healthz(self, source: str = BYSTANDER) -> bytes:
        return await raw_request(self.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                 source)

    async def up(self):
        async def answers():
            try:
                return b" 200 " in await self.healthz()
            except Exception:
                return False
        for _ in range(300):
            if await answers():
                return
            await deferLater(0.05)
        self.fail("relay did not start: " + self.child.output.decode())

    async def flood(self, count: int) -> list:
        protos = []
        for _ in range(count):
            try:
                protos.append(await connect_raw(self.port, b"", ATTACKER))
            except Exception:
                break
        self.addCleanup(lambda: [p.transport.abortConnection() for p in protos if not p.done.called])
        return protos

    async def metric(self, name: str) -> str:
        raw = await raw_request(self.metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return "\n".join(line for line in raw.decode().splitlines() if line.startswith(name))

    async def test_idle_connections_from_one_ip_cannot_exhaust_fds(self):
        self.start()
        await self.up()
        out = self.child.output.decode()
        self.assertIn("public connections capped at 16 per IP and 64 in total; new ones at 50 a second", out)
        protos = await self.flood(300)
        await eventually(lambda: b"connection refused" in self.child.output, timeout=20)
        for _ in range(5):
            self.assertIn(b" 200 ", await self.healthz())
        self.assertIn('cap="per-source"', await self.metric("pipegate_connections_refused_total"))
        held = [p for p in protos if not p.done.called]
        self.assertEqual(len(held), 16)
        self.assertEqual(self.child.output.count(b"connection refused"), 1)
        self.assertNotIn(b"Unhandled", self.child.output)
        self.assertNotIn(b"Traceback", self.child.output)

    async def test_one_ip_opening_and_closing_connections_is_rate_limited(self):
        # The per-IP cap bounds connections held at once; one address that opens and closes
        # them one after another (on https, a TLS handshake each) meets --conn-rate-per-ip.
        self.start("--conn-rate-per-ip", "0.5", "--max-connections-per-ip", "5")
        await self.up()
        self.assertIn(b"new ones at 0.5 a second per IP", self.child.output)
        for _ in range(20):
            proto = await connect_raw(self.port, b"", ATTACKER)
            await deferLater(0.02)
            proto.transport.abortConnection()
        await eventually(lambda: b"rate cap" in self.child.output)
        refused = await self.metric('pipegate_connections_refused_total{cap="rate"}')
        count = int(float(refused.split()[-1]))
        self.assertGreaterEqual(count, 12)   # the burst of 5 at most, and what 0.5/s refilled
        self.assertLessEqual(count, 15)      # the burst always gets in
        self.assertIn(b"0.5 new connections a second (bursts of 5)", self.child.output)
        self.assertEqual(self.child.output.count(b"rate cap"), 1)
        for _ in range(3):                   # everyone else still gets in
            self.assertIn(b" 200 ", await self.healthz())

    async def test_emfile_pauses_accepting_and_the_listener_survives(self):
        self.start("--max-connections", "10000", "--max-connections-per-ip", "10000")
        await self.up()
        protos = await self.flood(300)
        await eventually(lambda: b"accepting paused" in self.child.output, timeout=20)
        for proto in protos:
            proto.transport.abortConnection()
        await self.up()
        self.assertIn('cap="emfile"', await self.metric("pipegate_connections_refused_total"))
        self.assertNotIn(b"Unhandled", self.child.output)
        self.assertNotIn(b"Traceback", self.child.output)

    async def test_listen_backlog_holds_a_burst_while_the_relay_is_busy(self):
        self.start("--max-connections-per-ip", "1000", nofile=4096)
        await self.up()
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{self.port}"], capture_output=True,
                                   text=True, check=True).stdout
        self.assertEqual(listening.split()[2], "1024", listening)  # Send-Q of a listener: its backlog
        # While the relay does not accept (stopped here; busy in real life), the kernel's accept
        # queue completes the handshakes of a burst of 200; with Twisted's 50, 149 would be
        # left to SYN retries (1 s, then 3 s...).
        pid = self.child.transport.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            burst = [defer.Deferred.fromCoroutine(connect_raw(self.port, b"GET /healthz HTTP/1.1\r\n"
                                                              b"Host: x\r\nConnection: close\r\n\r\n", BYSTANDER))
                     for _ in range(200)]
            connected = []
            for d in burst:
                d.addCallback(connected.append)
            await eventually(lambda: len(connected) == 200, timeout=0.9)
        finally:
            os.kill(pid, signal.SIGCONT)
        for proto in connected:
            self.assertIn(b" 200 ", await proto.done)
        self.assertNotIn(b"Traceback", self.child.output)

    async def test_status_is_private_by_default(self):
        self.start("--status-token", "a-long-status-token")
        await self.up()
        raw = await raw_request(self.metrics, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 401 ", raw)
        raw = await raw_request(self.metrics, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                b"Authorization: Bearer a-long-status-token\r\n\r\n")
        self.assertIn(b" 200 ", raw)
        self.assertIn(b'"service": "relay"', raw)


def deferLater(seconds: float):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)



class RelayEdgeOptions(unittest.TestCase):
    """The new options of pipegate-server: variables, defaults, bad values, derived caps."""

    def parse(self, *args, **env):
        from pipegate.tap import server

        options = server.Options()
        options.environ = dict(env, PIPEGATE_JWT_SECRET="edge-test-secret-" + "0123456789abcdef" * 3)
        options.parseOptions(list(args))
        return options

    def test_defaults_and_variables(self):
        from pipegate.tap.server import relay_config

        options = self.parse()
        self.assertEqual((options["upgrade-idle-timeout"], options["caller-share"], options["backlog"],
                          options["max-connections"], options["max-connections-per-ip"], options["status-token"]),
                         (300.0, 50, 1024, 0, 0, None))
        options = self.parse("--caller-share", "10", PIPEGATE_CALLER_SHARE="30", PIPEGATE_BACKLOG="77",
                             PIPEGATE_UPGRADE_IDLE_TIMEOUT="5", PIPEGATE_STATUS_TOKEN="t" * 20)
        config = relay_config(options)
        self.assertEqual((config.caller_share, config.upgrade_idle_timeout, options["backlog"],
                          options["status-token"]), (10, 5.0, 77, "t" * 20))

    def test_bad_values_name_the_option(self):
        for args in (["--caller-share", "101"], ["--caller-share", "0"], ["--backlog", "0"],
                     ["--max-connections", "-1"]):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(*args)
            self.assertIn(args[0], str(caught.exception))

    def test_caps_from_the_fd_budget(self):
        from pipegate.tap.server import connection_caps

        self.assertEqual(connection_caps(self.parse(), 960), (240, 960))
        self.assertEqual(connection_caps(self.parse(), 100_000), (256, 100_000))
        self.assertEqual(connection_caps(self.parse("--max-connections-per-ip", "5", "--max-connections", "50"), 960),
                         (5, 50))


class EmfileGuardTests(unittest.TestCase):
    """The pause and resume, driven by Twisted's own EMFILE event on a private publisher."""

    def test_pauses_then_resumes_with_a_growing_pause(self):
        from twisted.internet.task import Clock
        from twisted.logger import Logger, LogPublisher

        from pipegate.accept import EmfileGuard

        class Port:
            connected, disconnecting, reading = True, False, True

            def stopReading(self):
                self.reading = False

            def startReading(self):
                self.reading = True

        clock, publisher, port, pauses = Clock(), LogPublisher(), Port(), []
        guard = EmfileGuard(clock, publisher=publisher, on_pause=lambda: pauses.append(clock.seconds()))
        guard.ports.append(port)
        guard.startService()
        self.addCleanup(guard.stopService)
        emit = Logger(observer=publisher)
        # The text Twisted's TCP port logs (twisted.internet.tcp._accept).
        emit.info("EMFILE encountered; releasing reserved file descriptor.")
        self.assertFalse(port.reading)
        emit.info("EMFILE encountered; releasing reserved file descriptor.")  # while paused: one pause
        self.assertEqual(len(pauses), 1)
        clock.advance(0.5)
        self.assertTrue(port.reading)
        emit.info("EMFILE encountered; releasing reserved file descriptor.")  # again at once: longer
        clock.advance(0.5)
        self.assertFalse(port.reading)
        clock.advance(0.5)
        self.assertTrue(port.reading)
        clock.advance(60)
        emit.info("EMFILE encountered; releasing reserved file descriptor.")  # after a quiet spell: short
        clock.advance(0.5)
        self.assertTrue(port.reading)
        self.assertEqual(guard.pauses, 3)

    def test_the_text_matches_twisted(self):
        import inspect

        from twisted.internet import tcp

        from pipegate.accept import EmfileGuard

        self.assertIn(f'"{EmfileGuard.MARK};', inspect.getsource(tcp._accept))
