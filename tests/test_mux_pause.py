"""
A paused link and its channels (pipegate.mux.session MuxLink.hold, pipegate.mux.channel
StreamChannel._update_reading): no channel may stay paused for ever, whatever the order of
the link's pauses and resumes, the channels' reads, the peer's WINDOW credit and attaches.

The real MuxLink (admitted, on a StringTransport that pauses its producer past a limit and
resumes it when drained, as Twisted's TCP transport does) and real StreamChannels on
StringTransports; the test plays the peer (decodes what the link wrote, returns credit).
"""

from __future__ import annotations

import random

from pipegate.mux import frames
from pipegate.mux.channel import EARLY_HOLD, StreamChannel
from pipegate.mux.decoder import FrameDecoder
from pipegate.mux.session import LinkConfig, MuxLink
from tests.test_mux_channel import CountingSocket
from tests.test_mux_session import EXPORTER, SECRET, LinkTestCase, RecordingNode, TLSTransport

WINDOW = 4 * frames.MAX_DATA
LIMIT = 3 * WINDOW   # what the link's transport holds before it pauses the link


class FillingTransport(TLSTransport):
    """Pauses its producer once it holds more than C{limit} bytes; L{drain} resumes it."""

    def __init__(self, exporter: bytes = EXPORTER) -> None:
        super().__init__(exporter)
        self.limit = 0          # 0: never pauses (the handshake)
        self.full = False
        self.resume_inside_write = 0.0   # the chance that a write drains and resumes at once
        self.rng = random.Random(0)
        self.taken = b""

    def write(self, data) -> None:
        super().write(data)
        self._check()

    def writeSequence(self, seq) -> None:
        super().writeSequence(seq)
        self._check()

    def _check(self) -> None:
        if not self.limit:
            return
        if not self.full and len(self.value()) > self.limit:
            self.full = True
            self.producer.pauseProducing()
        elif self.full and self.rng.random() < self.resume_inside_write:
            self.drain(len(self.value()))

    def drain(self, n: int) -> None:
        data = self.value()
        self.clear()
        self.io.write(data[n:])
        self.taken += data[:n]
        if self.full and len(self.value()) <= self.limit // 2:
            self.full = False
            self.producer.resumeProducing()


class PausedLink(LinkTestCase):

    def setUp(self) -> None:
        super().setUp()
        self.provider, self.gateway = self.pair(max_channels=1000)
        self.assertTrue(self.gateway.admitted)
        self.wire: FillingTransport = self.gateway.transport
        self.wire.clear()
        self.wire.limit = LIMIT
        self.decoder = FrameDecoder()
        self.owed: dict[int, int] = {}   # bytes the peer received per channel and has not credited

    def link(self, role: int, is_tls_client: bool, secret: bytes = SECRET, owner=None, **config) -> MuxLink:
        # LinkTestCase.link, with a transport that fills for the gateway (the TLS server)
        link = MuxLink(RecordingNode(), LinkConfig(secret=secret, role=role, **config), self.clock,
                       is_tls_client, owner=owner)
        link.makeConnection(TLSTransport() if is_tls_client else FillingTransport())
        self.addCleanup(self.close, link)
        return link

    def channel(self, attach: bool = True) -> StreamChannel:
        channel = StreamChannel(WINDOW)
        channel.makeConnection(CountingSocket())
        if attach:
            self.attach(channel)
        return channel

    def attach(self, channel: StreamChannel) -> None:
        channel.attach(self.gateway, self.gateway.allocate_channel(channel))

    def peer_reads(self, n: int | None = None) -> None:
        """The peer reads C{n} bytes (all) of what the link wrote."""
        self.wire.drain(len(self.wire.value()) if n is None else n)
        data, self.wire.taken = self.wire.taken, b""
        for frame in self.decoder.feed(data):
            if isinstance(frame, frames.Data):
                self.owed[frame.channel] = self.owed.get(frame.channel, 0) + len(frame.data)

    def credit(self, channel: StreamChannel, n: int | None = None) -> None:
        """The peer wrote C{n} (all) of what it got on C{channel}: WINDOW back."""
        owed = self.owed.get(channel.channel_id, 0)
        n = owed if n is None else min(n, owed)
        if n:
            self.owed[channel.channel_id] = owed - n
            self.gateway.dataReceived(frames.encode(frames.Window(channel.channel_id, n)))

    def assert_reason_to_be_paused(self, channel: StreamChannel) -> None:
        """A paused socket is paused for a reason that will end: no credit (a WINDOW will come),
        the link paused with the channel held (its resume will come), or attach pending."""
        if channel.transport.producerState != "paused" or channel.done:
            return
        self.assertTrue(channel.link is None or channel.flow.send.blocked
                        or (self.gateway.paused and channel in self.gateway._held),
                        f"channel {channel.channel_id} paused for nothing: link paused "
                        f"{self.gateway.paused}, held {channel in self.gateway._held}")

    def assert_all_reading(self, channels) -> None:
        for channel in channels:
            self.assertEqual((channel.channel_id, channel.transport.producerState),
                             (channel.channel_id, "producing"))
        self.assertEqual((self.gateway.paused, self.gateway._held), (False, {}))

    # -- the orderings one at a time
    def test_out_of_credit_then_the_link_pauses_then_credit_then_the_link_resumes(self):
        channel = self.channel()
        channel.dataReceived(b"a" * WINDOW)          # the whole credit: paused for credit
        self.assertEqual(channel.transport.producerState, "paused")
        self.gateway.pauseProducing()
        self.peer_reads()
        self.credit(channel)                         # WINDOW while the link is paused: stays paused
        self.assertEqual(channel.transport.producerState, "paused")
        self.assertIn(channel, self.gateway._held)
        self.gateway.resumeProducing()
        self.assert_all_reading([channel])

    def test_out_of_credit_then_the_link_pauses_and_resumes_then_credit(self):
        channel = self.channel()
        channel.dataReceived(b"a" * WINDOW)
        self.gateway.pauseProducing()
        self.gateway.resumeProducing()
        self.assertEqual(channel.transport.producerState, "paused")
        self.peer_reads()
        self.credit(channel)
        self.assert_all_reading([channel])

    def test_attached_while_the_link_is_paused_after_the_early_hold(self):
        channel = self.channel(attach=False)
        channel.dataReceived(b"e" * EARLY_HOLD)       # the early hold: paused until attach
        self.assertEqual(channel.transport.producerState, "paused")
        self.gateway.pauseProducing()
        self.attach(channel)                          # its early bytes go; the link is paused
        self.assertEqual(channel.transport.producerState, "paused")
        self.gateway.resumeProducing()
        self.assert_all_reading([channel])

    def test_attached_while_the_link_is_paused_without_the_early_hold(self):
        channel = self.channel(attach=False)
        channel.dataReceived(b"e" * 10)
        self.gateway.pauseProducing()
        self.attach(channel)
        self.gateway.resumeProducing()
        self.assert_all_reading([channel])

    def test_the_link_pauses_inside_a_read_and_resumes_inside_another_channels_read(self):
        self.wire.limit = 1000
        first, second = self.channel(), self.channel()
        first.dataReceived(b"x" * 900)                # below the limit
        self.assertFalse(self.gateway.paused)
        second.dataReceived(b"y" * 200)               # its write pauses the link: it stops
        self.assertTrue(self.gateway.paused)
        self.assertEqual((first.transport.producerState, second.transport.producerState),
                         ("producing", "paused"))
        self.wire.resume_inside_write = 1.0           # the next write drains the link at once
        first.dataReceived(b"z")                      # the link resumes inside this read
        self.assert_all_reading([first, second])

    def test_a_held_channel_that_closes_is_forgotten(self):
        channel = self.channel()
        self.gateway.pauseProducing()
        channel.dataReceived(b"z")
        self.assertIn(channel, self.gateway._held)
        channel.connectionLost(None)
        self.assertNotIn(channel, self.gateway._held)
        self.gateway.resumeProducing()
        self.assertEqual(channel.transport.calls, 1)   # not resumed after it closed

    # -- every ordering: random steps, 40 seeds
    def test_random_orderings_leave_no_channel_paused_for_nothing(self):
        self.seen = {"held": 0, "held and out of credit": 0}
        for seed in range(40):
            self.random_run(seed)
        # (the orderings of interest happened, many times)
        self.assertGreater(min(self.seen.values()), 100, self.seen)

    def random_run(self, seed: int) -> None:
        rng = random.Random(seed)
        self.wire.rng = random.Random(seed + 1000)
        self.wire.resume_inside_write = rng.choice([0.0, 0.05, 0.5])
        channels = [self.channel(attach=rng.random() < 0.8) for _ in range(12)]
        for step in range(400):
            op = rng.random()
            live = [c for c in channels if not c.done]
            if op < 0.45:
                reading = [c for c in live if c.transport.producerState == "producing"]
                if reading:
                    channel = rng.choice(reading)
                    channel.dataReceived(b"r" * rng.choice([1, 4096, 65536, 130048]))
                    if self.gateway.paused and channel.link is not None and not channel.done:
                        # (one read per channel at most while the link is paused)
                        self.assertEqual(channel.transport.producerState, "paused")
            elif op < 0.65:
                self.peer_reads(rng.randrange(0, LIMIT))
            elif op < 0.85:
                attached = [c for c in live if c.link is not None]
                if attached:
                    self.credit(rng.choice(attached), rng.choice([None, 1, 65536]))
            elif op < 0.9:
                pending = [c for c in live if c.link is None]
                if pending:
                    self.attach(rng.choice(pending))
            elif op < 0.95 and not self.gateway.paused:
                self.gateway.pauseProducing()       # (as a TLS layer may, without a full buffer)
            elif self.gateway.paused and not self.wire.full:
                self.gateway.resumeProducing()
            for channel in channels:
                self.assert_reason_to_be_paused(channel)
            self.seen["held"] += bool(self.gateway._held)
            self.seen["held and out of credit"] += any(c.flow.send.blocked for c in self.gateway._held)
        # Quiet: every channel attached, the peer reads everything and returns all credit.
        for channel in channels:
            if channel.link is None:
                self.attach(channel)
        if self.gateway.paused and not self.wire.full:
            self.gateway.resumeProducing()
        for _ in range(10):
            self.peer_reads()
            for channel in channels:
                self.credit(channel)
        self.assertEqual(self.wire.value(), b"", f"seed {seed}")
        self.assert_all_reading(channels)
        for channel in channels:
            channel.abort()
        self.assertEqual(self.gateway.channels, {}, f"seed {seed}")
