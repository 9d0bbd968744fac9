"""
pipegate.mux.session.MuxLink without sockets: two links joined by StringTransports
(the TLS exporter value given by the transport), driven by a task.Clock.  Admission,
the handshake timeout, ping/pong and the ping deadline, frame dispatch, the channel
table, and what the link tells its node and its owner.
"""

from __future__ import annotations

import os

from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial import unittest

from pipegate.core.budget import LogThrottle
from pipegate.mux import frames
from pipegate.mux.channel import StreamChannel
from pipegate.mux.decoder import FrameDecoder
from pipegate.mux.hello import EXPORTER_LABEL, EXPORTER_LENGTH, hello_mac
from pipegate.mux.session import LinkChannel, LinkConfig, LinkError, MuxLink
from pipegate.stats import Stats

SECRET, OTHER = b"\x01" * 32, b"\x02" * 32
EXPORTER = b"E" * EXPORTER_LENGTH


class TLSTransport(StringTransport):
    """A StringTransport that answers the keying-material exporter as a TLS connection would."""

    def __init__(self, exporter: bytes = EXPORTER) -> None:
        super().__init__()
        self.exporter = exporter

    def getHandle(self):
        return self

    def export_keying_material(self, label: bytes, length: int, context=None) -> bytes:
        assert (label, length) == (EXPORTER_LABEL, EXPORTER_LENGTH), (label, length)
        return self.exporter


class RecordingNode:
    def __init__(self) -> None:
        self.stats = Stats()
        self.events: list = []

    def link_admitted(self, link) -> None:
        self.events.append(("admitted", link))

    def link_lost(self, link) -> None:
        self.events.append(("lost", link))

    def link_frame(self, link, frame) -> None:
        self.events.append(("frame", frame))


class RecordingOwner:
    def __init__(self, unadmitted_log=None) -> None:
        self.unadmitted_log = unadmitted_log
        self.events: list = []

    def link_admitted(self, link) -> None:
        self.events.append("admitted")

    def link_refused(self, link, reason: str) -> None:
        self.events.append(("refused", reason))

    def link_going_away(self, link) -> None:
        self.events.append("going away")

    def link_closed(self, link) -> None:
        self.events.append("closed")

    def peer_stopping(self) -> bool:
        return False


class RecordingChannel(LinkChannel):
    def __init__(self) -> None:
        self.frames: list = []
        self.lost = False

    def frame_received(self, frame) -> None:
        self.frames.append(frame)

    def link_lost(self) -> None:
        self.lost = True


class ViewTakingTransport(StringTransport):
    """A socket transport whose write and writeSequence take memoryviews (as pipegate.sockets' eager
    write): kept as given (a writeSequence as a list)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list = []

    def write(self, data) -> None:
        self.written.append(data)

    write.takes_views = True

    def writeSequence(self, pieces) -> None:
        self.written.append(list(pieces))

    writeSequence.takes_views = True


class Shaper(ProtocolWrapper):
    """A wrapper with a write of its own (a rate shaper may hold what it is given): bytes only."""

    def write(self, data) -> None:
        assert type(data) is bytes
        super().write(data)


class LinkTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def link(self, role: int, is_tls_client: bool, secret: bytes = SECRET, owner=None, **config) -> MuxLink:
        node = RecordingNode()
        link = MuxLink(node, LinkConfig(secret=secret, role=role, **config), self.clock, is_tls_client,
                       owner=owner)
        link.makeConnection(TLSTransport())
        self.addCleanup(self.close, link)
        return link

    def close(self, link: MuxLink) -> None:
        if not link.closed:
            link.fail("test over")
        link.connectionLost(None)

    @staticmethod
    def written(link: MuxLink) -> list:
        """The frames C{link} wrote since the last call."""
        data = link.transport.value()
        link.transport.clear()
        return FrameDecoder().feed(data)

    @staticmethod
    def pump(a: MuxLink, b: MuxLink) -> None:
        """Carry what each link wrote to the other until both are quiet."""
        while a.transport.value() or b.transport.value():
            for src, dst in ((a, b), (b, a)):
                data = src.transport.value()
                src.transport.clear()
                if data and not dst.closed:
                    dst.dataReceived(data)

    def pair(self, provider_secret: bytes = SECRET, **config) -> tuple[MuxLink, MuxLink]:
        """A provider (TLS client) and a gateway (TLS server), handshake done, HELLOs exchanged."""
        provider = self.link(frames.ROLE_PROVIDER, True, provider_secret, owner=RecordingOwner(), **config)
        gateway = self.link(frames.ROLE_GATEWAY, False, owner=RecordingOwner(), **config)
        provider.handshakeCompleted()
        gateway.handshakeCompleted()
        self.pump(provider, gateway)
        return provider, gateway


class Admission(LinkTestCase):
    def test_both_ends_knowing_the_secret_are_admitted(self) -> None:
        provider, gateway = self.pair()
        self.assertTrue(provider.admitted and gateway.admitted)
        self.assertEqual((provider.peer_role, gateway.peer_role), (frames.ROLE_GATEWAY, frames.ROLE_PROVIDER))
        self.assertEqual(gateway.node.events, [("admitted", gateway)])
        self.assertEqual(provider.owner.events, ["admitted"])
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 10.0)   # the pinger, not the handshake timer
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)               # one pinger per link

    def test_a_wrong_secret_is_refused_before_anything_flows(self) -> None:
        provider, gateway = self.pair(provider_secret=OTHER)
        self.assertFalse(gateway.admitted)
        self.assertTrue(gateway.closed)
        self.assertTrue(gateway.transport.disconnecting)
        self.assertEqual(gateway.node.events, [])
        self.assertEqual(gateway.stats.get("admission_failures", "secret"), 1)
        (refused,) = gateway.owner.events
        self.assertIn("router secret", refused[1])

    def test_a_hello_from_another_tls_session_is_refused(self) -> None:
        gateway = self.link(frames.ROLE_GATEWAY, False)
        gateway.handshakeCompleted()
        nonce = os.urandom(32)
        mac = hello_mac(SECRET, b"X" * EXPORTER_LENGTH, frames.ROLE_PROVIDER, nonce, True)
        gateway.dataReceived(frames.encode(frames.Hello(frames.ROLE_PROVIDER, nonce, mac)))
        self.assertTrue(gateway.closed)
        self.assertFalse(gateway.admitted)

    def test_a_reflected_hello_is_refused(self) -> None:
        gateway = self.link(frames.ROLE_GATEWAY, False)
        gateway.handshakeCompleted()
        (own,) = self.written(gateway)
        gateway.dataReceived(frames.encode(own))
        self.assertTrue(gateway.closed)

    def test_a_frame_before_hello_closes_the_link(self) -> None:
        gateway = self.link(frames.ROLE_GATEWAY, False, owner=RecordingOwner())
        gateway.handshakeCompleted()
        gateway.dataReceived(frames.encode(frames.Routes(())))
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.owner.events, [("refused", "Routes before admission")])
        self.assertEqual(gateway.stats.get("admission_failures", "protocol"), 1)

    def test_data_before_hello_closes_the_link(self) -> None:
        # (DATA comes from the decoder as a pair: the link makes it a frame for the refusal)
        gateway = self.link(frames.ROLE_GATEWAY, False, owner=RecordingOwner())
        gateway.handshakeCompleted()
        gateway.dataReceived(frames.encode(frames.Data(1, b"early")))
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.owner.events, [("refused", "Data before admission")])

    def test_data_in_the_read_that_admits_goes_to_its_channel(self) -> None:
        provider = self.link(frames.ROLE_PROVIDER, True, owner=RecordingOwner())
        gateway = self.link(frames.ROLE_GATEWAY, False, owner=RecordingOwner())
        provider.handshakeCompleted()
        gateway.handshakeCompleted()
        hello = provider.transport.value()
        provider.transport.clear()
        channel = RecordingChannel()
        gateway.reserve_channel(4, channel)
        gateway.dataReceived(hello + frames.encode(frames.Data(4, b"with the hello")))
        self.assertTrue(gateway.admitted)
        self.assertEqual(channel.frames, [frames.Data(4, b"with the hello")])
        self.assertEqual(gateway.stats.get("bytes", "down"), 14)

    def test_provider_to_provider_is_refused(self) -> None:
        a = self.link(frames.ROLE_PROVIDER, True)
        b = self.link(frames.ROLE_PROVIDER, False)
        a.handshakeCompleted()
        b.handshakeCompleted()
        self.pump(a, b)
        self.assertFalse(a.admitted or b.admitted)
        self.assertTrue(a.closed and b.closed)

    def test_the_handshake_timeout_closes_a_link_never_admitted(self) -> None:
        gateway = self.link(frames.ROLE_GATEWAY, False, handshake_timeout=3)
        self.clock.advance(2.9)
        self.assertFalse(gateway.closed)
        self.clock.advance(0.1)
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.stats.get("admission_failures", "timeout"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unadmitted_lines_go_through_the_owners_throttle(self) -> None:
        throttle = LogThrottle()
        events = []
        for _ in range(3):
            link = self.link(frames.ROLE_GATEWAY, False, owner=RecordingOwner(throttle))
            link.log = type(link.log)(observer=events.append)
            link.handshakeCompleted()
            link.dataReceived(frames.encode(frames.Ping(1)))
        self.assertEqual(len(events), 1)   # the other two held back for the interval

    def test_a_second_hello_closes_an_admitted_link(self) -> None:
        provider, gateway = self.pair()
        nonce = os.urandom(32)
        gateway.dataReceived(frames.encode(frames.Hello(frames.ROLE_PROVIDER, nonce, b"m" * 32)))
        self.assertTrue(gateway.closed)
        self.assertTrue(gateway.transport.disconnecting)


class Liveness(LinkTestCase):
    def test_pings_every_interval_and_answers_pings(self) -> None:
        provider, gateway = self.pair(ping_interval=5, ping_deadline=12)
        self.written(provider)
        self.clock.advance(5)
        self.assertEqual(self.written(provider), [frames.Ping(1)])
        gateway.dataReceived(frames.encode(frames.Ping(7)))
        self.assertEqual(self.written(gateway)[-1:], [frames.Pong(7)])

    def test_a_silent_peer_hits_the_ping_deadline(self) -> None:
        provider, gateway = self.pair(ping_interval=5, ping_deadline=12)
        self.clock.advance(10)
        self.assertFalse(provider.closed)
        self.clock.advance(5)   # 15 s without a frame > 12 s
        self.assertTrue(provider.closed)
        self.assertTrue(provider.transport.disconnecting)

    def test_any_frame_keeps_the_link_alive(self) -> None:
        provider, gateway = self.pair(ping_interval=5, ping_deadline=12)
        for _ in range(6):
            self.clock.advance(5)
            self.pump(provider, gateway)   # pings cross, pongs come back
        self.assertFalse(provider.closed or gateway.closed)

    def test_closing_stops_the_pinger(self) -> None:
        provider, gateway = self.pair()
        provider.fail("test")
        gateway.fail("test")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class Dispatch(LinkTestCase):
    def test_channel_frames_go_to_their_channel(self) -> None:
        provider, gateway = self.pair()
        channel = RecordingChannel()
        channel_id = gateway.allocate_channel(channel)
        sent = [frames.Data(channel_id, b"abc"), frames.Window(channel_id, 10), frames.Fin(channel_id),
                frames.OpenOk(channel_id), frames.Datagram(channel_id, b"d"), frames.Reset(channel_id, "r")]
        gateway.dataReceived(b"".join(frames.encode(f) for f in sent))
        self.assertEqual(channel.frames, sent)
        self.assertEqual(gateway.stats.get("bytes", "down"), 4)   # DATA and DATAGRAM payloads

    def test_frames_for_an_unknown_channel_are_dropped(self) -> None:
        provider, gateway = self.pair()
        gateway.dataReceived(frames.encode(frames.Data(99, b"late")) + frames.encode(frames.Reset(99, "x")))
        self.assertFalse(gateway.closed)
        self.assertEqual(gateway.node.events, [("admitted", gateway)])

    def test_link_frames_go_to_the_node(self) -> None:
        provider, gateway = self.pair()
        routes = frames.Routes((frames.Route(2222, "tcp", "127.0.0.1", 22),))
        opened = frames.Open(3, gate_port=2222, protocol="tcp", client_host="127.0.0.2", client_port=1)
        provider.dataReceived(frames.encode(opened))
        gateway.dataReceived(frames.encode(routes))
        self.assertEqual(gateway.node.events[-1], ("frame", routes))
        self.assertEqual(provider.node.events[-1], ("frame", opened))

    def test_goaway_marks_the_link_and_tells_node_and_owner(self) -> None:
        provider, gateway = self.pair()
        gateway.announce_going_away("stopping")
        gateway.announce_going_away("stopping")   # once
        self.assertEqual([f for f in self.written(gateway) if isinstance(f, frames.GoAway)],
                         [frames.GoAway("stopping")])
        provider.dataReceived(frames.encode(frames.GoAway("stopping")))
        self.assertTrue(provider.going_away)
        self.assertEqual(provider.node.events[-1], ("frame", frames.GoAway("stopping")))
        self.assertEqual(provider.owner.events, ["admitted", "going away"])
        self.assertFalse(provider.closed)   # open channels run on

    def test_a_malformed_frame_closes_only_that_link(self) -> None:
        provider, gateway = self.pair()
        gateway.dataReceived(b"\x00\x00\x00\x05\x7f\x00\x00\x00\x00")   # unknown frame type
        self.assertTrue(gateway.closed)
        self.assertFalse(provider.closed)

    def test_data_after_a_fin_closes_only_that_link_with_the_reason(self) -> None:
        provider, gateway = self.pair()
        events: list = []
        gateway.log = Logger(observer=events.append)
        channel = StreamChannel(frames.MAX_DATA)
        channel.makeConnection(StringTransport())
        channel.attach(gateway, gateway.allocate_channel(channel))
        fin, data = frames.Fin(channel.channel_id), frames.Data(channel.channel_id, b"late")
        gateway.dataReceived(frames.encode(fin) + frames.encode(data))
        self.assertTrue(gateway.closed)
        self.assertFalse(provider.closed)
        self.assertEqual([formatEvent(e) for e in events if e["log_level"] is LogLevel.warn],
                         [f"closing link with {gateway.peer_name}: DATA on channel 1 after its FIN"])
        self.assertEqual(channel.transport.value(), b"")   # the late bytes never reach the socket

    def test_payloads_are_counted_up_to_a_frame_that_fails(self) -> None:
        # Counted once per read, as each frame was before: the frames delivered and the one
        # that broke the link (here DATA over the channel's credit), not those after it.
        provider, gateway = self.pair()
        channel = StreamChannel(10)
        channel.makeConnection(StringTransport())
        channel.attach(gateway, gateway.allocate_channel(channel))
        other = RecordingChannel()
        other_id = gateway.allocate_channel(other)
        gateway.dataReceived(b"".join(frames.encode(f) for f in (
            frames.Data(other_id, b"dg"), frames.Datagram(other_id, b"d"), frames.Data(channel.channel_id, b"12345"),
            frames.Data(channel.channel_id, b"x" * 11), frames.Data(other_id, b"never"))))
        self.assertTrue(gateway.closed)
        self.assertEqual(gateway.stats.get("bytes", "down"), 2 + 1 + 5 + 11)
        self.assertEqual(channel.transport.value(), b"12345")
        self.assertEqual(other.frames, [frames.Data(other_id, b"dg"), frames.Datagram(other_id, b"d")])

    def test_bulk_payloads_reach_view_taking_sockets_as_views_and_others_as_bytes(self) -> None:
        # A DATA payload of 4 KiB or more, whole in a read given as a read-only view (the TLS layer's, from
        # 32 KiB), goes on uncopied to a StreamChannel whose socket's write takes views (pipegate.sockets'
        # eager write: it queues what the kernel does not take as bytes), also through a pass-through
        # ProtocolWrapper; any other channel or socket gets bytes (it may keep what it is given).
        provider, gateway = self.pair()
        plain = StreamChannel(frames.MAX_DATA)
        plain.makeConnection(StringTransport())
        viewing, wrapped, shaped = (StreamChannel(frames.MAX_DATA) for _ in range(3))
        viewing.makeConnection(ViewTakingTransport())
        ProtocolWrapper(WrappingFactory(Factory()), wrapped).makeConnection(ViewTakingTransport())
        Shaper(WrappingFactory(Factory()), shaped).makeConnection(ViewTakingTransport())
        other = RecordingChannel()
        channels = [plain, viewing, wrapped, shaped]
        for channel in channels:
            channel.attach(gateway, gateway.allocate_channel(channel))
        other_id = gateway.allocate_channel(other)
        sent = [frames.Data(c.channel_id, bytes([i]) * 5_000) for i, c in enumerate(channels)]
        sent.append(frames.Data(other_id, b"o" * 5_000))
        read = memoryview(bytearray(b"".join(map(frames.encode, sent)))).toreadonly()
        gateway.dataReceived(read)
        self.assertFalse(gateway.closed)
        got = [plain.transport.value(), viewing.transport.written, wrapped.transport.transport.written,
               shaped.transport.transport.written]
        self.assertEqual(got[0], sent[0].data)
        self.assertEqual([b"".join(w) for w in got[1:]], [f.data for f in sent[1:4]])
        self.assertEqual([type(w[0]) for w in got[1:]], [memoryview, memoryview, bytes])
        self.assertIs(got[1][0].obj, read.obj)   # not copied
        self.assertEqual(other.frames, [sent[-1]])
        self.assertIs(type(other.frames[0].data), bytes)

    def test_loss_reaches_channels_node_and_owner(self) -> None:
        provider, gateway = self.pair()
        channel = RecordingChannel()
        gateway.allocate_channel(channel)
        gateway.connectionLost(None)
        self.assertTrue(channel.lost)
        self.assertEqual(gateway.channel_count(), 0)
        self.assertEqual(gateway.node.events[-1], ("lost", gateway))
        self.assertEqual(gateway.owner.events[-1], "closed")


class SendData(LinkTestCase):
    """send_data's inline path for one small chunk against encode_data and the general rule."""

    def sent(self, link: MuxLink, channel_id: int, chunks) -> tuple:
        """What send_data wrote (held for the turn's end, or at once), counted, or raised."""
        writes: list = []
        link._write_later = lambda data: writes.append(("turn", bytes(data)))
        link._write_now = lambda data: writes.append(("now", bytes(data)))
        before = link.stats.get("bytes", "down")
        try:
            link.send_data(channel_id, chunks)
        except frames.FrameError as e:
            return "error", str(e), writes
        return writes, link.stats.get("bytes", "down") - before

    def expected(self, channel_id: int, chunks) -> tuple:
        """The same by encode_data and the rule of _write."""
        from pipegate.mux.session import SEND_AT_ONCE
        if not chunks:
            return [], 0
        try:
            wire = frames.encode_data(channel_id, chunks)
        except frames.FrameError as e:
            return "error", str(e), []
        return [("now" if len(wire) >= SEND_AT_ONCE else "turn", wire)], sum(map(len, chunks))

    def test_as_encode_data(self) -> None:
        from pipegate.mux.session import SEND_AT_ONCE
        provider, gateway = self.pair()
        sizes = [0, 1, 5, SEND_AT_ONCE - 11, SEND_AT_ONCE - 10, SEND_AT_ONCE - 9, SEND_AT_ONCE - 8,
                 SEND_AT_ONCE, frames.MAX_DATA, frames.MAX_DATA + 1]
        channels = [0, 1, 7, frames.MAX_CHANNEL, frames.MAX_CHANNEL + 1, -1]
        cases = [(c, [b"x" * n]) for c in channels for n in sizes]
        cases += [(3, [memoryview(b"abcdef")[1:4]]), (3, [memoryview(b"y" * (SEND_AT_ONCE - 9))]),
                  (3, []), (3, [b"ab", b"cd"]), (3, [b"a", b""]), (0, [b"a", b"b"])]
        for channel_id, chunks in cases:
            self.assertEqual(self.sent(provider, channel_id, chunks), self.expected(channel_id, chunks),
                             (channel_id, [len(c) for c in chunks]))

    def test_nothing_once_closed(self) -> None:
        provider, gateway = self.pair()
        provider.closed = True
        self.assertEqual(self.sent(provider, 3, [b"late"]), ([], 0))


class ChannelTable(LinkTestCase):
    def test_reserve_bind_release(self) -> None:
        provider, gateway = self.pair()
        placeholder, channel = RecordingChannel(), RecordingChannel()
        provider.reserve_channel(7, placeholder)
        self.assertTrue(provider.has_channel(7))
        self.assertTrue(provider.holds_channel(7, placeholder))
        self.assertFalse(provider.bind_channel(7, channel, RecordingChannel()))   # not its holder
        self.assertTrue(provider.bind_channel(7, channel, placeholder))
        self.assertFalse(provider.holds_channel(7, placeholder))
        self.assertFalse(provider.release_channel(7, placeholder))   # the channel holds it now
        self.assertEqual(provider.channel_count(), 1)
        self.assertTrue(provider.release_channel(7, channel))
        self.assertFalse(provider.has_channel(7))
        self.assertFalse(provider.release_channel(7))

    def test_no_bind_on_a_closed_link(self) -> None:
        provider, gateway = self.pair()
        placeholder = RecordingChannel()
        provider.reserve_channel(7, placeholder)
        provider.fail("gone")
        self.assertFalse(provider.holds_channel(7, placeholder))
        self.assertFalse(provider.bind_channel(7, RecordingChannel(), placeholder))

    def test_allocation_skips_ids_in_use_and_stops_at_the_cap(self) -> None:
        provider, gateway = self.pair(max_channels=3)
        gateway.reserve_channel(2, RecordingChannel())
        self.assertEqual([gateway.allocate_channel(RecordingChannel()) for _ in range(2)], [1, 3])
        self.assertRaises(LinkError, gateway.allocate_channel, RecordingChannel())

    def test_a_resume_reaches_the_channels_that_stopped_for_the_pause(self) -> None:
        # A pause touches no channel (idle ones cost nothing); a resume reaches the channels
        # that stopped reading meanwhile, once each, and not one released since.
        provider, gateway = self.pair()
        seen = []

        class Watching(LinkChannel):
            def link_resumed(self):
                seen.append(self)

        stopped, idle, released = Watching(), Watching(), Watching()
        for channel in (stopped, idle, released):
            gateway.allocate_channel(channel)
        gateway.pauseProducing()
        self.assertTrue(gateway.paused)
        gateway.hold(stopped)
        gateway.hold(stopped)
        gateway.hold(released)
        [released_id] = [i for i, c in gateway.channels.items() if c is released]
        gateway.release_channel(released_id, released)
        gateway.resumeProducing()
        self.assertEqual((gateway.paused, seen), (False, [stopped]))
        gateway.pauseProducing()
        gateway.resumeProducing()
        self.assertEqual(seen, [stopped])
