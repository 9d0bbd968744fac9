"""
The HTTP plane's own WebSocket framing on open links (pipegate/http/pipe.py: ws_frame,
WireReader, FrameLink.dataReceived): the frames are RFC 6455 frames that a stock Autobahn
peer reads and writes, in any split of the byte stream; control frames and anything the
fast path does not take still reach Autobahn, which answers them as before.
"""

from __future__ import annotations

import os
import random

import txaio
from autobahn.twisted.websocket import (WebSocketClientFactory, WebSocketClientProtocol,
                                        WebSocketServerFactory, WebSocketServerProtocol)
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from pipegate.http import frames
from pipegate.http.pipe import FrameLink, WireReader, _xor, ws_frame
from tests.support import shuttle


def autobahn_frame(payload: bytes, opcode: int = 2, fin: bool = True, mask: bytes | None = None) -> bytes:
    """A frame as RFC 6455 spells it, built here independently of ws_frame."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    b1 = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((b0, b1 | n))
    elif n < 65536:
        head = bytes((b0, b1 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, b1 | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def split_randomly(data: bytes, rng: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        j = i + rng.choice((1, 2, 3, 7, 50, 1000, 70000))
        out.append(data[i:j])
        i = j
    return out


class Masking(unittest.TestCase):
    def test_xor_matches_autobahns_masker_at_every_size(self):
        mask = os.urandom(4)
        for n in (0, 1, 3, 4, 5, 125, 1023, 1024, 1025, 70000):
            payload = os.urandom(n)
            expected = create_xor_masker(mask, n).process(payload) if n else b""
            self.assertEqual(_xor(mask, payload), expected, n)

    def test_ws_frame_lengths_and_masks(self):
        for n in (0, 125, 126, 65535, 65536, 200000):
            payload = os.urandom(n)
            self.assertEqual(ws_frame(payload, masked=False), autobahn_frame(payload))
            framed = ws_frame(payload, masked=True)
            head = len(framed) - n - 4
            mask = framed[head:head + 4]
            self.assertEqual(framed, autobahn_frame(payload, mask=mask))

    def test_a_fresh_mask_per_frame(self):
        masks = {ws_frame(b"x" * 10, masked=True)[2:6] for _ in range(20)}
        self.assertGreater(len(masks), 15)


class Reader(unittest.TestCase):
    def feed_all(self, reader: WireReader, chunks: list[bytes]) -> list[tuple[str, bytes]]:
        out = []
        for chunk in chunks:
            if reader.done:   # (FrameLink hands every later byte to Autobahn)
                out.append((WireReader.RAW, chunk))
            else:
                out.extend(reader.feed(chunk))
        return out

    def test_any_split_gives_the_same_messages(self):
        rng = random.Random(7)
        for masked in (True, False):
            payloads = [os.urandom(rng.choice((0, 1, 125, 126, 1000, 65536, frames.MAX_FRAME_SIZE)))
                        for _ in range(30)]
            stream = b"".join(autobahn_frame(p, mask=os.urandom(4) if masked else None) for p in payloads)
            for _ in range(3):
                reader = WireReader(masked=masked)
                got = self.feed_all(reader, split_randomly(stream, rng))
                self.assertEqual(got, [(WireReader.MESSAGE, p) for p in payloads])
                self.assertFalse(reader.done)

    def test_control_frames_go_to_autobahn_whole(self):
        ping = autobahn_frame(b"hi", opcode=9, mask=b"abcd")
        stream = autobahn_frame(b"one", mask=b"wxyz") + ping + autobahn_frame(b"two", mask=b"1234")
        got = self.feed_all(WireReader(masked=True), [bytes([b]) for b in stream])
        self.assertEqual(got, [(WireReader.MESSAGE, b"one"), (WireReader.RAW, ping), (WireReader.MESSAGE, b"two")])

    def test_anything_else_hands_the_rest_over(self):
        text = autobahn_frame(b"text", opcode=1, mask=b"abcd")
        fragment = autobahn_frame(b"frag", fin=False, mask=b"abcd")
        unmasked = autobahn_frame(b"plain")
        too_big = autobahn_frame(b"x" * (frames.MAX_FRAME_SIZE + 1), mask=b"abcd")
        non_minimal = bytes((0x82, 0x80 | 126, 0, 5)) + b"abcd" + b"12345"
        reserved = bytes((0xC2, 0x80 | 1)) + b"abcd" + b"1"
        after = autobahn_frame(b"after", mask=b"wxyz")
        for odd in (text, fragment, unmasked, too_big, non_minimal, reserved):
            reader = WireReader(masked=True)
            got = self.feed_all(reader, [autobahn_frame(b"first", mask=b"wxyz") + odd[:20], odd[20:] + after])
            self.assertEqual(got[0], (WireReader.MESSAGE, b"first"))
            self.assertEqual(b"".join(p for _, p in got[1:]), odd + after)
            self.assertTrue(reader.done)

    def test_a_client_refuses_masked_frames_from_the_server(self):
        reader = WireReader(masked=False)
        masked = autobahn_frame(b"m", mask=b"abcd")
        self.assertEqual(list(reader.feed(masked)), [(WireReader.RAW, masked)])
        self.assertTrue(reader.done)

    def test_what_it_holds_is_bounded_by_one_frame(self):
        reader = WireReader(masked=True)
        big = autobahn_frame(b"y" * frames.MAX_FRAME_SIZE, mask=b"abcd")
        self.assertEqual(list(reader.feed(big[:-1])), [])
        self.assertEqual(reader._need, len(big))
        self.assertEqual(list(reader.feed(big[-1:])), [(WireReader.MESSAGE, b"y" * frames.MAX_FRAME_SIZE)])


class _Ours:
    """FrameLink's receiving and sending over a StringTransport (no socket options)."""

    def onOpen(self):
        self.opened = True

    def onMessage(self, payload, isBinary):
        self.received.append((payload, isBinary))
        if payload == b"close me":
            self.sendClose(1000, "asked")

    def onClose(self, wasClean, code, reason):
        self.closed = (wasClean, code, reason)


class OurServer(_Ours, FrameLink, WebSocketServerProtocol):
    def __init__(self):
        super().__init__()
        self.received, self.closed = [], None

    def onConnect(self, request):
        return "pipegate.v1"


class OurClient(_Ours, FrameLink, WebSocketClientProtocol):
    def __init__(self):
        super().__init__()
        self.received, self.closed = [], None


class StockServer(_Ours, WebSocketServerProtocol):
    def __init__(self):
        super().__init__()
        self.received, self.closed = [], None

    def onConnect(self, request):
        return "pipegate.v1"


class StockClient(_Ours, WebSocketClientProtocol):
    def __init__(self):
        super().__init__()
        self.received, self.closed = [], None


class _Transport(StringTransport):
    def unregisterProducer(self):   # Autobahn unregisters on close whether or not it registered
        self.producer = None


class AgainstStockAutobahn(unittest.TestCase):
    """Each end of ours against Autobahn's stock other end, bytes moved by hand."""

    def setUp(self):
        # Autobahn's timers (pings, handshake timeouts) go through txaio's loop.
        self.clock = task.Clock()
        previous, txaio.config.loop = txaio.config.loop, self.clock
        self.addCleanup(setattr, txaio.config, "loop", previous)

    def connect(self, server_class, client_class, **options):
        sf = WebSocketServerFactory("ws://127.0.0.1:9", reactor=self.clock)
        sf.protocol = server_class
        cf = WebSocketClientFactory("ws://127.0.0.1:9", protocols=["pipegate.v1"], reactor=self.clock)
        cf.protocol = client_class
        for factory in (sf, cf):
            factory.setProtocolOptions(maxFramePayloadSize=frames.MAX_FRAME_SIZE,
                                       maxMessagePayloadSize=frames.MAX_FRAME_SIZE, **options)
        self.server, self.client = sf.buildProtocol(None), cf.buildProtocol(None)
        self.st, self.ct = _Transport(), _Transport()
        self.server.makeConnection(self.st)
        self.client.makeConnection(self.ct)
        self.move()
        self.assertTrue(self.server.opened and self.client.opened)
        return self.server, self.client

    def move(self):
        shuttle(self.client, self.ct, self.server, self.st, self.clock)
        if self.st.disconnecting or self.ct.disconnecting:   # TCP closed: both ends see it
            for proto, transport in ((self.server, self.st), (self.client, self.ct)):
                if not getattr(transport, "lost", False):
                    transport.lost = True
                    proto.connectionLost(Failure(ConnectionDone()))

    def send(self, proto, payload: bytes):
        if isinstance(proto, FrameLink):
            proto.transport.write(ws_frame(payload, not proto.factory.isServer))
        else:
            proto.sendMessage(payload, isBinary=True)

    def exchange(self, server_class, client_class):
        server, client = self.connect(server_class, client_class)
        sizes = (0, 1, 125, 126, 4000, 65536, frames.MAX_FRAME_SIZE)
        payloads = [os.urandom(n) for n in sizes]
        for p in payloads:
            self.send(client, p)
            self.send(server, p)
        self.move()
        self.assertEqual(server.received, [(p, True) for p in payloads])
        self.assertEqual(client.received, [(p, True) for p in payloads])
        return server, client

    def test_our_server_reads_and_writes_for_a_stock_client(self):
        self.exchange(OurServer, StockClient)

    def test_our_client_reads_and_writes_for_a_stock_server(self):
        self.exchange(StockServer, OurClient)

    def test_our_two_ends(self):
        self.exchange(OurServer, OurClient)

    def test_pings_are_answered_and_links_stay_fast(self):
        server, client = self.connect(OurServer, OurClient, autoPingInterval=5, autoPingTimeout=5)
        for _ in range(3):
            self.clock.advance(5)
            self.move()
            self.send(client, b"data")
            self.send(server, b"data")
            self.move()
        self.clock.advance(5)   # no pong missing: nobody dropped the link
        self.move()
        self.assertIsNone(server.closed)
        self.assertIsNone(client.closed)
        self.assertEqual(len(server.received), 3)
        self.assertFalse(server._reader.done or client._reader.done)

    def test_close_from_either_side_is_clean(self):
        for asker in ("client", "server"):
            server, client = self.connect(OurServer, StockClient)
            self.send(getattr(self, asker), b"close me")
            self.move()
            self.assertEqual(server.closed[:2], (True, 1000))
            self.assertEqual(client.closed[:2], (True, 1000))

    def test_text_and_fragments_still_reach_autobahn(self):
        server, client = self.connect(OurServer, StockClient)
        client.sendMessage(b"first", isBinary=True)
        client.sendMessage(b"abcdefgh", isBinary=True, fragmentSize=3)
        client.sendMessage(b"then", isBinary=True)
        client.sendMessage(b"hello", isBinary=False)
        self.move()
        self.assertEqual(server.received, [(b"first", True), (b"abcdefgh", True), (b"then", True),
                                           (b"hello", False)])
        self.assertTrue(server._reader.done)

    def refused_as_by_stock_autobahn(self, frame: bytes):
        """C{frame} from the client ends the link as a stock Autobahn server ends it."""
        outcomes = []
        for server_class in (StockServer, OurServer):
            server, client = self.connect(server_class, OurClient)
            client.transport.write(autobahn_frame(b"before", mask=b"abcd") + frame)
            self.move()
            self.assertEqual(server.received, [(b"before", True)])
            self.assertIsNotNone(server.closed)
            outcomes.append((server.closed, server.localCloseCode, client.closed))
        self.assertEqual(outcomes[1], outcomes[0])
        return outcomes[0]

    def test_a_frame_over_the_limit_fails_the_link_as_before(self):
        outcome = self.refused_as_by_stock_autobahn(
            autobahn_frame(b"z" * (frames.MAX_FRAME_SIZE + 1), mask=b"abcd"))
        self.assertFalse(outcome[0][0])   # not a clean close: Autobahn drops the link

    def test_an_unmasked_client_frame_fails_the_link_as_before(self):
        outcome = self.refused_as_by_stock_autobahn(autobahn_frame(b"plain"))
        self.assertFalse(outcome[0][0])

    def test_reserved_bits_fail_the_link_as_before(self):
        outcome = self.refused_as_by_stock_autobahn(bytes((0xC2, 0x81)) + b"abcd" + b"1")
        self.assertFalse(outcome[0][0])
