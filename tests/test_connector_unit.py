"""
The connector's stream handling without sockets: frames from the relay fed to a
L{ConnectorSession}, the link to the relay replaced by a recorder of the frames the
connector sends, the local app's end a L{StringTransport} behind the connector's real
HTTP/1.1 client (L{AppPool}: it writes the request the app would read and parses the
response bytes the test plays as the app), time on a L{MemoryReactorClock}.
"""

from __future__ import annotations

import weakref

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from pipegate.core import window
from pipegate.http import frames
from pipegate.http.appclient import AppPool
from pipegate.http.connector import ConnectorSession
from pipegate.http.target import ConnectorConfig, Target
from tests.support import collector_off

INITIAL = window.INITIAL_WINDOW


class RelayEnd:
    """The link to the relay: records every frame the connector sends, after a round trip
    through the codec (what the relay would decode)."""

    def __init__(self) -> None:
        self.sent: list[frames.Frame] = []

    def send(self, frame: frames.Frame) -> None:
        self.sent.append(frames.decode(frames.encode(frame)))

    def take(self) -> list[frames.Frame]:
        sent, self.sent = self.sent, []
        return sent


@implementer(IStreamClientEndpoint)
class AppEndpoint:
    """Connects the pool's HTTP client protocols to in-memory transports: the local app."""

    def __init__(self) -> None:
        self.connections: list[tuple[object, StringTransport]] = []
        self.refuse: Exception | None = None
        self.hold = False  # True: connections wait for complete()
        self.pending: list[tuple[object, defer.Deferred]] = []

    def endpointForURI(self, uri):
        self.uri = uri
        return self

    def connect(self, factory):
        if self.refuse is not None:
            return defer.fail(self.refuse)
        if self.hold:
            d = defer.Deferred()
            self.pending.append((factory, d))
            return d
        return defer.succeed(self.made(factory))

    def complete(self) -> tuple[object, StringTransport]:
        factory, d = self.pending.pop(0)
        d.callback(self.made(factory))
        return self.connections[-1]

    def made(self, factory):
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 3000))
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return protocol


class Harness:
    def __init__(self, testcase, **config) -> None:
        self.clock = MemoryReactorClock()
        self.app = AppEndpoint()
        self.pool = AppPool(self.clock, self.app, max_idle=config.pop("max_idle", 0))
        self.budget = window.GrowthBudget(config.pop("window_budget", 16 * INITIAL))
        config.setdefault("max_window", INITIAL)  # a fixed window unless a test lets it grow
        self.config = ConnectorConfig(Target.parse("http://127.0.0.1:3000/base"), **config)
        self.relay = RelayEnd()
        self.session = ConnectorSession(self.relay, self.config, self.pool, self.clock, self.budget)
        testcase.addCleanup(self.session.lost)

    def request(self, stream: int = 1, method: bytes = b"GET", target: bytes = b"/x",
                headers=(), end: bool = True, **fields) -> tuple[object, StringTransport]:
        count = len(self.app.connections)
        self.session.frame_received(frames.RequestHead(stream, method, target, headers=tuple(headers),
                                                        end=end, **fields))
        if len(self.app.connections) == count:
            return None, None
        return self.app.connections[-1]

    def frame(self, frame: frames.Frame) -> None:
        self.session.frame_received(frame)


def head_and_body(raw: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def header(lines: list[bytes], name: bytes) -> list[bytes]:
    return [line.split(b":", 1)[1].strip() for line in lines[1:] if line.split(b":", 1)[0].lower() == name]


def data_of(sent: list[frames.Frame]) -> bytes:
    return b"".join(f.data for f in sent if isinstance(f, frames.Data))


def credit_of(sent: list[frames.Frame]) -> int:
    return sum(f.increment for f in sent if isinstance(f, frames.Window))


class RequestHeadTests(unittest.TestCase):
    def test_head_becomes_a_local_request(self):
        h = Harness(self)
        protocol, app = h.request(
            target=b"/a/../b/caf\xc3\xa9?q=1&q=2", client=b"203.0.113.9", scheme=b"https",
            host=b"t1.example", prefix=b"/t1", correlation=b"corr-1",
            headers=[(b"Host", b"relay.example"), (b"Accept", b"*/*"), (b"Connection", b"close, X-Hop"),
                     (b"X-Hop", b"secret"), (b"X-Forwarded-For", b"198.51.100.1"),
                     (b"Cookie", b"a=1"), (b"Cookie", b"b=2"), (b"x-pipegate-correlation-id", b"forged")])
        lines, body = head_and_body(app.value())
        self.assertEqual(lines[0], b"GET /base/b/caf%C3%A9?q=1&q=2 HTTP/1.1")
        self.assertEqual(header(lines, b"host"), [b"127.0.0.1:3000"])
        self.assertEqual(header(lines, b"accept"), [b"*/*"])
        self.assertEqual(header(lines, b"x-hop"), [])
        self.assertEqual(header(lines, b"cookie"), [b"a=1", b"b=2"])
        self.assertEqual(header(lines, b"x-forwarded-for"), [b"198.51.100.1, 203.0.113.9"])
        self.assertEqual(header(lines, b"x-forwarded-proto"), [b"https"])
        self.assertEqual(header(lines, b"x-forwarded-host"), [b"t1.example"])
        self.assertEqual(header(lines, b"x-forwarded-prefix"), [b"/t1"])
        self.assertEqual(header(lines, b"x-pipegate-correlation-id"), [b"corr-1"])
        self.assertEqual(body, b"")
        self.assertEqual(h.relay.sent, [])

    def test_invalid_content_length_is_reset_before_the_app(self):
        h = Harness(self)
        protocol, app = h.request(method=b"POST", headers=[(b"Content-Length", b"ten")], end=False)
        self.assertIsNone(app)
        self.assertEqual(h.relay.take(), [frames.Reset(1, 400, b"invalid Content-Length")])
        self.assertEqual(h.session.streams, {})

    def test_reused_stream_id_is_a_protocol_error(self):
        h = Harness(self)
        h.request(stream=1)
        self.assertRaises(frames.FrameError, h.request, stream=1)
        self.assertRaises(frames.FrameError, h.request, stream=0)

    def test_busy_connector_resets_with_503(self):
        h = Harness(self, max_streams=2)
        h.request(stream=1)
        h.request(stream=3)
        _, app = h.request(stream=5)
        self.assertIsNone(app)
        self.assertEqual(h.relay.take(), [frames.Reset(5, 503, b"connector busy")])
        self.assertEqual(sorted(h.session.streams), [1, 3])

    def test_unreachable_app_resets_with_502(self):
        h = Harness(self)
        h.app.refuse = ConnectionRefusedError("connection refused")
        h.request()
        [reset] = h.relay.take()
        self.assertEqual((reset.stream, reset.code), (1, 502))
        self.assertIn(b"local app unreachable", reset.reason)
        self.assertEqual(h.session.streams, {})

    def test_unreachable_app_log_line_names_the_target(self):
        # The connector's line said only "connection refused": a newcomer whose app was not
        # started (or listens on another port) now reads which TARGET_URL it tried.  The
        # caller's 502 does not name it (a stranger need not learn the private address).
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import formatEvent, globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h = Harness(self)
        h.app.refuse = ConnectionRefusedError("connection refused")
        h.request()
        [reset] = h.relay.take()
        self.assertNotIn(b"127.0.0.1", reset.reason)
        [line] = [formatEvent(e) for e in events if "failed: 502" in formatEvent(e)]
        self.assertTrue(line.endswith("(is the app at http://127.0.0.1:3000/base/ running?)"), line)


class ResponseTests(unittest.TestCase):
    def test_response_head_body_and_end(self):
        h = Harness(self)
        protocol, app = h.request()
        protocol.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-App: 1\r\n"
                              b"Connection: close, X-Hop\r\nX-Hop: 2\r\n\r\nhello")
        head, data, end = h.relay.take()
        self.assertEqual((head.stream, head.status, head.reason), (1, 201, b"Created"))
        names = [n.lower() for n, v in head.headers]
        self.assertIn(b"x-app", names)
        self.assertNotIn(b"connection", names)
        self.assertIn((b"Content-Length", b"5"), head.headers)
        self.assertEqual(data, frames.Data(1, b"hello"))
        self.assertEqual(end, frames.End(1))
        self.assertEqual(h.session.streams, {})

    def test_an_answered_stream_is_freed_without_the_cycle_collector(self):
        # (A stream and its ResponseForwarder held each other: 7 objects a request left in
        # reference cycles.)
        h = Harness(self, max_idle=1)
        with collector_off():
            protocol, _ = h.request()
            stream = h.session.streams[1]
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            refs = [weakref.ref(stream), weakref.ref(stream.head)]
            del stream
            self.assertEqual(h.session.streams, {})
            self.assertEqual([ref() for ref in refs], [None, None])

    def test_head_response_keeps_its_length_and_has_no_body(self):
        h = Harness(self)
        protocol, app = h.request(method=b"HEAD")
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
        head, end = h.relay.take()
        self.assertEqual([(n.lower(), v) for n, v in head.headers], [(b"content-length", b"99")])
        self.assertEqual(end, frames.End(1))

    def test_response_waits_for_credit_and_pauses_the_app(self):
        h = Harness(self)
        protocol, app = h.request()
        size = 3 * INITIAL
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        self.assertIsInstance(h.relay.take()[0], frames.ResponseHead)
        body = bytes(range(256)) * (size // 256)
        protocol.dataReceived(body[:2 * INITIAL])
        sent = h.relay.take()
        # One window's worth goes out, in DATA frames no larger than MAX_DATA; the rest
        # waits for credit with the app paused.
        self.assertEqual(data_of(sent), body[:INITIAL])
        self.assertTrue(all(len(f.data) <= window.MAX_DATA for f in sent))
        self.assertEqual(app.producerState, "paused")
        h.frame(frames.Window(1, INITIAL // 2))
        self.assertEqual(data_of(h.relay.take()), body[INITIAL:INITIAL + INITIAL // 2])
        self.assertEqual(app.producerState, "paused")
        h.frame(frames.Window(1, INITIAL // 2))
        self.assertEqual(data_of(h.relay.take()), body[INITIAL + INITIAL // 2:2 * INITIAL])
        self.assertEqual(app.producerState, "paused")  # the queue is sent, but no credit is left
        h.frame(frames.Window(1, INITIAL // 2))
        self.assertEqual(h.relay.take(), [])
        self.assertEqual(app.producerState, "producing")
        protocol.dataReceived(body[2 * INITIAL:])
        self.assertEqual(data_of(h.relay.take()), body[2 * INITIAL:2 * INITIAL + INITIAL // 2])
        self.assertEqual(app.producerState, "paused")  # no END while bytes wait for credit
        self.assertIn(1, h.session.streams)
        h.frame(frames.Window(1, INITIAL))
        sent = h.relay.take()
        self.assertEqual(data_of(sent), body[2 * INITIAL + INITIAL // 2:])
        self.assertEqual(sent[-1], frames.End(1))
        self.assertEqual(h.session.streams, {})

    def test_app_failing_mid_response_resets_with_502(self):
        h = Harness(self)
        protocol, app = h.request()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        h.relay.take()
        protocol.connectionLost(ConnectionResetError("reset by the app"))
        [reset] = h.relay.take()
        self.assertEqual((reset.stream, reset.code, reset.reason),
                         (1, 502, b"the local app failed mid-response"))
        self.assertEqual(h.session.streams, {})

    def test_oversized_response_head_resets_with_502(self):
        h = Harness(self)
        protocol, app = h.request()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X-Big: %s\r\n" % (b"v" * 8000) * 40
                              + b"Content-Length: 0\r\n\r\n")
        [reset] = h.relay.take()
        self.assertEqual((reset.stream, reset.code), (1, 502))
        self.assertEqual(h.session.streams, {})


class ResetTests(unittest.TestCase):
    def test_reset_before_the_response_cancels_the_request(self):
        h = Harness(self)
        protocol, app = h.request()
        h.frame(frames.Reset(1, 499, b"caller left"))
        self.assertEqual(h.session.streams, {})
        self.assertTrue(app.disconnecting or app.disconnected)
        self.assertEqual(h.relay.take(), [])

    def test_reset_mid_response_stops_the_app_and_sends_nothing_more(self):
        h = Harness(self)
        protocol, app = h.request()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * INITIAL))
        protocol.dataReceived(b"x" * INITIAL + b"y" * 10)
        self.assertEqual(len(data_of(h.relay.take())), INITIAL)
        h.frame(frames.Reset(1, 499, b"caller left"))
        self.assertEqual(h.session.streams, {})
        self.assertEqual(app.producerState, "stopped")
        h.frame(frames.Window(1, INITIAL))  # late credit for a gone stream: ignored
        self.assertEqual(h.relay.take(), [])

    def test_reset_mid_upload_gives_the_growth_back(self):
        h = Harness(self, max_window=8 * INITIAL)
        protocol, app = h.request(method=b"PUT", headers=[(b"Content-Length", b"%d" % (8 * INITIAL))],
                                  end=False)
        for _ in range(4):
            h.frame(frames.Data(1, b"u" * (INITIAL // 2)))
        self.assertGreater(h.budget.used, 0)
        h.frame(frames.Reset(1, 499, b"caller left"))
        self.assertEqual(h.budget.used, 0)
        self.assertEqual(h.session.streams, {})

    def test_link_lost_ends_every_stream(self):
        h = Harness(self, max_window=8 * INITIAL)
        _, first = h.request(stream=1)
        _, second = h.request(stream=3, method=b"POST", end=False)
        for _ in range(4):
            h.frame(frames.Data(3, b"u" * (INITIAL // 2)))
        self.assertGreater(h.budget.used, 0)
        h.session.lost()
        self.assertEqual(h.session.streams, {})
        self.assertEqual(h.budget.used, 0)
        self.assertTrue(first.disconnecting or first.disconnected)
        self.assertTrue(second.disconnecting or second.disconnected)


class UploadTests(unittest.TestCase):
    def upload(self, h: Harness, length: int | None = None, **fields):
        headers = [(b"Content-Length", b"%d" % length)] if length is not None else []
        return h.request(method=b"POST", headers=headers, end=False, **fields)

    def test_body_reaches_the_app_and_end_completes_it(self):
        h = Harness(self)
        protocol, app = self.upload(h, 10)
        h.frame(frames.Data(1, b"hello"))
        h.frame(frames.Data(1, b"world"))
        h.frame(frames.End(1))
        lines, body = head_and_body(app.value())
        self.assertEqual(header(lines, b"content-length"), [b"10"])
        self.assertEqual(body, b"helloworld")
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        head, end = h.relay.take()
        self.assertEqual(head.status, 204)
        self.assertEqual(end, frames.End(1))

    def test_body_of_unknown_length_is_chunked(self):
        h = Harness(self)
        protocol, app = self.upload(h)
        h.frame(frames.Data(1, b"hello"))
        h.frame(frames.End(1))
        lines, body = head_and_body(app.value())
        self.assertEqual(header(lines, b"transfer-encoding"), [b"chunked"])
        self.assertEqual(body, b"5\r\nhello\r\n0\r\n\r\n")

    def test_data_before_the_app_connects_is_held(self):
        h = Harness(self)
        h.app.hold = True
        self.upload(h, INITIAL)
        # The Agent starts the body producer once it has a connection to write the
        # request on; until then DATA waits in the body and no credit goes back.
        h.frame(frames.Data(1, b"a" * (INITIAL // 2)))
        h.frame(frames.Data(1, b"b" * (INITIAL // 2)))
        self.assertEqual(h.relay.take(), [])
        self.assertRaises(frames.FrameError, h.frame, frames.Data(1, b"c"))
        protocol, app = h.app.complete()
        self.assertEqual(head_and_body(app.value())[1], b"a" * (INITIAL // 2) + b"b" * (INITIAL // 2))
        self.assertEqual(credit_of(h.relay.take()), INITIAL)

    def test_credit_goes_back_at_half_the_window(self):
        h = Harness(self)
        protocol, app = self.upload(h, 4 * INITIAL)
        chunk = b"d" * (INITIAL // 8)
        for _ in range(3):
            h.frame(frames.Data(1, chunk))
        self.assertEqual(h.relay.take(), [])
        h.frame(frames.Data(1, chunk))
        self.assertEqual(h.relay.take(), [frames.Window(1, INITIAL // 2)])
        self.assertEqual(head_and_body(app.value())[1], chunk * 4)

    def test_overrunning_the_credit_is_a_protocol_error(self):
        h = Harness(self)
        protocol, app = self.upload(h, 4 * INITIAL)
        app.producer.pauseProducing()  # the app is full: no credit goes back
        h.frame(frames.Data(1, b"a" * INITIAL))
        self.assertRaises(frames.FrameError, h.frame, frames.Data(1, b"a"))

    def test_data_without_a_body_is_a_protocol_error(self):
        h = Harness(self)
        h.request(end=True)
        self.assertRaises(frames.FrameError, h.frame, frames.Data(1, b"a"))

    def test_full_app_holds_the_credit_until_it_drains(self):
        h = Harness(self)
        protocol, app = self.upload(h, 4 * INITIAL)
        app.producer.pauseProducing()
        h.frame(frames.Data(1, b"a" * INITIAL))
        self.assertEqual(h.relay.take(), [])
        self.assertEqual(len(head_and_body(app.value())[1]), INITIAL)  # written, not dropped
        h.clock.advance(window.SLOW_SINK / 2)
        app.producer.resumeProducing()
        self.assertEqual(h.relay.take(), [frames.Window(1, INITIAL)])

    def test_window_grows_while_the_app_keeps_up(self):
        h = Harness(self, max_window=4 * INITIAL)
        protocol, app = self.upload(h, 64 * INITIAL)
        granted = self.pump(h, 8 * INITIAL)
        # Every byte sent was paid back, plus the growth: the relay may now have more
        # than the initial window in flight.
        self.assertGreaterEqual(granted - 8 * INITIAL, INITIAL)
        self.assertEqual(h.budget.used, 3 * INITIAL)  # 1 -> 2 -> 4 windows

    def test_growth_is_bounded_by_the_shared_budget(self):
        h = Harness(self, max_window=4 * INITIAL, window_budget=INITIAL)
        protocol, app = self.upload(h, 64 * INITIAL)
        granted = self.pump(h, 8 * INITIAL)
        self.assertEqual(h.budget.used, INITIAL)
        self.assertEqual(granted - 8 * INITIAL, INITIAL)

    def test_slow_app_shrinks_the_window(self):
        h = Harness(self, max_window=4 * INITIAL)
        protocol, app = self.upload(h, 64 * INITIAL)
        self.pump(h, 8 * INITIAL)
        self.assertEqual(h.budget.used, 3 * INITIAL)
        app.producer.pauseProducing()
        h.clock.advance(window.SLOW_SINK)
        app.producer.resumeProducing()
        # Back to the initial window: the growth returns to the budget and the
        # credit already granted is not added to.
        self.assertEqual(h.budget.used, 0)
        self.assertEqual(h.relay.take(), [])

    def test_short_pause_keeps_the_window(self):
        h = Harness(self, max_window=4 * INITIAL)
        protocol, app = self.upload(h, 64 * INITIAL)
        self.pump(h, 8 * INITIAL)
        app.producer.pauseProducing()
        h.clock.advance(window.SLOW_SINK / 2)
        app.producer.resumeProducing()
        self.assertEqual(h.budget.used, 3 * INITIAL)

    def test_stream_end_gives_the_growth_back(self):
        h = Harness(self, max_window=4 * INITIAL)
        protocol, app = self.upload(h, 8 * INITIAL)
        self.pump(h, 8 * INITIAL)
        self.assertEqual(h.budget.used, 3 * INITIAL)
        h.frame(frames.End(1))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(h.relay.take()[-1], frames.End(1))
        self.assertEqual(h.session.streams, {})
        self.assertEqual(h.budget.used, 0)

    def pump(self, h: Harness, total: int) -> int:
        """Send C{total} bytes as the relay would, within the credit it holds; return the credit granted."""
        credit, granted, sent = INITIAL, 0, 0
        while sent < total:
            size = min(window.MAX_DATA, credit, total - sent)
            self.assertGreater(size, 0, "the connector stopped granting credit")
            h.frame(frames.Data(1, b"p" * size))
            sent += size
            credit -= size
            more = credit_of(h.relay.take())
            credit += more
            granted += more
        return granted


class PassthroughTests(unittest.TestCase):
    """An upgrade request (a WebSocket the relay passes through) is a raw pipe to the app."""

    def open(self, h: Harness, early: bytes = b""):
        h.session.frame_received(frames.RequestHead(
            1, b"GET", b"/ws/chat", client=b"203.0.113.9", correlation=b"c1", upgrade=True,
            headers=((b"Host", b"relay.example"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
                     (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"Keep-Alive", b"300"))))
        if early:
            h.frame(frames.Data(1, early))
        host, port, factory, timeout, bind = h.clock.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 3000))
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        app = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(app)
        return protocol, app

    def test_request_head_then_bytes_both_ways(self):
        h = Harness(self)
        protocol, app = self.open(h, early=b"early")
        lines, rest = head_and_body(app.value())
        self.assertEqual(lines[0], b"GET /base/ws/chat HTTP/1.1")
        self.assertEqual(header(lines, b"upgrade"), [b"websocket"])
        self.assertEqual(header(lines, b"connection"), [b"Upgrade"])
        self.assertEqual(header(lines, b"host"), [b"127.0.0.1:3000"])
        self.assertEqual(header(lines, b"keep-alive"), [])
        self.assertEqual(header(lines, b"x-forwarded-for"), [b"203.0.113.9"])
        self.assertEqual(rest, b"early")  # DATA that came before the app answered, in order
        h.frame(frames.Data(1, b"more"))
        self.assertTrue(app.value().endswith(b"earlymore"))
        protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n\r\nhi")
        self.assertEqual(data_of(h.relay.take()), b"HTTP/1.1 101 Switching Protocols\r\n\r\nhi")

    def test_end_from_the_relay_closes_and_the_app_closing_ends_the_stream(self):
        h = Harness(self)
        protocol, app = self.open(h)
        h.frame(frames.End(1))
        self.assertTrue(app.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.relay.take(), [frames.End(1)])
        self.assertEqual(h.session.streams, {})

    def test_reset_aborts_the_app_connection(self):
        h = Harness(self)
        protocol, app = self.open(h)
        h.frame(frames.Reset(1, 499, b"caller left"))
        self.assertTrue(app.disconnecting)
        self.assertEqual(h.session.streams, {})
        self.assertEqual(h.relay.take(), [])

    def test_app_bytes_wait_for_credit(self):
        h = Harness(self)
        protocol, app = self.open(h)
        protocol.dataReceived(b"x" * (INITIAL + 10))
        self.assertEqual(len(data_of(h.relay.take())), INITIAL)
        self.assertEqual(app.producerState, "paused")
        h.frame(frames.Window(1, 100))
        self.assertEqual(len(data_of(h.relay.take())), 10)
        self.assertEqual(app.producerState, "producing")

    def test_unreachable_app_resets_with_502(self):
        h = Harness(self)
        h.session.frame_received(frames.RequestHead(1, b"GET", b"/ws", upgrade=True))
        host, port, factory, timeout, bind = h.clock.tcpClients[-1]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("refused")))
        h.clock.advance(1)
        [reset] = h.relay.take()
        self.assertEqual((reset.stream, reset.code), (1, 502))
        self.assertEqual(h.session.streams, {})


class LinkLossWording(unittest.TestCase):
    """The relay said GOAWAY (drain, revoked token): the log said 'replaced' although the
    new link had not connected (and, for a revoked token, never would)."""

    def test_goaway_link_lost_says_a_new_link_is_being_dialled(self):
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import formatEvent, globalLogPublisher

        from pipegate.http.connector import Connector
        from pipegate.http.target import ConnectorConfig, Target

        reactor = MemoryReactorClock()
        connector = Connector(reactor, ConnectorConfig(Target.parse("http://127.0.0.1:3000")),
                              "ws://127.0.0.1:8000/t1", "token", "t1")
        connector.startService()
        self.addCleanup(connector.stopService)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        link = object()
        connector.links.append(link)
        connector.relay_going_away(link)
        connector.link_down(link, 1000, "relay shutting down")
        lines = [formatEvent(e) for e in events if "link to the relay lost" in formatEvent(e)]
        self.assertEqual(lines, ["link to the relay lost (1000 relay shutting down) after the relay's "
                                 "GOAWAY; a new link is being dialled"])
