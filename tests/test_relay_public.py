"""
The relay's public side on a StringTransport (pipegate/http/public.py, streams.py): what a
caller gets for a connector's RESPONSE_HEAD, how the answer is written, the per-head
deadline on keep-alive connections, and a caller leaving.  Time on a Clock.
"""

from __future__ import annotations

import io
import re
import weakref

import attrs

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from pipegate import auth
from pipegate.http import frames
from pipegate.http.public import RelaySite
from pipegate.http.relay import Relay, RelayConfig
from pipegate.http.streams import RelayStream, next_correlation_id
from tests.support import collector_off
from tests.test_relay_unit import RecordingLink, caller


class RelayCase:
    """A relay on a Clock with a recorded connector link for tunnel C{app}, and one caller."""

    config: dict = {}

    def setUp(self):
        self.clock = Clock()
        self.relay, self.link = self.relay_with(**self.config)
        self.channel, self.transport = self.connect(RelaySite(self.relay))
        self.addCleanup(self.end)

    def relay_with(self, **config):
        relay = Relay(RelayConfig(jwt=auth.JWTSettings(secret="s" * 32), **config), self.clock)
        relay.startService()
        link = RecordingLink("app")
        relay.tunnels.attach(link)
        return relay, link

    def connect(self, site):
        return caller(site)

    def end(self):
        for call in self.clock.getDelayedCalls():
            call.cancel()


class ResponseHeads(RelayCase, unittest.TestCase):
    """
    What the caller gets for a connector's RESPONSE_HEAD, and what the relay adds itself
    (RelayRequest.process: no Server or Date of its own on a proxied response).
    """

    def end(self):
        self.channel.connectionLost(Failure(ConnectionDone()))
        super().end()

    def answer(self, *heads: frames.ResponseHead) -> bytes:
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        stream = self.link.streams[1]
        for head in heads:
            stream.frame_received(head)
        return self.transport.value()

    def test_a_proxied_response_has_the_apps_headers_only(self):
        raw = self.answer(frames.ResponseHead(1, 200, b"OK", (
            (b"Content-Length", b"0"), (b"X-A", b"1"), (b"x-a", b"2"), (b"Connection", b"x-gone"),
            (b"X-Gone", b"3")), end=True))
        head = raw.split(b"\r\n\r\n")[0].lower()
        self.assertIn(b"\r\nx-a: 1\r\nx-a: 2", head)
        for absent in (b"\r\nserver:", b"\r\ndate:", b"x-gone", b"connection"):
            self.assertNotIn(absent, head)

    def test_no_content_type_is_added_to_an_answer_without_one(self):
        # twisted.web would add its default (text/html) to a body the app sent untyped.
        raw = self.answer(frames.ResponseHead(1, 200, b"OK", ((b"Content-Length", b"5"),)),
                          frames.Data(1, b"bytes"), frames.End(1))
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertEqual(body, b"bytes")
        self.assertNotIn(b"content-type", head.lower())

    def test_the_apps_content_type_passes(self):
        typed = self.answer(frames.ResponseHead(1, 200, b"OK", (
            (b"Content-Length", b"0"), (b"Content-Type", b"application/x-mine")), end=True))
        self.assertIn(b"\r\ncontent-type: application/x-mine", typed.lower())

    def test_the_apps_names_and_order_pass_unchanged(self):
        # (Not grouped by name nor re-spelt, as twisted.web's Headers would.)
        raw = self.answer(frames.ResponseHead(1, 200, b"OK", (
            (b"set-cookie", b"a=1"), (b"X-Mixed-CASE", b"v"), (b"Set-Cookie", b"b=2"),
            (b"content-length", b"0")), end=True))
        self.assertEqual(raw.split(b"\r\n\r\n")[0].split(b"\r\n"), [
            b"HTTP/1.1 200 OK", b"set-cookie: a=1", b"X-Mixed-CASE: v", b"Set-Cookie: b=2",
            b"content-length: 0"])

    def test_framing_is_the_relays(self):
        # Without Content-Length an HTTP/1.1 answer is chunked by the relay (the app's own
        # Transfer-Encoding is hop-by-hop); HEAD, 204 and 304 carry no body at all.
        raw = self.answer(frames.ResponseHead(1, 200, b"OK", ((b"Transfer-Encoding", b"chunked"),)),
                          frames.Data(1, b"abc"), frames.End(1))
        self.assertEqual(raw, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        for method, status in [(b"HEAD", 200), (b"GET", 304)]:
            stream = self.stream_for((), method)
            stream.frame_received(frames.ResponseHead(stream.stream_id, status, b"", ((b"ETag", b"e"),)))
            stream.frame_received(frames.Data(stream.stream_id, b"no"))
            stream.frame_received(frames.End(stream.stream_id))
            self.assertEqual(self.transport.value().split(b"\r\n\r\n")[-2:],
                             [b"HTTP/1.1 %d %s\r\nETag: e" % (status, b"OK" if status == 200 else b"Not Modified"), b""])

    def test_the_relays_connection_close_goes_with_the_apps_head(self):
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        self.link.streams[1].frame_received(frames.ResponseHead(1, 200, b"OK", (
            (b"Content-Length", b"0"), (b"Connection", b"keep-alive")), end=True))
        self.assertEqual(self.transport.value(), b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_the_relays_own_answers_have_server_and_date(self):
        self.channel.dataReceived(b"GET /nobody/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        answers = self.transport.value().lower().split(b"http/1.1 ")[1:]
        self.assertEqual([a[:3] for a in answers], [b"404", b"200"])
        for answer in answers:
            self.assertIn(b"\r\nserver: twistedweb/", answer)
            self.assertIn(b"\r\ndate: ", answer)

    def test_a_bad_name_or_value_anywhere_in_the_head_is_refused(self):
        good = ((b"X-A", b"1"), (b"X-B", b"2"))
        for bad in [((b"", b"1"),), good + ((b"", b"x"),), good + ((b"X C", b"x"),),
                    good + ((b"X-C", b"a\nb"),), good + ((b"X-C", b"\x00"),),
                    ((b"X-C\r\nSet-Cookie", b"1"),) + good]:
            self.assertRaises(frames.FrameError, self.stream_for(bad).frame_received,
                              frames.ResponseHead(self.number, 200, b"OK", bad))
        self.assertRaises(frames.FrameError, self.stream_for(good).frame_received,
                          frames.ResponseHead(self.number, 200, b"O\rK", good))
        self.stream_for(good).frame_received(frames.ResponseHead(self.number, 200, b"OK", good, end=True))
        self.assertIn(b"\r\nX-B: 2\r\n", self.transport.value())

    def stream_for(self, _headers, method=b"GET"):
        """A fresh request's stream (on a fresh connection); its number in C{self.number}."""
        self.channel, self.transport = caller(RelaySite(self.relay))
        self.addCleanup(self.channel.connectionLost, Failure(ConnectionDone()))
        self.channel.dataReceived(method + b" /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.number = max(self.link.streams)
        return self.link.streams[self.number]


class HeadDeadline(RelayCase, unittest.TestCase):
    """
    A request head must be complete within the idle timeout of its first byte, on every
    request of a keep-alive connection (the channel's one head timer, moved on per head).
    """

    config = {"idle_timeout": 10, "request_timeout": 0}

    def end(self):
        if self.transport.connected and not self.transport.disconnecting:
            self.channel.connectionLost(Failure(ConnectionDone()))
        super().end()

    def request(self, number: int) -> None:
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.link.streams[number].frame_received(frames.ResponseHead(number, 204, b"", (), end=True))

    def trickle(self, seconds: int) -> None:
        """One header byte a second: each resets the idle timer, never the head's."""
        for _ in range(seconds):
            self.channel.dataReceived(b"X")
            self.clock.advance(1)

    def test_a_later_heads_trickle_is_cut_from_its_own_first_byte(self):
        self.request(1)
        self.clock.advance(9)                       # idle between requests, under the timeout
        self.request(2)
        self.channel.dataReceived(b"GET /app/y HTTP/1.1\r\nX-Slow: ")
        self.trickle(9)
        self.assertFalse(self.transport.disconnecting)  # 9 s into this head
        self.trickle(2)
        self.assertTrue(self.transport.disconnecting)

    def test_a_slow_answer_is_not_cut_by_the_head_timer(self):
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.clock.advance(25)                      # the app takes its time (no request timeout)
        self.assertFalse(self.transport.disconnecting)
        self.link.streams[1].frame_received(frames.ResponseHead(1, 204, b"", (), end=True))
        self.request(2)
        self.assertIn(b"HTTP/1.1 204", self.transport.value().split(b"\r\n\r\n")[1])
        self.assertFalse(self.transport.disconnecting)

    def test_one_head_timer_per_connection(self):
        for number in range(1, 6):
            self.request(number)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)   # the idle timer and the head timer
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_head_timer_outlives_a_head_that_may_take_the_connection_over(self):
        # A login or an upgrade hands the transport to another protocol: this channel's
        # connectionLost would never cancel its head timer.
        self.channel.dataReceived(b"GET /app/ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\n\r\n")
        self.assertNotIn("_pg_head_late", repr(self.clock.getDelayedCalls()))
        self.assertTrue(self.link.streams)


class IdleTimeout(RelayCase, unittest.TestCase):
    """
    --idle-timeout on a keep-alive connection (RelayChannel.setTimeout, one IdleTimer per
    connection): counted from the last byte read or the last answer, never while a request
    is being answered, and gone with the connection.
    """

    config = {"idle_timeout": 10, "request_timeout": 0}

    def end(self):
        if self.transport.connected and not self.transport.disconnecting:
            self.channel.connectionLost(Failure(ConnectionDone()))
        super().end()

    def head(self) -> None:
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")

    def answer(self, number: int) -> None:
        self.link.streams[number].frame_received(frames.ResponseHead(number, 204, b"", (), end=True))

    def assert_closed_after_idle(self) -> None:
        """Open until the 10 s idle timeout from now, closed once it is over."""
        self.clock.advance(9.5)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_an_idle_connection_is_closed_the_timeout_after_its_last_answer(self):
        self.clock.advance(6)
        self.head()
        self.answer(1)
        self.assert_closed_after_idle()

    def test_a_connection_without_a_request_is_closed_after_the_timeout(self):
        self.assert_closed_after_idle()

    def test_a_request_being_answered_is_never_timed_out(self):
        for number in (1, 2):
            self.head()
            self.clock.advance(25)                  # the app takes its time
            self.assertFalse(self.transport.disconnecting)
            self.answer(number)
            self.clock.advance(9.5)
            self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_many_requests_keep_one_timer_that_goes_with_the_connection(self):
        for number in range(1, 30):
            self.head()
            self.answer(number)
            self.clock.advance(1)
        self.assertFalse(self.transport.disconnecting)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_idle_timer_outlives_a_head_that_may_take_the_connection_over(self):
        # (as the head timer: the channel never hears of the end of a connection taken over)
        self.channel.dataReceived(b"GET /app/ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\n\r\n")
        self.assertTrue(self.link.streams)
        self.assertNotIn("_IdleSchedule", repr(self.clock.getDelayedCalls()))

    def test_an_upgrade_refused_at_once_leaves_the_connection_timed_out(self):
        # A 404 at once for an upgrade to a tunnel nobody serves keeps the connection (keep-alive);
        # it must still be closed once idle, or a stranger holds relay connections for ever.
        self.channel.dataReceived(b"GET /nobody/ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\n\r\n")
        self.assertIn(b"HTTP/1.1 404", self.transport.value())
        self.assert_closed_after_idle()

    def test_a_request_pipelined_after_a_refused_upgrade_is_not_timed_out_while_answered(self):
        self.channel.dataReceived(b"GET /nobody/ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\n\r\nGET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.assertIn(b"HTTP/1.1 404", self.transport.value())
        self.assertTrue(self.link.streams)
        self.clock.advance(30)                 # the app takes its time: no idle timeout meanwhile
        self.assertFalse(self.transport.disconnecting)
        self.answer(max(self.link.streams))
        self.assert_closed_after_idle()

    def test_a_pipelined_pair_is_timed_out_after_its_second_answer(self):
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n"
                                  b"GET /app/y HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.answer(1)
        self.clock.advance(30)
        self.assertFalse(self.transport.disconnecting)
        self.answer(2)
        self.assert_closed_after_idle()


@implementer(IHalfCloseableDescriptor)
class HalfCloseableTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class OversizedLines(RelayCase, unittest.TestCase):
    """
    A request or header line over 16 KiB (twisted.web's MAX_LENGTH) gets 414 or 431, then a
    FIN; what the caller still sends is dropped, and does not keep the connection open past
    the idle timeout.
    """

    config = {"idle_timeout": 10}

    def connect(self, site):
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.2", 40000))
        transport = HalfCloseableTransport(peerAddress=IPv4Address("TCP", "127.0.0.2", 40000))
        channel.makeConnection(transport)
        return channel, transport

    def end(self):
        if not self.transport.disconnecting:
            self.channel.connectionLost(Failure(ConnectionDone()))
        super().end()

    def test_a_long_request_line_gets_414_and_a_fin(self):
        self.channel.dataReceived(b"GET /app/" + b"a" * 20_000)
        self.assertEqual(self.transport.value(),
                         b"HTTP/1.1 414 URI Too Long\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertTrue(self.transport.write_closed)
        self.assertFalse(self.link.streams)

    def test_a_long_header_line_gets_431(self):
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nCookie: " + b"c" * 20_000)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"))
        self.assertFalse(self.link.streams)

    def test_what_follows_is_dropped_and_the_idle_timeout_still_closes(self):
        self.channel.dataReceived(b"GET /app/" + b"a" * 20_000)
        answer = self.transport.value()
        for _ in range(40):                        # a caller that keeps sending, for 20 s
            self.clock.advance(0.5)
            self.channel.dataReceived(b"a" * 1000 + b"\r\nGET /app/x HTTP/1.1\r\n\r\n")
            if self.transport.disconnecting:
                break
        self.assertTrue(self.transport.disconnecting)
        self.assertLessEqual(self.clock.seconds(), 10.5)
        self.assertEqual(self.transport.value(), answer)   # one answer, nothing else
        self.assertFalse(self.link.streams)

    def test_without_half_close_the_connection_closes_after_the_answer(self):
        channel, transport = caller(RelaySite(self.relay))
        channel.dataReceived(b"GET /app/x HTTP/1.1\r\nX-Big: " + b"b" * 20_000)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(transport.disconnecting)


class StreamDeadline(RelayCase, unittest.TestCase):
    """
    --request-timeout on a stream (RelayStream._arm): 504 when the app has not answered in
    time, moved on by each sign of progress, and gone with the stream.
    """

    config = {"idle_timeout": 0, "request_timeout": 30}

    def head(self) -> RelayStream:
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        return self.link.streams[max(self.link.streams)]

    def answered(self) -> bytes:
        return self.transport.value()

    def test_no_answer_in_time_is_a_504_and_a_reset(self):
        stream = self.head()
        self.clock.advance(29.5)
        self.assertEqual(self.answered(), b"")
        self.clock.advance(1)
        self.assertIn(b"HTTP/1.1 504", self.answered())
        self.assertIn(b"did not answer in time", self.answered())
        reset = self.link.sent[-1]
        self.assertEqual((type(reset), reset.stream, reset.code), (frames.Reset, stream.stream_id, 504))

    def test_each_sign_of_progress_moves_it_on(self):
        stream = self.head()
        self.clock.advance(20)
        stream.frame_received(frames.ResponseHead(stream.stream_id, 200, b"OK", ()))
        self.clock.advance(29.5)                   # 49.5 s in: 29.5 s after the head
        self.assertEqual(self.answered(), b"")
        self.clock.advance(1)
        self.assertIn(b"HTTP/1.1 504", self.answered())   # (the app's head was held: nothing went out)
        self.assertIn(b"stalled", self.answered())

    def test_an_answered_stream_leaves_no_deadline(self):
        for _ in range(3):
            stream = self.head()
            stream.frame_received(frames.ResponseHead(stream.stream_id, 204, b"", (), end=True))
        self.clock.advance(60)
        self.assertEqual(self.answered().count(b"HTTP/1.1 204"), 3)
        self.assertNotIn(b"504", self.answered())
        self.assertNotIn(frames.Reset, [type(frame) for frame in self.link.sent])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SlowBodies(RelayCase, unittest.TestCase):
    """
    --min-body-rate and --body-grace (RelayStream, core/pace.py): a body that trickles in
    (a byte just inside each idle timeout, "slow POST") gets 408 once it falls behind the
    rate, instead of holding its slot for ever; time the relay does not read is not counted.
    """

    config = {"idle_timeout": 0, "request_timeout": 300, "min_body_rate": 500, "body_grace": 20}

    def post(self, length: int = 100_000) -> RelayStream:
        self.channel.dataReceived(b"POST /app/x HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\n\r\n" % length)
        return self.link.streams[max(self.link.streams)]

    def test_a_trickled_body_gets_408_and_a_reset(self):
        stream = self.post()
        for _ in range(4):                         # one byte every 5 s: progress, but too slow
            self.clock.advance(5)
            self.channel.dataReceived(b"x")
        self.clock.advance(0.005)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(0.01)                   # past 20 s of grace and 4 bytes' worth (0.008 s)
        self.assertIn(b"HTTP/1.1 408", self.transport.value())
        self.assertIn(b"request body too slow (under 500 bytes/s)", self.transport.value())
        reset = self.link.sent[-1]
        self.assertEqual((type(reset), reset.stream, reset.code), (frames.Reset, stream.stream_id, 408))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_body_at_the_rate_goes_through(self):
        self.post(length=30_000)
        for _ in range(50):                        # 600 bytes a second for 50 s
            self.clock.advance(1)
            self.channel.dataReceived(b"x" * 600)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(sum(len(f.data) for f in self.link.sent if type(f) is frames.Data), 30_000)
        self.assertIsInstance(self.link.sent[-1], frames.End)
        self.assertNotIn("_check_pace", repr(self.clock.getDelayedCalls()))

    def test_time_the_relay_does_not_read_is_not_counted(self):
        stream = self.post()
        self.clock.advance(10)
        stream._pause_upload()                     # (as the connector's window or a shaping hold does)
        self.clock.advance(100)
        self.assertEqual(self.transport.value(), b"")
        stream._resume_upload()                    # a new grace from here
        self.clock.advance(19.9)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(0.2)
        self.assertIn(b"HTTP/1.1 408", self.transport.value())

    def test_off_with_0(self):
        self.relay.config = attrs.evolve(self.relay.config, min_body_rate=0)
        self.post()
        self.clock.advance(200)
        self.assertEqual(self.transport.value(), b"")


class OfflineGrace(RelayCase, unittest.TestCase):
    """
    --offline-grace: a request for a tunnel with no connector waits, and gets 404 "tunnel
    offline" when the grace ends; one assigned to a connector in time is not failed by it,
    with --request-timeout 0 (no deadline of its own) as with one.
    """

    config = {"idle_timeout": 0, "offline_grace": 5, "request_timeout": 0}

    def relay_with(self, **config):
        relay = Relay(RelayConfig(jwt=auth.JWTSettings(secret="s" * 32), **config), self.clock)
        relay.startService()
        return relay, RecordingLink("app")   # (attached by the test, or never)

    def test_no_connector_in_time_is_a_404(self):
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.clock.advance(4.5)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertIn(b"HTTP/1.1 404", self.transport.value())
        self.assertIn(b"tunnel offline", self.transport.value())

    def test_a_request_assigned_in_time_outlives_the_grace(self):
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.clock.advance(2)
        self.relay.tunnels.attach(self.link)
        stream = self.link.streams[max(self.link.streams)]
        self.clock.advance(60)
        self.assertEqual(self.transport.value(), b"")
        self.assertNotIn(frames.Reset, [type(frame) for frame in self.link.sent])
        stream.frame_received(frames.ResponseHead(stream.stream_id, 204, b"", (), end=True))
        self.assertIn(b"HTTP/1.1 204", self.transport.value())


class CountingTransport(StringTransport):
    """A StringTransport that keeps each write (and writeSequence, marked) as one entry."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, seq):
        # Marked: a real TCP transport queues a writeSequence for the reactor's next turn.
        self.writes.append(b"SEQ:" + b"".join(seq))
        StringTransport.write(self, b"".join(seq))


class ResponseWrites(RelayCase, unittest.TestCase):
    """A response head goes out with the body's first chunk, or at the request's end."""

    def connect(self, site):
        peer = IPv4Address("TCP", "127.0.0.2", 40000)
        channel = site.buildProtocol(peer)
        transport = CountingTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 8000))
        channel.makeConnection(transport)
        return channel, transport

    def end(self):
        self.channel.connectionLost(Failure(ConnectionDone()))
        super().end()

    def stream(self, number: int, head: bytes = b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n"):
        if head:
            self.channel.dataReceived(head)
        return self.link.streams[number]

    def test_the_head_and_the_first_chunk_are_one_write(self):
        stream = self.stream(1)
        stream.frame_received(frames.ResponseHead(1, 200, b"OK", ((b"Content-Length", b"6"),)))
        stream.frame_received(frames.Data(1, b"abc"))
        stream.frame_received(frames.Data(1, b"def"))
        stream.frame_received(frames.End(1))
        self.assertEqual(len(self.transport.writes), 2)
        self.assertTrue(self.transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(self.transport.writes[0].endswith(b"\r\n\r\nabc"))
        self.assertEqual(self.transport.writes[1], b"def")

    def test_chunked_the_head_carries_the_first_chunk(self):
        stream = self.stream(1)
        stream.frame_received(frames.ResponseHead(1, 200, b"OK", ()))
        stream.frame_received(frames.Data(1, b"abc"))
        stream.frame_received(frames.End(1))
        first, last = self.transport.writes
        self.assertIn(b"\r\nTransfer-Encoding: chunked\r\n", first)
        self.assertTrue(first.endswith(b"\r\n\r\n3\r\nabc\r\n"))
        self.assertEqual(last, b"0\r\n\r\n")

    def test_heads_without_a_body_go_out_in_order_before_the_next_answer(self):
        # Pipelined: HEAD, then a 204, then a GET; each answer whole before the next.
        self.channel.dataReceived(b"HEAD /app/a HTTP/1.1\r\nHost: relay\r\n\r\n"
                                  b"GET /app/b HTTP/1.1\r\nHost: relay\r\n\r\n"
                                  b"GET /app/c HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.stream(1, b"").frame_received(frames.ResponseHead(1, 200, b"OK", ((b"Content-Length", b"9"),), end=True))
        self.stream(2, b"").frame_received(frames.ResponseHead(2, 204, b"No Content", (), end=True))
        third = self.stream(3, b"")
        third.frame_received(frames.ResponseHead(3, 200, b"OK", ((b"Content-Length", b"1"),)))
        third.frame_received(frames.Data(3, b"c"))
        third.frame_received(frames.End(3))
        codes = [w.split(b"\r\n")[0] for w in self.transport.writes]
        self.assertEqual(codes, [b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 200 OK"])
        self.assertTrue(self.transport.writes[0].endswith(b"\r\n\r\n"))   # no body for HEAD
        self.assertTrue(self.transport.writes[2].endswith(b"\r\n\r\nc"))

    def test_the_last_answer_of_a_closing_connection_is_written_before_the_close(self):
        stream = self.stream(1, b"GET /app/x HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        stream.frame_received(frames.ResponseHead(1, 200, b"OK", ((b"Content-Length", b"0"),), end=True))
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(len(self.transport.writes), 1)


    def test_each_chunk_of_a_chunked_body_is_one_write(self):
        stream = self.stream(1)
        stream.frame_received(frames.ResponseHead(1, 200, b"OK", ()))
        for part in (b"abc", b"defg"):
            stream.frame_received(frames.Data(1, part))
        stream.frame_received(frames.End(1))
        self.assertEqual(self.transport.writes[1:], [b"4\r\ndefg\r\n", b"0\r\n\r\n"])

class NoCycles(RelayCase, unittest.TestCase):
    """
    A request done with leaves nothing for the cycle collector: its stream and request are
    freed by reference counting once the link and the channel drop them (each request
    used to leave 25 objects in reference cycles).
    """

    def stream(self, number: int) -> RelayStream:
        stream = self.link.streams[number]
        if not any(ref() is stream for ref in self.refs):
            self.refs += [weakref.ref(stream), weakref.ref(stream.request)]
        return stream

    def alive(self) -> list[str]:
        return [type(ref()).__name__ for ref in self.refs if ref() is not None]

    def test_answered_requests(self):
        self.refs: list = []
        with collector_off():
            for number in (1, 2, 3):
                self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
                for frame in (frames.ResponseHead(number, 200, b"OK", ((b"Content-Length", b"2"),)),
                              frames.Data(number, b"ok"), frames.End(number)):
                    self.stream(number).frame_received(frame)
            self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 3)
            self.assertEqual(self.alive(), [])

    def test_a_request_whose_caller_left_and_one_that_failed(self):
        self.refs = []
        with collector_off():
            self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
            self.stream(1).frame_received(frames.ResponseHead(1, 200, b"OK", ()))
            self.transport.unregisterProducer()  # (as Twisted's TCP transport does when the connection goes)
            self.channel.connectionLost(Failure(ConnectionDone()))
            self.channel, self.transport = caller(RelaySite(self.relay))
            self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
            self.stream(2).frame_received(frames.Reset(2, 502, b"app down"))
            self.assertIn(b"HTTP/1.1 502", self.transport.value())
            self.assertEqual(self.alive(), [])


class CallerGone(RelayCase, unittest.TestCase):
    """A caller that leaves before its answer is finished: RESET 499 to the connector, slot freed."""

    def test_before_and_during_the_answer(self):
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([(type(f), f.code) for f in self.link.sent if isinstance(f, frames.Reset)],
                         [(frames.Reset, 499)])
        self.assertEqual((self.link.streams, self.relay.tunnels["app"].in_flight), ({}, 0))

        self.link.sent.clear()
        self.channel, self.transport = caller(RelaySite(self.relay))
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        (number,) = self.link.streams
        self.link.streams[number].frame_received(frames.ResponseHead(number, 200, b"OK", ()))
        self.link.streams[number].frame_received(frames.Data(number, b"part"))
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([f.code for f in self.link.sent if isinstance(f, frames.Reset)], [499])
        self.assertEqual(self.relay.tunnels["app"].in_flight, 0)

    def test_no_reset_after_a_finished_answer(self):
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.link.streams[1].frame_received(frames.ResponseHead(1, 204, b"", (), end=True))
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertFalse([f for f in self.link.sent if isinstance(f, frames.Reset)])

    def test_a_request_its_caller_left_is_logged_and_counted(self):
        # Logged as it ends (Twisted logs only finished requests): 499 before the head, the
        # status sent after it; counted in the requests metric as 499 and "aborted".
        relay, link = self.relay_with(access_log=True)
        site = RelaySite(relay)
        site.logFile = lines = io.StringIO()

        def request(path: bytes, *, body_begun: bool):
            # A caller's GET, and (body_begun) the app's head and a first piece of body.
            channel, transport = caller(site)
            channel.dataReceived(b"GET /app/" + path + b" HTTP/1.1\r\nHost: relay\r\n\r\n")
            (number,) = link.streams
            if body_begun:
                link.streams[number].frame_received(frames.ResponseHead(number, 200, b"OK", ()))
                link.streams[number].frame_received(frames.Data(number, b"part"))
            return channel, transport, number

        channel, _, _ = request(b"left-early", body_begun=False)
        channel.connectionLost(Failure(ConnectionDone()))
        channel, _, _ = request(b"left-later", body_begun=True)
        channel.connectionLost(Failure(ConnectionDone()))
        # The connector gives up in the middle of the body: the relay cuts the caller's connection.
        channel, transport, number = request(b"cut", body_begun=True)
        link.streams[number].frame_received(frames.Reset(number, 502, b"app went away"))
        self.assertTrue(transport.disconnected)
        channel.connectionLost(Failure(ConnectionDone()))   # (a StringTransport does not say so)
        logged = lines.getvalue().splitlines()
        self.assertEqual([(line.split('"')[3].split()[1], line.split('"')[4].split()[0]) for line in logged],
                         [("/app/left-early", "499"), ("/app/left-later", "200"), ("/app/cut", "200")])
        self.assertEqual([relay.stats.get("requests", code) for code in ("499", "aborted", "200")], [1, 2, 0])

    def test_a_failure_after_the_head_but_before_the_body_is_still_answered(self):
        # The app's head waits for its first body byte, so nothing went out: the caller gets
        # the relay's 502 (or 504), not a bare close, and may send its next request.
        self.channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.link.streams[1].frame_received(frames.ResponseHead(1, 200, b"OK", ((b"X-App", b"1"),)))
        self.link.streams[1].frame_received(frames.Reset(1, 502, b"app went away"))
        answer = self.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 502 "), answer)
        self.assertNotIn(b"x-app", answer.lower())
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.relay.stats.get("requests", "502"), 1)



class CorrelationIds(unittest.TestCase):
    def test_random_hex_ids_none_repeated_across_refills_of_the_pool(self):
        # 600 ids: more than two reads of the 4 KiB pool (256 ids each).
        ids = [next_correlation_id() for _ in range(600)]
        self.assertTrue(all(re.fullmatch(rb"[0-9a-f]{32}", i) for i in ids))
        self.assertEqual(len(set(ids)), 600)
