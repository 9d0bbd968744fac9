"""
One channel's bulk DATA payloads of a link read as views of it, in one C{writeSequence}
(L{pipegate.mux.decoder.FrameDecoder}'s pieces, L{pipegate.mux.linkio.deliver_views},
L{pipegate.mux.channel.StreamChannel.pieces_received}), against the general path (a
decoder without views: each payload copied, one C{write} per DATA frame).
"""

from __future__ import annotations

from hypothesis import example, given, settings, strategies as st
from twisted.internet.testing import StringTransport

from pipegate.core.window import MAX_DATA
from pipegate.mux import frames
from pipegate.mux.channel import StreamChannel
from pipegate.mux.linkio import takes_views
from tests.test_mux_session import LinkTestCase, ViewTakingTransport

PROPERTY = settings(deadline=None, max_examples=150)


class WriteOnlyViews(StringTransport):
    """A socket whose write takes views but whose writeSequence is Twisted's (it may keep them)."""

    def write(self, data) -> None:
        super().write(bytes(data))

    write.takes_views = True


class Pieces(LinkTestCase):

    def receiver(self, windows, views: bool = True):
        """A gateway link with a StreamChannel over a ViewTakingTransport per window."""
        provider, gateway = self.pair()
        gateway.decoder.views = views
        channels = []
        for window in windows:
            channel = StreamChannel(window)
            channel.makeConnection(ViewTakingTransport())
            channel.attach(gateway, gateway.allocate_channel(channel))
            channels.append(channel)
        gateway.transport.clear()
        return gateway, channels

    @staticmethod
    def reads(wire: bytes, cuts) -> list:
        """C{wire} cut at C{cuts}, each read a read-only view of a fresh buffer (as the TLS layer's)."""
        cuts = sorted(set(cuts))
        return [memoryview(bytearray(wire[a:b])).toreadonly()
                for a, b in zip([0] + cuts, cuts + [len(wire)]) if b > a]

    def test_one_channels_data_of_a_read_leave_in_one_write_sequence(self):
        gateway, (channel, other) = self.receiver([1 << 20, 1 << 20])
        a, b = channel.channel_id, other.channel_id
        sent = [frames.Data(a, b"1" * 50_000), frames.Data(a, b"2" * 30_000), frames.Data(a, b"3" * 5_000),
                frames.Data(b, b"4" * 6_000), frames.Data(a, b"5" * 7_000)]
        wire = b"".join(map(frames.encode, sent))
        first, second = self.reads(wire, [20_000])   # the first frame across the two reads
        gateway.dataReceived(first)
        self.assertEqual(channel.transport.written, [])
        gateway.dataReceived(second)
        self.assertFalse(gateway.closed)
        # a's first three frames: one call with their pieces (the first one's from both reads), then
        # b's frame, then a's last (not consecutive with the others): each a view of the read
        written = channel.transport.written
        self.assertEqual([type(w) for w in written], [list, memoryview])
        self.assertEqual(b"".join(written[0]), b"1" * 50_000 + b"2" * 30_000 + b"3" * 5_000)
        self.assertEqual([p.obj for p in written[0]], [first.obj, second.obj, second.obj, second.obj])
        self.assertEqual(bytes(written[1]), b"5" * 7_000)
        self.assertEqual(b"".join(map(bytes, other.transport.written)), b"4" * 6_000)
        self.assertEqual(gateway.stats.get("bytes", "down"), 98_000)

    def test_a_group_over_the_credit_writes_nothing_of_itself(self):
        # One check for the group's sum, before any of it is written: the peer's frames of one read
        # can only have used the credit granted before the read.  (The general path checked each
        # frame after the credit its predecessors in the read returned, so it took these.)
        sent = lambda c: [frames.Data(c, bytes([i]) * 8_000) for i in range(2)]
        for views, closed, expected in ((True, True, b""), (False, False, bytes(8_000) + b"\x01" * 8_000)):
            gateway, (channel,) = self.receiver([10_000], views=views)
            wire = b"".join(map(frames.encode, sent(channel.channel_id)))
            gateway.dataReceived(self.reads(wire, [])[0])
            self.assertEqual(gateway.closed, closed)
            self.assertEqual(b"".join(b"".join(w) if type(w) is list else bytes(w)
                                      for w in channel.transport.written), expected)
        # within the credit, the group is taken whole
        gateway, (channel,) = self.receiver([16_000])
        gateway.dataReceived(self.reads(b"".join(map(frames.encode, sent(channel.channel_id))), [])[0])
        self.assertFalse(gateway.closed)
        self.assertEqual(b"".join(channel.transport.written[0]), bytes(8_000) + b"\x01" * 8_000)

    def test_views_only_to_a_socket_whose_write_sequence_takes_them(self):
        gateway, (channel,) = self.receiver([1 << 20])
        self.assertTrue(takes_views(channel))
        channel.transport = WriteOnlyViews()
        self.assertFalse(takes_views(channel))
        wire = b"".join(frames.encode(frames.Data(channel.channel_id, b"x" * 5_000)) for _ in range(3))
        gateway.dataReceived(self.reads(wire, [])[0])
        self.assertFalse(gateway.closed)
        self.assertEqual(channel.transport.value(), b"x" * 15_000)   # joined, as bytes

    @PROPERTY
    @given(st.lists(st.tuples(st.integers(0, 1), st.integers(1, MAX_DATA)), min_size=1, max_size=8),
           st.lists(st.integers(0, 1 << 20), max_size=8), st.integers(4_000, 300_000), st.booleans())
    @example([(0, 5_000), (0, 6_000), (1, 4_096), (0, 7_000)], [], 100_000, False)
    def test_the_same_bytes_and_credit_as_the_general_path(self, sizes, cuts, window, as_bytes):
        # For streams split anywhere: what each channel's socket gets, the credit left and the WINDOW
        # credit returned are those of the general path; when a group overruns its credit both links
        # fail (the grouped one having written a prefix of what the general one wrote).
        outcomes, calls = [], []
        for views in (True, False):
            gateway, channels = self.receiver([window, window], views=views)
            wire = b"".join(frames.encode(frames.Data(channels[c].channel_id, bytes([i % 256]) * size))
                            for i, (c, size) in enumerate(sizes))
            reads = self.reads(wire, [c for c in cuts if c < len(wire)])
            buffers = {id(r.obj) for r in reads}
            for read in reads:
                gateway.dataReceived(read.tobytes() if as_bytes else read)
                if gateway.closed:
                    break
            got = []
            for channel in channels:
                written = []
                for w in channel.transport.written:
                    for piece in (w if type(w) is list else [w]):
                        if type(piece) is memoryview:   # a view of a read, never of anything else
                            self.assertTrue(views and (id(piece.obj) in buffers or type(piece.obj) is bytes))
                        written.append(bytes(piece))
                got.append(b"".join(written))
            credit = [sum(f.increment for f in self.written(gateway)
                          if type(f) is frames.Window and f.channel == c.channel_id) for c in channels]
            outcomes.append((gateway.closed, got, [c.flow.recv.available for c in channels], credit))
            calls.append(sum(len(c.transport.written) for c in channels))
        (closed, got, available, credit), general = outcomes
        if not as_bytes and len(reads) == 1 and not closed and not general[0] and any(
                a[0] == b[0] and a[1] >= 4096 and b[1] >= 4096 for a, b in zip(sizes, sizes[1:])):
            # two bulk DATA of one channel in a row in one read: one write for both
            self.assertLess(calls[0], calls[1])
        if not closed and not general[0]:
            self.assertEqual(outcomes[0], general)
        else:
            # A group is checked against the credit as a whole: the general path checked each frame
            # after the credit its predecessors in the same read returned (which the peer cannot have
            # had yet), so it fails no sooner.
            self.assertTrue(closed)
            for mine, theirs in zip(got, general[1]):
                self.assertTrue(theirs.startswith(mine))
