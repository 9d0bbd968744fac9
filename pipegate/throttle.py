"""
Bandwidth shaping: the transport wrapper that applies a token bucket
(L{pipegate.core.bucket.TokenBucket}).

L{Shaper} is a L{ProtocolWrapper} between a real transport and an inner protocol.  It
never buffers: bytes pass through immediately, and the bucket's pause becomes
backpressure (rule 9).  Reading is throttled by pausing the real transport; writing by
pausing the inner protocol's registered producer.  Pauses are scheduled on an injected
clock and cancelled in C{connectionLost}.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import (
    IDelayedCall, IHalfCloseableProtocol, IHandshakeListener, IProtocol, IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import alsoProvides, directlyProvides, implementer, providedBy

from pipegate.core.bucket import TokenBucket


class _Hold:
    """One direction's timed pause: a single pending call on the clock, extended as needed."""

    def __init__(self, clock: IReactorTime, on_release: Callable[[], None]) -> None:
        self._clock = clock
        self._on_release = on_release
        self._call: IDelayedCall | None = None
        self._until = 0.0

    @property
    def active(self) -> bool:
        return self._call is not None

    def extend(self, delay: float) -> float:
        """Hold until at least C{delay} seconds from now; return the seconds added."""
        now = self._clock.seconds()
        until = now + delay
        if self._call is None:
            added = delay
        elif until <= self._until:
            return 0.0
        else:
            added = until - self._until
            self._call.cancel()
        self._until = until
        self._call = self._clock.callLater(delay, self._release)
        return added

    def cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def _release(self) -> None:
        self._call = None
        self._on_release()


@implementer(IPushProducer)
class _WriteRelay:
    """
    What the Shaper registers with the real transport in place of the inner producer:
    the real transport's pause/resume/stop for writing arrive here.  (The Shaper's own
    C{pauseProducing} is the inner protocol's view of its transport: pause reading.)
    """

    def __init__(self, shaper: Shaper) -> None:
        self._shaper = shaper

    def pauseProducing(self) -> None:
        self._shaper._transport_write_pause(True)

    def resumeProducing(self) -> None:
        self._shaper._transport_write_pause(False)

    def stopProducing(self) -> None:
        self._shaper._transport_write_stop()


class Shaper(ProtocolWrapper):
    """
    Token-bucket shaping between a real transport and C{wrappedProtocol}.

    Reading: data goes to the inner protocol at once and is charged to C{read_bucket};
    a pause stops the real transport's reading until the clock says so.  The inner
    protocol (or anyone using this as a producer) may pause reading too; reading resumes
    only when neither holds it.

    Writing: data goes to the real transport at once and is charged to C{write_bucket};
    a pause pauses the inner protocol's registered producer.  The Shaper registers a
    relay with the real transport, so the inner producer is paused while the real
    transport's buffer is full or the throttle holds it, and resumed when neither does.
    Writes without a registered producer are charged but cannot be slowed.

    Overflow: when C{max_debt} is set and a bucket's debt exceeds it after a charge (the
    chunk has already passed), C{on_overflow()} is called, or by default the connection
    is aborted.  This happens at most once per Shaper.

    C{factory} may be C{None}; otherwise it gets C{registerProtocol(self)} and
    C{unregisterProtocol(self)} (e.g. to release pooled buckets).

    @ivar throttled_seconds: total pause time scheduled, both directions (overlapping
        extensions of one direction's pause count once).
    @ivar read_throttled_seconds: the reading share of it.
    @ivar write_throttled_seconds: the writing share of it.
    """

    log = Logger()

    def __init__(self, factory, wrappedProtocol: IProtocol, clock: IReactorTime,
                 read_bucket: TokenBucket | None, write_bucket: TokenBucket | None,
                 max_debt: float | None = None,
                 on_overflow: Callable[[], None] | None = None) -> None:
        if max_debt is not None and not max_debt >= 0:
            raise ValueError(f"max_debt must be >= 0 or None, not {max_debt!r}")
        ProtocolWrapper.__init__(self, factory, wrappedProtocol)
        self.clock = clock
        self.read_bucket = read_bucket
        self.write_bucket = write_bucket
        self.max_debt = max_debt
        self.on_overflow = on_overflow
        self.throttled_seconds = 0.0
        self.read_throttled_seconds = 0.0
        self.write_throttled_seconds = 0.0
        self.overflowed = False
        self._lost = False
        # reading
        self._read_hold = _Hold(clock, self._update_reading)
        self._read_paused_by_user = False
        self._reading_paused = False  # what we told the real transport
        # writing
        self._write_hold = _Hold(clock, self._update_producer)
        self._relay = _WriteRelay(self)
        self._relay_registered = False
        self._inner_producer = None
        self._inner_streaming = True
        self._transport_full = False  # the real transport paused the relay
        self._producer_paused = False  # what we told the inner producer
        self._pull_wanted = False  # a pull request held back by the throttle

    # -- connection
    def makeConnection(self, transport) -> None:
        directlyProvides(self, providedBy(transport))
        for iface in (IHalfCloseableProtocol, IHandshakeListener):
            if iface.providedBy(self.wrappedProtocol):
                alsoProvides(self, iface)
        Protocol.makeConnection(self, transport)
        if self.factory is not None:
            self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)

    def connectionLost(self, reason) -> None:
        self._lost = True
        self._read_hold.cancel()
        self._write_hold.cancel()
        if self.factory is not None:
            self.factory.unregisterProtocol(self)
        try:
            self.wrappedProtocol.connectionLost(reason)
        finally:
            self.wrappedProtocol = None
            self._inner_producer = None

    def readConnectionLost(self) -> None:
        self.wrappedProtocol.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.wrappedProtocol.writeConnectionLost()

    def handshakeCompleted(self) -> None:
        self.wrappedProtocol.handshakeCompleted()

    def loseWriteConnection(self) -> None:
        self.transport.loseWriteConnection()

    def abortConnection(self) -> None:
        self.disconnecting = 1
        self.transport.abortConnection()

    def _closing(self) -> bool:
        return bool(self._lost or self.disconnecting
                    or getattr(self.transport, "disconnecting", False)
                    or getattr(self.transport, "disconnected", False))

    # -- reading: real transport -> inner protocol
    def dataReceived(self, data: bytes) -> None:
        self.wrappedProtocol.dataReceived(data)
        if self.read_bucket is not None and data:
            delay = self._charge(self.read_bucket, len(data), "read")
            if delay > 0 and not self._closing():
                added = self._read_hold.extend(delay)
                self.read_throttled_seconds += added
                self.throttled_seconds += added
                self._update_reading()

    def pauseProducing(self) -> None:
        """The inner protocol (or a consumer we produce for) asks to stop reading."""
        self._read_paused_by_user = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._read_paused_by_user = False
        self._update_reading()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def _update_reading(self) -> None:
        if self._lost or self._closing():
            return
        want = self._read_paused_by_user or self._read_hold.active
        if want and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif not want and self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    @property
    def read_throttled(self) -> bool:
        """The throttle is holding reading paused."""
        return self._read_hold.active

    # -- writing: inner protocol -> real transport
    def write(self, data: bytes) -> None:
        self.transport.write(data)
        self._charge_write(len(data))

    def writeSequence(self, data) -> None:
        data = list(data)
        self.transport.writeSequence(data)
        self._charge_write(sum(map(len, data)))

    def _charge_write(self, nbytes: int) -> None:
        if self.write_bucket is None or not nbytes or self._lost:
            return
        delay = self._charge(self.write_bucket, nbytes, "write")
        if delay > 0 and not self._closing():
            added = self._write_hold.extend(delay)
            self.write_throttled_seconds += added
            self.throttled_seconds += added
            self._update_producer()

    @property
    def write_throttled(self) -> bool:
        """The throttle is holding the inner producer paused."""
        return self._write_hold.active

    @property
    def producer(self):
        """The inner protocol's registered producer, or C{None}."""
        return self._inner_producer

    def registerProducer(self, producer, streaming: bool) -> None:
        if self._inner_producer is not None:
            raise RuntimeError(f"Cannot register producer {producer!r}: "
                               f"{self._inner_producer!r} was never unregistered")
        self._inner_producer = producer
        self._inner_streaming = bool(streaming)
        self._transport_full = False
        self._producer_paused = False
        self._pull_wanted = False
        # A pull registration asks the relay for data at once; the throttle may hold it.
        self._relay_registered = True
        try:
            self.transport.registerProducer(self._relay, streaming)
        except BaseException:
            self._inner_producer = None
            self._relay_registered = False
            raise
        self._update_producer()

    def unregisterProducer(self) -> None:
        self._inner_producer = None
        self._pull_wanted = False
        if self._relay_registered:
            self._relay_registered = False
            self.transport.unregisterProducer()

    def _transport_write_pause(self, paused: bool) -> None:
        if self._inner_streaming:
            self._transport_full = paused
        elif not paused:
            self._pull_wanted = True
        self._update_producer()

    def _transport_write_stop(self) -> None:
        # The real transport drops its registration when it stops a producer.
        self._relay_registered = False
        producer = self._inner_producer
        if producer is not None:
            producer.stopProducing()

    def _update_producer(self) -> None:
        producer = self._inner_producer
        if producer is None or self._lost:
            return
        if self._inner_streaming:
            want = self._transport_full or self._write_hold.active
            if want and not self._producer_paused:
                self._producer_paused = True
                producer.pauseProducing()
            elif not want and self._producer_paused:
                self._producer_paused = False
                producer.resumeProducing()
        elif self._pull_wanted and not self._write_hold.active:
            self._pull_wanted = False
            producer.resumeProducing()

    # -- both
    def _charge(self, bucket: TokenBucket, nbytes: int, direction: str) -> float:
        now = self.clock.seconds()
        delay = bucket.take(nbytes, now)
        if (self.max_debt is not None and not self.overflowed and not self._lost
                and bucket.debt(now) > self.max_debt):
            self.overflowed = True
            if self.on_overflow is not None:
                self.on_overflow()
            else:
                self.log.info("{direction} throttle overflow: debt {debt:.0f} > {max_debt:.0f} bytes, "
                              "aborting", direction=direction, debt=bucket.debt(now),
                              max_debt=self.max_debt)
                self.abortConnection()
        return delay
