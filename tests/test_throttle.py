"""
Tests for L{pipegate.throttle}: the token bucket and its pool (pure), datagram policing,
and the L{Shaper} transport wrapper on L{StringTransport} with a L{Clock}: no sockets,
no real time.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer, IHalfCloseableProtocol, IHandshakeListener, IPushProducer, ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from pipegate.core.bucket import BucketPool, TokenBucket, datagram_allowed
from pipegate.throttle import Shaper

MB = 1_000_000


class TokenBucketTests(unittest.TestCase):

    def test_starts_full(self):
        self.assertEqual(TokenBucket(1000, 1500).level(0), 1500.0)
        self.assertEqual(TokenBucket(1000, 1500).debt(0), 0.0)

    def test_take_sequence(self):
        b = TokenBucket(1000, 1500)
        self.assertEqual(b.take(1500, 0), 0.0)
        self.assertEqual(b.level(0), 0.0)
        self.assertEqual(b.take(1000, 0), 1.0)
        self.assertEqual(b.level(0), -1000.0)
        self.assertEqual(b.debt(0), 1000.0)
        # one second refills 1000: back to 0, then 500 more of debt
        self.assertEqual(b.take(500, 1), 0.5)
        self.assertEqual(b.level(1), -500.0)
        self.assertEqual(b.debt(1), 500.0)
        self.assertEqual(b.take(0, 1.25), 0.25)
        self.assertEqual(b.take(0, 1.5), 0.0)
        self.assertEqual(b.level(1.5), 0.0)

    def test_style_guide_record(self):
        """The sequence recorded in STYLE.md section 4 (rate 1000, burst 2000)."""
        b = TokenBucket(1000, 2000)
        self.assertEqual([b.take(1500, 0), b.take(1000, 0), b.take(500, 1), b.take(3000, 1)],
                         [0.0, 0.5, 0.0, 3.0])

    def test_refill_capped_at_burst(self):
        b = TokenBucket(1000, 1500)
        b.take(1500, 0)
        self.assertEqual(b.level(0.5), 500.0)
        self.assertEqual(b.level(100), 1500.0)
        self.assertEqual(b.take(1500, 100), 0.0)
        self.assertEqual(b.take(1, 100), 0.001)

    def test_level_is_path_independent(self):
        a, b = TokenBucket(1000, 1500), TokenBucket(1000, 1500)
        a.take(1500, 0)
        b.take(1500, 0)
        for t in (0.1, 0.2, 0.7, 1.0):
            a.level(t)
        self.assertEqual(a.level(3), b.level(3))

    def test_big_chunk_passes_with_debt(self):
        b = TokenBucket(1000, 1500)
        self.assertEqual(b.take(10_000, 0), 8.5)
        self.assertEqual(b.debt(0), 8500.0)
        self.assertEqual(b.debt(8.5), 0.0)
        self.assertEqual(b.take(10_000, 8.5), 10.0)  # never refused, only slowed

    def test_now_at_construction(self):
        b = TokenBucket(1000, 1500, now=100.0)
        self.assertEqual(b.take(1500, 100), 0.0)
        self.assertEqual(b.level(101), 1000.0)

    def test_time_going_backwards_refills_nothing(self):
        b = TokenBucket(1000, 1500)
        b.take(1500, 10)
        self.assertEqual(b.level(5), 0.0)
        self.assertEqual(b.take(500, 5), 0.5)
        self.assertEqual(b.level(11), 500.0)  # refill counts from 10, not 5

    def test_lowered_burst_caps_level(self):
        b = TokenBucket(1000, 1500)
        b.burst = 500
        self.assertEqual(b.level(0), 500.0)

    def test_validation(self):
        for rate in (0, -1, float("inf"), float("nan")):
            self.assertRaises(ValueError, TokenBucket, rate, 1500)
        for burst in (-1, float("inf"), float("nan")):
            self.assertRaises(ValueError, TokenBucket, 1000, burst)
        self.assertEqual(TokenBucket(1000, 0).take(1, 0), 0.001)
        self.assertRaises(ValueError, TokenBucket(1000, 1500).take, -1, 0)
        b = TokenBucket(1000, 1500)
        with self.assertRaises(ValueError):
            b.rate = 0


class BucketPoolTests(unittest.TestCase):

    def test_same_key_shares_bucket(self):
        pool = BucketPool()
        a = pool.acquire(("10.0.0.1", "up"), 1000, 1500, 0)
        b = pool.acquire(("10.0.0.1", "up"), 9999, 9999, 5)
        self.assertIs(a, b)
        self.assertEqual((b.rate, b.burst), (1000.0, 1500.0))  # the first acquire wins
        self.assertEqual(pool.users(("10.0.0.1", "up")), 2)
        a.take(1500, 0)
        self.assertEqual(b.take(1000, 0), 1.0)

    def test_different_keys_separate(self):
        pool = BucketPool()
        up = pool.acquire(("10.0.0.1", "up"), 1000, 1500, 0)
        down = pool.acquire(("10.0.0.1", "down"), 1000, 1500, 0)
        other = pool.acquire(("10.0.0.2", "up"), 1000, 1500, 0)
        self.assertEqual(len({id(up), id(down), id(other)}), 3)
        self.assertEqual(len(pool), 3)

    def test_release_drops_after_last_user(self):
        pool = BucketPool()
        key = ("10.0.0.1", "up")
        first = pool.acquire(key, 1000, 1500, 0)
        pool.acquire(key, 1000, 1500, 0)
        first.take(1500, 0)
        pool.release(key)
        self.assertIn(key, pool)
        self.assertIs(pool.get(key), first)
        pool.release(key)
        self.assertNotIn(key, pool)
        self.assertIsNone(pool.get(key))
        self.assertEqual((len(pool), pool.users(key)), (0, 0))
        fresh = pool.acquire(key, 1000, 1500, 0)
        self.assertIsNot(fresh, first)
        self.assertEqual(fresh.level(0), 1500.0)

    def test_release_unknown_key(self):
        pool = BucketPool()
        self.assertRaises(KeyError, pool.release, "nope")
        pool.acquire("k", 1, 1, 0)
        pool.release("k")
        self.assertRaises(KeyError, pool.release, "k")


class DatagramTests(unittest.TestCase):

    def test_no_bucket(self):
        self.assertTrue(datagram_allowed(None, 65_000, 0, 0))

    def test_drop_beyond_max_debt(self):
        b = TokenBucket(1000, 1500)
        self.assertTrue(datagram_allowed(b, 1500, 0, 1000))
        self.assertTrue(datagram_allowed(b, 500, 0, 1000))
        self.assertEqual(b.level(0), -500.0)
        self.assertFalse(datagram_allowed(b, 600, 0, 1000))
        self.assertEqual(b.level(0), -500.0)  # a drop costs nothing
        self.assertTrue(datagram_allowed(b, 500, 0, 1000))  # debt exactly max_debt
        self.assertFalse(datagram_allowed(b, 1, 0, 1000))
        self.assertTrue(datagram_allowed(b, 1, 0.001, 1000))

    def test_zero_max_debt_is_plain_policing(self):
        b = TokenBucket(1000, 1500)
        self.assertTrue(datagram_allowed(b, 1000, 0, 0))
        self.assertFalse(datagram_allowed(b, 501, 0, 0))
        self.assertTrue(datagram_allowed(b, 500, 0, 0))
        self.assertFalse(datagram_allowed(b, 1, 0, 0))
        self.assertTrue(datagram_allowed(b, 100, 0.1, 0))

    def test_too_big_never_passes(self):
        b = TokenBucket(1000, 1500)
        self.assertFalse(datagram_allowed(b, 2600, 1000, 1000))
        self.assertEqual(b.level(1000), 1500.0)


# -- Shaper helpers
@implementer(IPushProducer)
class Producer:
    def __init__(self):
        self.calls = []
        self.paused = False

    def pauseProducing(self):
        self.calls.append("pause")
        self.paused = True

    def resumeProducing(self):
        self.calls.append("resume")
        self.paused = False

    def stopProducing(self):
        self.calls.append("stop")


class Inner(Protocol):
    """Records what it receives; registers a producer for its writes if told to."""

    def __init__(self, streaming: bool | None = True):
        self.streaming = streaming
        self.producer = Producer()
        self.received = []
        self.lost = None

    def connectionMade(self):
        if self.streaming is not None:
            self.transport.registerProducer(self.producer, self.streaming)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost = reason


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class HalfCloseInner(Inner):
    def __init__(self):
        super().__init__()
        self.events = []

    def readConnectionLost(self):
        self.events.append("read lost")

    def writeConnectionLost(self):
        self.events.append("write lost")

    def handshakeCompleted(self):
        self.events.append("handshake")


class HalfCloseTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class Recorder:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


def advance_to_next_call(clock: Clock) -> None:
    calls = clock.getDelayedCalls()
    assert calls, "nothing scheduled"
    clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))


class ShaperTestCase(unittest.TestCase):

    def shaper(self, read=None, write=None, inner=None, transport=None, factory=None, **kw):
        self.clock = Clock()
        self.transport = StringTransport() if transport is None else transport
        self.inner = Inner() if inner is None else inner
        shaper = Shaper(factory, self.inner, self.clock, read, write, **kw)
        shaper.makeConnection(self.transport)
        return shaper


class ShaperReadTests(ShaperTestCase):

    def test_within_burst_no_pause(self):
        s = self.shaper(read=TokenBucket(1000, 1500))
        s.dataReceived(b"x" * 1500)
        self.assertEqual(self.inner.received, [b"x" * 1500])
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(s.throttled_seconds, 0.0)

    def test_pause_after_burst_resume_after_delay(self):
        s = self.shaper(read=TokenBucket(1000, 1500))
        s.dataReceived(b"x" * 1500)
        s.dataReceived(b"y" * 1000)
        self.assertEqual(self.inner.received, [b"x" * 1500, b"y" * 1000])  # delivered at once
        self.assertEqual(self.transport.producerState, "paused")
        self.assertTrue(s.read_throttled)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [1.0])
        self.clock.advance(0.999)
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(0.001)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertFalse(s.read_throttled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((s.throttled_seconds, s.read_throttled_seconds), (1.0, 1.0))

    def test_data_while_paused_extends_pause(self):
        s = self.shaper(read=TokenBucket(1000, 1500))
        s.dataReceived(b"x" * 2500)
        self.clock.advance(0.5)
        s.dataReceived(b"y" * 500)  # level -1000 + 500 - 500 = -1000: pause until 1.5
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [1.5])
        self.assertEqual(s.throttled_seconds, 1.5)
        self.clock.advance(0.5)
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(0.5)
        self.assertEqual(self.transport.producerState, "producing")

    def test_inner_pause_outlasts_throttle(self):
        s = self.shaper(read=TokenBucket(1000, 1500))
        self.inner.transport.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        s.dataReceived(b"x" * 2500)
        self.clock.advance(1.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.transport.producerState, "paused")  # the inner still holds it
        self.inner.transport.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_throttle_outlasts_inner_pause(self):
        s = self.shaper(read=TokenBucket(1000, 1500))
        s.dataReceived(b"x" * 2500)
        self.inner.transport.pauseProducing()
        self.inner.transport.pauseProducing()
        self.inner.transport.resumeProducing()
        self.assertEqual(self.transport.producerState, "paused")  # the throttle still holds it
        self.clock.advance(1.0)
        self.assertEqual(self.transport.producerState, "producing")

    def test_pause_without_buckets_is_forwarded(self):
        self.shaper()
        self.inner.transport.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.inner.transport.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.inner.transport.stopProducing()
        self.assertEqual(self.transport.producerState, "stopped")

    def test_no_buckets_pass_through(self):
        s = self.shaper()
        s.dataReceived(b"x" * MB)
        s.write(b"y" * MB)
        self.assertEqual(self.inner.received, [b"x" * MB])
        self.assertEqual(len(self.transport.value()), MB)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.transport.producerState, self.inner.producer.calls), ("producing", []))

    def test_shared_bucket_throttles_both_connections(self):
        bucket = TokenBucket(1000, 1500)
        a = self.shaper(read=bucket)
        transport_a = self.transport
        a.dataReceived(b"x" * 1500)
        b = Shaper(None, Inner(), self.clock, bucket, None)
        transport_b = StringTransport()
        b.makeConnection(transport_b)
        b.dataReceived(b"y" * 100)
        self.assertEqual((transport_a.producerState, transport_b.producerState), ("producing", "paused"))
        self.clock.advance(0.1)
        self.assertEqual(transport_b.producerState, "producing")

    def test_inner_closing_during_delivery_schedules_nothing(self):
        transport = StringTransportWithDisconnection()

        class Closer(Inner):
            def dataReceived(self, data):
                self.transport.loseConnection()

        inner = Closer(streaming=None)
        s = self.shaper(read=TokenBucket(1000, 1500), inner=inner, transport=transport)
        transport.protocol = s
        s.dataReceived(b"x" * 5000)
        self.assertIsInstance(inner.lost.value, ConnectionDone)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_measured_read_rate(self):
        """10 MB through a 1 MB/s bucket with a 1 MB burst takes at least 9 s of clock time."""
        s = self.shaper(read=TokenBucket(MB, MB))
        chunk = b"z" * 65536
        fed = 0
        while fed < 10 * MB:
            if self.transport.producerState == "paused":
                advance_to_next_call(self.clock)
            else:
                s.dataReceived(chunk)
                fed += len(chunk)
        elapsed = self.clock.seconds()
        self.assertGreaterEqual(elapsed, 8.5)
        self.assertGreaterEqual(elapsed, (fed - MB - len(chunk)) / MB)
        self.assertLessEqual(elapsed, (fed - MB) / MB)
        self.assertAlmostEqual(s.throttled_seconds, (fed - MB) / MB)


class ShaperWriteTests(ShaperTestCase):

    def test_writes_pass_and_pause_producer(self):
        s = self.shaper(write=TokenBucket(1000, 1500))
        self.assertIs(s.producer, self.inner.producer)
        self.inner.transport.write(b"x" * 1500)
        self.assertEqual(self.inner.producer.calls, [])
        self.inner.transport.write(b"y" * 1000)
        self.assertEqual(self.transport.value(), b"x" * 1500 + b"y" * 1000)  # nothing held back
        self.assertEqual(self.inner.producer.calls, ["pause"])
        self.assertTrue(s.write_throttled)
        self.clock.advance(0.5)
        self.assertTrue(self.inner.producer.paused)
        self.clock.advance(0.5)
        self.assertEqual(self.inner.producer.calls, ["pause", "resume"])
        self.assertEqual((s.throttled_seconds, s.write_throttled_seconds), (1.0, 1.0))
        self.assertEqual(self.transport.producerState, "producing")  # reading untouched

    def test_write_sequence_charged(self):
        bucket = TokenBucket(1000, 1500)
        self.shaper(write=bucket)
        self.inner.transport.writeSequence(iter([b"a" * 1000, b"b" * 1000]))
        self.assertEqual(self.transport.value(), b"a" * 1000 + b"b" * 1000)
        self.assertEqual(bucket.level(0), -500.0)
        self.assertTrue(self.inner.producer.paused)
        self.clock.advance(0.5)
        self.assertFalse(self.inner.producer.paused)

    def test_transport_backpressure_reaches_inner_producer(self):
        s = self.shaper(write=TokenBucket(1000, 1500))
        relay = self.transport.producer
        self.assertIsNot(relay, None)
        self.assertIsNot(relay, self.inner.producer)  # s.pauseProducing means "stop reading"
        self.assertTrue(self.transport.streaming)
        relay.pauseProducing()
        self.assertEqual(self.inner.producer.calls, ["pause"])
        relay.resumeProducing()
        self.assertEqual(self.inner.producer.calls, ["pause", "resume"])
        self.assertEqual(self.transport.producerState, "producing")
        s.write(b"x")
        self.assertEqual(self.inner.producer.calls, ["pause", "resume"])

    def test_transport_pause_outlasts_throttle(self):
        self.shaper(write=TokenBucket(1000, 1500))
        self.inner.transport.write(b"x" * 2500)
        self.transport.producer.pauseProducing()
        self.clock.advance(1.0)
        self.assertTrue(self.inner.producer.paused)
        self.transport.producer.resumeProducing()
        self.assertEqual(self.inner.producer.calls, ["pause", "resume"])

    def test_throttle_outlasts_transport_pause(self):
        self.shaper(write=TokenBucket(1000, 1500))
        self.transport.producer.pauseProducing()
        self.inner.transport.write(b"x" * 2500)
        self.transport.producer.resumeProducing()
        self.assertTrue(self.inner.producer.paused)
        self.clock.advance(1.0)
        self.assertEqual(self.inner.producer.calls, ["pause", "resume"])

    def test_producer_registered_while_throttled_starts_paused(self):
        s = self.shaper(write=TokenBucket(1000, 1500), inner=Inner(streaming=None))
        s.write(b"x" * 2500)
        producer = Producer()
        s.registerProducer(producer, True)
        self.assertEqual(producer.calls, ["pause"])
        self.clock.advance(1.0)
        self.assertEqual(producer.calls, ["pause", "resume"])

    def test_pull_producer_demand_held_by_throttle(self):
        self.shaper(write=TokenBucket(1000, 1500), inner=Inner(streaming=False))
        relay = self.transport.producer
        self.assertFalse(self.transport.streaming)
        relay.resumeProducing()  # the real transport asks for data
        self.assertEqual(self.inner.producer.calls, ["resume"])
        self.inner.transport.write(b"x" * 2500)
        relay.resumeProducing()
        self.assertEqual(self.inner.producer.calls, ["resume"])  # held back
        self.clock.advance(1.0)
        self.assertEqual(self.inner.producer.calls, ["resume", "resume"])

    def test_unregister_then_lose_connection(self):
        s = self.shaper(write=TokenBucket(1000, 1500))
        self.inner.transport.unregisterProducer()
        self.assertIsNone(self.transport.producer)
        self.assertIsNone(s.producer)
        self.inner.transport.unregisterProducer()  # a second unregister is harmless
        self.inner.transport.loseConnection()
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(s.disconnecting)
        producer = Producer()
        s.registerProducer(producer, True)  # a new producer can register after unregistering
        self.assertIsNot(self.transport.producer, None)
        self.assertRaises(RuntimeError, s.registerProducer, Producer(), True)

    def test_stop_from_transport_reaches_producer(self):
        s = self.shaper(write=TokenBucket(1000, 1500))
        self.transport.producer.stopProducing()
        self.assertEqual(self.inner.producer.calls, ["stop"])
        s.unregisterProducer()  # the transport already dropped it: not forwarded
        self.assertIsNotNone(self.transport.producer)

    def test_measured_write_rate(self):
        """A producer writing 10 MB through a 1 MB/s, 1 MB burst bucket needs >= 9 s."""
        s = self.shaper(write=TokenBucket(MB, MB))
        chunk = b"w" * 65536
        sent = 0
        while sent < 10 * MB:
            if self.inner.producer.paused:
                advance_to_next_call(self.clock)
            else:
                s.write(chunk)
                sent += len(chunk)
        self.assertEqual(len(self.transport.value()), sent)
        elapsed = self.clock.seconds()
        self.assertGreaterEqual(elapsed, 8.5)
        self.assertGreaterEqual(elapsed, (sent - MB - len(chunk)) / MB)
        self.assertLessEqual(elapsed, (sent - MB) / MB)


class ShaperLifecycleTests(ShaperTestCase):

    def test_connection_lost_cancels_pending_calls(self):
        factory = WrappingFactory(Factory())
        s = self.shaper(read=TokenBucket(1000, 1500), write=TokenBucket(1000, 1500), factory=factory)
        self.assertIn(s, factory.protocols)
        s.dataReceived(b"x" * 3000)
        s.write(b"y" * 5000)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.assertEqual(s.throttled_seconds, 1.5 + 3.5)
        s.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsInstance(self.inner.lost.value, ConnectionDone)
        self.assertNotIn(s, factory.protocols)
        self.assertIsNone(s.wrappedProtocol)
        s.write(b"late")  # ignored by the throttle after the connection is gone
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_without_factory(self):
        s = self.shaper(read=TokenBucket(1000, 1500))
        s.dataReceived(b"x" * 3000)
        s.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNotNone(self.inner.lost)

    def test_overflow_calls_handler_once(self):
        overflow = Recorder()
        s = self.shaper(read=TokenBucket(1000, 1500), max_debt=1000, on_overflow=overflow)
        s.dataReceived(b"x" * 2500)  # debt 1000: not above
        self.assertEqual(overflow.count, 0)
        s.dataReceived(b"x")  # a peer that ignores the pause
        self.assertEqual(overflow.count, 1)
        self.assertTrue(s.overflowed)
        self.assertFalse(self.transport.disconnecting)
        s.dataReceived(b"x" * 1000)
        self.assertEqual(overflow.count, 1)
        self.assertEqual(len(b"".join(self.inner.received)), 3501)  # everything was delivered

    def test_read_overflow_aborts_by_default(self):
        s = self.shaper(read=TokenBucket(1000, 1500), max_debt=1000)
        s.dataReceived(b"x" * 2501)
        self.assertTrue(self.transport.disconnected)  # StringTransport's "aborted"
        self.assertTrue(s.disconnecting)
        s.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_write_overflow_aborts_by_default(self):
        s = self.shaper(write=TokenBucket(1000, 1500), max_debt=4000)
        for _ in range(5):  # an inner protocol that ignores pauseProducing
            self.inner.transport.write(b"x" * 1000)
        self.inner.transport.write(b"x" * 500)  # debt 4000: not above
        self.assertFalse(self.transport.disconnected)
        self.inner.transport.write(b"x")
        self.assertTrue(self.transport.disconnected)
        s.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_max_debt_validation(self):
        self.assertRaises(ValueError, Shaper, None, Inner(), Clock(), None, None, -1)
        self.assertRaises(ValueError, Shaper, None, Inner(), Clock(), None, None, float("nan"))

    def test_half_close_forwarded(self):
        inner = HalfCloseInner()
        transport = HalfCloseTransport()
        s = self.shaper(inner=inner, transport=transport)
        self.assertTrue(IHalfCloseableProtocol.providedBy(s))
        self.assertTrue(IHandshakeListener.providedBy(s))
        s.readConnectionLost()
        s.writeConnectionLost()
        s.handshakeCompleted()
        self.assertEqual(inner.events, ["read lost", "write lost", "handshake"])
        inner.transport.loseWriteConnection()
        self.assertTrue(transport.write_closed)

    def test_not_half_closeable_when_inner_is_not(self):
        s = self.shaper()
        self.assertFalse(IHalfCloseableProtocol.providedBy(s))
        self.assertFalse(IHandshakeListener.providedBy(s))

    def test_transport_side_forwarded(self):
        s = self.shaper()
        for iface in (ITransport, IConsumer, IPushProducer):
            self.assertTrue(iface.providedBy(s), iface)
        self.assertIs(self.inner.transport, s)
        self.assertEqual(s.getPeer(), self.transport.getPeer())
        self.assertEqual(s.getHost(), self.transport.getHost())
        self.inner.transport.abortConnection()
        self.assertTrue(self.transport.disconnected)
