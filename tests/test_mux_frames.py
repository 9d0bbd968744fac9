"""
Tests for L{pipegate.mux.frames}: the port plane (mux v1) codec, the incremental
L{pipegate.mux.decoder.FrameDecoder} and the admission helpers of L{pipegate.mux.hello}.

The hand-built byte strings follow docs/protocol.md section 2 field by field, so that the
codec is checked against the specification and not only against itself.  No sockets.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import struct

import attrs
from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from pipegate.mux import frames
from pipegate.mux.decoder import FrameDecoder, decode
from pipegate.mux.frames import (
    MAX_DATA, MAX_DATAGRAM, MAX_FRAME_SIZE, ROLE_GATEWAY, ROLE_OBSERVER, ROLE_PROVIDER, ROUTES_MAX,
    Data, Datagram, Fin, FrameError, GoAway, Hello, Open, OpenFail, OpenOk, Ping, Pong, Reset, Route,
    Routes, Window, encode, encode_datagram,
)
from pipegate.mux.hello import EXPORTER_LABEL, EXPORTER_LENGTH, hello_mac, parse_router_secret, verify_hello

PROPERTY = settings(deadline=None, max_examples=200)


# -- spec-level builders ----------------------------------------------------------------------

def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def str8(b: bytes) -> bytes:
    return u8(len(b)) + b


def str16(b: bytes) -> bytes:
    return u16(len(b)) + b


def frame_bytes(kind: int, channel: int, payload: bytes = b"") -> bytes:
    """length:4 (5 + payload) | type:1 | channel:4 | payload"""
    return u32(5 + len(payload)) + u8(kind) + u32(channel) + payload


def route_bytes(gate_port=443, protocol=0, service_port=8443, host=b"127.0.0.1", tags=b"",
                policy=b"") -> bytes:
    return u16(gate_port) + u8(protocol) + u16(service_port) + str8(host) + str16(tags) + str16(policy)


def routes_bytes(*routes: bytes, count=None, channel=0) -> bytes:
    return frame_bytes(0x02, channel, u16(len(routes) if count is None else count) + b"".join(routes))


def open_bytes(channel=1, gate_port=2222, protocol=0, client_port=40000, host=b"203.0.113.9",
               labels=b"") -> bytes:
    return frame_bytes(0x03, channel, u16(gate_port) + u8(protocol) + u16(client_port) + str8(host)
                       + str16(labels))


NONCE = bytes(range(32))
MAC = bytes(range(100, 132))


def hello_bytes(version=1, role=1, nonce=NONCE, mac=MAC, channel=0) -> bytes:
    return frame_bytes(0x01, channel, u8(version) + u8(role) + nonce + mac)


FULL_ROUTE = Route(
    gate_port=2222, protocol="tcp", service_host="db.internal.example", service_port=5432,
    tags=("postgres", "prod", "caf\u00e9"), policy=b'{"allow": ["10.0.0.0/8"]}')

SAMPLES = [
    Hello(role=ROLE_PROVIDER, nonce=NONCE, mac=MAC),
    Hello(role=ROLE_GATEWAY, nonce=b"\x00" * 32, mac=b"\xff" * 32),
    Hello(version=1, role=ROLE_OBSERVER, nonce=NONCE, mac=MAC),
    Routes(()),
    Routes((FULL_ROUTE,)),
    Routes((Route(53, "udp", "10.0.0.53", 53), FULL_ROUTE,
            Route(65535, "tcp", "::1", 1, tags=("x",), policy=b""))),
    Open(1, 2222, "tcp", "203.0.113.9", 40000),
    Open(2**32 - 1, 53, "udp", "2001:db8::1", 0, labels=("tenant=a", "zone b", "\u00fcber")),
    Open(7, 1, "tcp", "fe80::1%eth0", 65535, labels=("one",)),
    OpenOk(1),
    OpenOk(2**32 - 1),
    OpenFail(3, "connection refused"),
    OpenFail(4, ""),
    Data(1, b"x"),
    Data(3, bytes(range(256)) * 3),
    Data(4, b"\x00" * MAX_DATA),
    Window(1, 1),
    Window(2, frames.INITIAL_WINDOW),
    Window(3, 2**31 - 1),
    Fin(1),
    Fin(2**32 - 1),
    Reset(1),
    Reset(6, "caller went away \u2717"),
    Datagram(5, b""),
    Datagram(5, b"\x00\x01query"),
    Datagram(6, b"d" * MAX_DATAGRAM),
    Ping(0),
    Ping(2**64 - 1),
    Pong(12345678901234567890),
    GoAway(),
    GoAway("gateway shutting down"),
]
ALL_TYPES = {Hello, Routes, Open, OpenOk, OpenFail, Data, Window, Fin, Reset, Datagram, Ping, Pong,
             GoAway}
# Frames whose payload is not "the rest of the frame": trailing bytes are detectable.
STRUCTURED = [f for f in SAMPLES if not isinstance(f, (Data, Datagram))]
SMALL = [f for f in SAMPLES if len(encode(f)) <= 4096]


def feed_all(decoder: FrameDecoder, chunks) -> list:
    out = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


class RoundTripTests(unittest.TestCase):

    def test_every_sample_round_trips(self):
        for frame in SAMPLES:
            self.assertEqual(decode(encode(frame)), frame, frame)

    def test_all_frame_types_covered(self):
        self.assertEqual({type(f) for f in SAMPLES}, ALL_TYPES)

    def test_length_prefix_counts_the_bytes_that_follow(self):
        for frame in SAMPLES:
            wire = encode(frame)
            self.assertEqual(struct.unpack(">I", wire[:4])[0], len(wire) - 4, frame)

    def test_type_constants(self):
        self.assertEqual(
            [frames.HELLO, frames.ROUTES, frames.OPEN, frames.OPEN_OK, frames.OPEN_FAIL, frames.DATA,
             frames.WINDOW, frames.FIN, frames.RESET, frames.DATAGRAM, frames.PING, frames.PONG,
             frames.GOAWAY],
            list(range(1, 14)))
        self.assertEqual((ROLE_PROVIDER, ROLE_GATEWAY, ROLE_OBSERVER), (1, 2, 3))
        self.assertEqual((MAX_DATA, MAX_DATAGRAM, MAX_FRAME_SIZE, ROUTES_MAX),
                         (65536, 65507, 1_048_576, 4096))

    def test_hello_matches_spec_layout(self):
        wire = hello_bytes(version=1, role=2)
        frame = Hello(role=ROLE_GATEWAY, nonce=NONCE, mac=MAC)
        self.assertEqual(frame.version, 1)
        self.assertEqual(encode(frame), wire)
        self.assertEqual(len(wire), 4 + 5 + 66)
        self.assertEqual(decode(wire), frame)

    def test_hello_other_version_decodes(self):
        # The codec carries the version byte; the link refuses versions it does not speak.
        self.assertEqual(decode(hello_bytes(version=2)).version, 2)

    def test_routes_match_spec_layout(self):
        wire = routes_bytes(
            route_bytes(53, 1, 5353, b"10.0.0.53"),
            route_bytes(2222, 0, 5432, b"db.internal.example", "postgres prod caf\u00e9".encode(),
                        b'{"allow": ["10.0.0.0/8"]}'))
        frame = Routes((Route(53, "udp", "10.0.0.53", 5353), FULL_ROUTE))
        self.assertEqual(encode(frame), wire)
        self.assertEqual(decode(wire), frame)

    def test_empty_routes_withdraw_everything(self):
        self.assertEqual(encode(Routes()), frame_bytes(0x02, 0, b"\x00\x00"))
        self.assertEqual(decode(frame_bytes(0x02, 0, b"\x00\x00")), Routes(()))

    def test_routes_accept_lists(self):
        frame = Routes([Route(1, "tcp", "h", 2, tags=["a", "b"])])
        self.assertEqual(frame.routes, (Route(1, "tcp", "h", 2, ("a", "b")),))
        self.assertEqual(decode(encode(frame)), frame)

    def test_tags_and_labels_are_not_split_from_a_string(self):
        self.assertRaises(TypeError, Route, 1, "tcp", "h", 2, tags="ab")
        self.assertRaises(TypeError, Open, 1, 2, "tcp", "::1", 3, labels="ab")

    def test_route_limit(self):
        frame = Routes(tuple(Route(1 + i % 65535, "tcp", "h", 80) for i in range(ROUTES_MAX)))
        self.assertEqual(decode(encode(frame)), frame)

    def test_open_matches_spec_layout(self):
        wire = open_bytes(9, 2222, 0, 40000, b"203.0.113.9", b"tenant=a,zone b")
        frame = Open(9, 2222, "tcp", "203.0.113.9", 40000, ("tenant=a", "zone b"))
        self.assertEqual(encode(frame), wire)
        self.assertEqual(decode(wire), frame)
        self.assertEqual(decode(open_bytes(labels=b"")).labels, ())
        self.assertEqual(decode(open_bytes(protocol=1)).protocol, "udp")

    def test_open_ok_and_fin_match_spec_layout(self):
        self.assertEqual(encode(OpenOk(258)), b"\x00\x00\x00\x05\x04\x00\x00\x01\x02")
        self.assertEqual(decode(b"\x00\x00\x00\x05\x04\x00\x00\x01\x02"), OpenOk(258))
        self.assertEqual(encode(Fin(258)), b"\x00\x00\x00\x05\x08\x00\x00\x01\x02")
        self.assertEqual(decode(b"\x00\x00\x00\x05\x08\x00\x00\x01\x02"), Fin(258))

    def test_open_fail_matches_spec_layout(self):
        wire = frame_bytes(0x05, 3, str16(b"unknown service"))
        self.assertEqual(encode(OpenFail(3, "unknown service")), wire)
        self.assertEqual(decode(wire), OpenFail(3, "unknown service"))

    def test_data_matches_spec_layout(self):
        wire = b"\x00\x00\x00\x0a\x06\x00\x00\x00\x03hello"
        self.assertEqual(encode(Data(3, b"hello")), wire)
        self.assertEqual(decode(wire), Data(3, b"hello"))

    def test_window_matches_spec_layout(self):
        wire = frame_bytes(0x07, 9, u32(1000))
        self.assertEqual(encode(Window(9, 1000)), wire)
        self.assertEqual(decode(wire), Window(9, 1000))

    def test_reset_matches_spec_layout(self):
        wire = frame_bytes(0x09, 4, str16("d\u00e9j\u00e0 vu".encode()))
        self.assertEqual(encode(Reset(4, "d\u00e9j\u00e0 vu")), wire)
        self.assertEqual(decode(wire), Reset(4, "d\u00e9j\u00e0 vu"))

    def test_datagram_matches_spec_layout(self):
        self.assertEqual(encode(Datagram(2, b"")), frame_bytes(0x0A, 2))
        self.assertEqual(decode(frame_bytes(0x0A, 2, b"dns")), Datagram(2, b"dns"))

    def test_ping_pong_match_spec_layout(self):
        token = 0x0102030405060708
        self.assertEqual(encode(Ping(token)), frame_bytes(0x0B, 0, u64(token)))
        self.assertEqual(encode(Pong(token)), frame_bytes(0x0C, 0, u64(token)))
        self.assertEqual(decode(frame_bytes(0x0C, 0, u64(token))), Pong(token))

    def test_goaway_matches_spec_layout(self):
        wire = frame_bytes(0x0D, 0, str16(b"bye"))
        self.assertEqual(encode(GoAway("bye")), wire)
        self.assertEqual(decode(wire), GoAway("bye"))

    def test_encode_rejects_non_frames(self):
        self.assertRaises(TypeError, encode, b"\x00\x00\x00\x05\x04\x00\x00\x00\x01")
        self.assertRaises(TypeError, encode, FULL_ROUTE)

    def test_frame_error_is_value_error(self):
        self.assertTrue(issubclass(FrameError, ValueError))


class DecoderTests(unittest.TestCase):

    def test_every_prefix_then_the_rest(self):
        for frame in SAMPLES:
            wire = encode(frame)
            for n in range(len(wire)):
                decoder = FrameDecoder()
                self.assertEqual(decoder.feed(wire[:n]), [], (frame, n))
                self.assertEqual(decoder.buffered, n)
                self.assertEqual(decoder.feed(wire[n:]), [frame], (frame, n))
                self.assertEqual(decoder.buffered, 0)

    def test_byte_at_a_time_stream(self):
        stream = b"".join(encode(f) for f in SMALL)
        decoder = FrameDecoder()
        got = feed_all(decoder, (stream[i:i + 1] for i in range(len(stream))))
        self.assertEqual(got, SMALL)
        self.assertEqual(decoder.buffered, 0)

    def test_whole_stream_in_one_read(self):
        stream = b"".join(encode(f) for f in SAMPLES)
        self.assertEqual(FrameDecoder().feed(stream), SAMPLES)

    def test_encode_datagram_is_encode(self):
        for data in (b"", b"q" * 64, b"x" * MAX_DATAGRAM):
            self.assertEqual(encode_datagram(7, data), encode(Datagram(7, data)))
        self.assertRaises(FrameError, encode_datagram, 7, b"x" * (MAX_DATAGRAM + 1))
        self.assertRaises(FrameError, encode_datagram, 0, b"x")

    def test_whole_frames_then_a_tail(self):
        # A read of many whole small frames and the start of the next (the link under
        # request/response load): the whole ones come out, only the tail is held.
        frames = [Data(c, b"+OK\r\n") for c in range(1, 51)]
        stream = b"".join(encode(f) for f in frames)
        last = encode(Data(51, b"$3\r\nabc\r\n"))
        for cut in range(len(last)):
            decoder = FrameDecoder()
            self.assertEqual(decoder.feed(stream + last[:cut]), frames, cut)
            self.assertEqual(decoder.buffered, cut)
            self.assertEqual(decoder.feed(last[cut:]), [Data(51, b"$3\r\nabc\r\n")], cut)
            self.assertEqual(decoder.buffered, 0)

    def test_random_splits(self):
        stream = b"".join(encode(f) for f in SAMPLES)
        rng = random.Random(7)
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, len(stream)), 30))
            chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
            self.assertEqual(feed_all(FrameDecoder(), chunks), SAMPLES)

    def test_full_data_frames_across_reads_of_every_size(self):
        # The hot path: 64 KiB DATA frames spanning reads, with views kept between feeds.
        frames = [Data(c, bytes([c]) * MAX_DATA) for c in range(1, 6)] + [Fin(3), Data(2, b"x")]
        stream = b"".join(encode(f) for f in frames)
        rng = random.Random(11)
        for _ in range(20):
            chunks, pos = [], 0
            while pos < len(stream):
                n = rng.choice((1, 3, 8, 9, 10, 4095, 4096, 16_384, 65_536, 65_545, 100_000))
                chunks.append(stream[pos:pos + n])
                pos += n
            decoder = FrameDecoder()
            self.assertEqual(feed_all(decoder, chunks), frames)
            self.assertEqual(decoder.buffered, 0)

    def test_encode_data_is_the_frames_of_its_chunks(self):
        payload = bytes(range(256)) * 300
        chunks = [payload[:MAX_DATA], memoryview(payload)[MAX_DATA:MAX_DATA + 5], b"z"]
        wire = frames.encode_data(7, chunks)
        self.assertEqual(wire, b"".join(encode(Data(7, bytes(c))) for c in chunks))
        self.assertEqual(FrameDecoder().feed(wire), [Data(7, bytes(c)) for c in chunks])
        for chunk in chunks:  # one chunk (its own path)
            self.assertEqual(frames.encode_data(7, [chunk]), encode(Data(7, bytes(chunk))))
        for bad in ([b""], [payload[:MAX_DATA + 1]]):
            self.assertRaises(FrameError, frames.encode_data, 7, bad)
        self.assertRaises(FrameError, frames.encode_data, 0, [b"a"])

    def test_reads_are_not_kept_by_reference(self):
        # A caller may reuse its buffer after feed returns.
        wire = encode(Data(9, b"abcdefgh" * 100))
        buffer = bytearray(wire[:300])
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(buffer), [])
        buffer[:] = b"\xff" * 300
        self.assertEqual(decoder.feed(wire[300:]), [Data(9, b"abcdefgh" * 100)])

    def test_read_only_views_are_kept_uncopied_and_payloads_are_bytes(self):
        # The mux links' TLS layer hands large reads over as read-only views of fresh buffers.
        first, second = Data(3, b"x" * 60_000), Data(4, b"y" * 10)
        wire = encode(first) + encode(second)
        decoder = FrameDecoder()
        view = memoryview(bytearray(wire[:40_000])).toreadonly()
        self.assertEqual(decoder.feed(view), [])
        self.assertIs(decoder._parts[0].obj, view.obj)   # kept as given, not copied
        frames = decoder.feed(memoryview(wire[40_000:]))
        self.assertEqual(frames, [first, second])
        self.assertEqual([type(frame.data) for frame in frames], [bytes, bytes])
        self.assertEqual((decoder.buffered, decoder._parts), (0, []))

    def test_a_view_of_small_frames_is_parsed_in_place(self):
        small = [Data(channel, b"r" * 30) for channel in range(1, 2_000)]
        wire = b"".join(map(encode, small))
        decoder = FrameDecoder()
        frames = decoder.feed(memoryview(bytearray(wire[:-7])).toreadonly())
        self.assertEqual(frames, small[:-1])
        self.assertEqual({type(frame.data) for frame in frames}, {bytes})
        self.assertIsInstance(decoder._parts[0].obj, bytes)   # (the tail: of a copy, not of the view)
        self.assertEqual(decoder.feed(wire[-7:]), small[-1:])

    def test_a_trickled_frame_is_held_in_few_pieces(self):
        wire = encode(Data(1, bytes(range(256)) * 256))
        decoder = FrameDecoder()
        for i in range(len(wire) - 1):
            self.assertEqual(decoder.feed(wire[i:i + 1]), [])
            self.assertLessEqual(len(decoder._parts), decoder.buffered // 4096 + 1)
        self.assertEqual(decoder.feed(wire[-1:]), [Data(1, bytes(range(256)) * 256)])
        self.assertEqual((decoder.buffered, decoder._parts), (0, []))

    def test_empty_feed(self):
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(b""), [])
        self.assertEqual(decoder.buffered, 0)

    def test_holds_at_most_a_partial_frame(self):
        wire = encode(Data(1, b"a" * 1000))
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(wire + wire[:500]), [Data(1, b"a" * 1000)])
        self.assertEqual(decoder.buffered, 500)

    def test_oversized_declared_length_raises_at_once(self):
        for size in (MAX_FRAME_SIZE + 1, 2**32 - 1):
            decoder = FrameDecoder()
            self.assertEqual(decoder.feed(u32(size)[:3]), [])
            error = self.assertRaises(FrameError, decoder.feed, u32(size)[3:])
            self.assertIn(str(size), str(error))

    def test_oversized_after_a_good_frame(self):
        self.assertRaises(FrameError, FrameDecoder().feed, encode(Fin(1)) + u32(MAX_FRAME_SIZE + 1))

    def test_declared_length_of_exactly_max(self):
        body = u8(0x06) + u32(1)
        decoder = FrameDecoder()
        # max frame size is allowed as a length; this one is DATA over MAX_DATA, so it is
        # refused only once the body is complete, for its content.
        self.assertEqual(decoder.feed(u32(MAX_FRAME_SIZE) + body), [])
        self.assertRaises(FrameError, decoder.feed, b"x" * (MAX_FRAME_SIZE - 5))

    def test_custom_max_frame_size(self):
        limit = frames.MIN_MAX_FRAME_SIZE
        self.assertEqual(limit, 5 + MAX_DATA)
        decoder = FrameDecoder(max_frame_size=limit)
        self.assertEqual(decoder.max_frame_size, limit)
        self.assertEqual(decoder.feed(encode(Data(1, b"x" * MAX_DATA))), [Data(1, b"x" * MAX_DATA)])
        self.assertRaises(FrameError, decoder.feed, u32(limit + 1))
        big = Routes(tuple(Route(1, "tcp", "h" * 200, 2) for _ in range(400)))
        self.assertRaises(FrameError, encode, big, max_frame_size=limit)
        self.assertEqual(decode(encode(big)), big)

    def test_max_frame_size_must_fit_max_data(self):
        self.assertRaises(ValueError, FrameDecoder, frames.MIN_MAX_FRAME_SIZE - 1)
        self.assertRaises(ValueError, FrameDecoder, 0)

    def test_declared_length_below_header(self):
        for size in range(5):
            decoder = FrameDecoder()
            self.assertRaises(FrameError, decoder.feed, u32(size))
            self.assertRaises(FrameError, FrameDecoder().feed, u32(size) + b"\x04\x00\x00\x00\x01")

    def test_failure_is_sticky(self):
        decoder = FrameDecoder()
        self.assertRaises(FrameError, decoder.feed, frame_bytes(0x7F, 0))
        self.assertRaises(FrameError, decoder.feed, encode(Ping(1)))
        self.assertEqual(decoder.buffered, 0)

    def test_decode_wants_exactly_one_frame(self):
        wire = encode(Ping(1))
        self.assertRaises(FrameError, decode, b"")
        self.assertRaises(FrameError, decode, wire[:-1])
        self.assertRaises(FrameError, decode, wire + wire)
        self.assertRaises(FrameError, decode, wire + b"\x00")


class DecodeRejectionTests(unittest.TestCase):

    def assertRefused(self, wire: bytes) -> FrameError:
        return self.assertRaises(FrameError, FrameDecoder().feed, wire)

    def test_trailing_bytes(self):
        for frame in STRUCTURED:
            wire = encode(frame)
            for extra in (b"\x00", b"junk"):
                self.assertRefused(u32(len(wire) - 4 + len(extra)) + wire[4:] + extra)

    def test_truncated_payload(self):
        # A complete frame whose declared length stops inside the payload's fields.
        for frame in STRUCTURED:
            wire = encode(frame)
            for cut in range(1, len(wire) - 9 + 1):
                if isinstance(frame, Routes) and cut == len(wire) - 9:
                    continue  # not a cut: that is the whole payload
                body = wire[4:len(wire) - cut]
                self.assertRefused(u32(len(body)) + body)

    def test_string_running_past_the_frame(self):
        self.assertRefused(frame_bytes(0x0D, 0, u16(10) + b"short"))
        self.assertRefused(frame_bytes(0x05, 1, u16(1)))
        self.assertRefused(open_bytes()[:-2] + u16(5))

    def test_unknown_type(self):
        for kind in (0x00, 0x0E, 0x10, 0x7F, 0x80, 0xFF):
            error = self.assertRefused(frame_bytes(kind, 1, b"\x00\x00\x00\x01"))
            self.assertIn("type", str(error))
            self.assertRefused(frame_bytes(kind, 0))

    def test_link_frames_on_a_channel(self):
        for wire in (hello_bytes(channel=1), routes_bytes(channel=1),
                     frame_bytes(0x0B, 1, u64(1)), frame_bytes(0x0C, 2**32 - 1, u64(1)),
                     frame_bytes(0x0D, 5, str16(b""))):
            self.assertRefused(wire)

    def test_channel_frames_on_channel_zero(self):
        for wire in (open_bytes(channel=0), frame_bytes(0x04, 0), frame_bytes(0x05, 0, str16(b"x")),
                     frame_bytes(0x06, 0, b"x"), frame_bytes(0x07, 0, u32(1)), frame_bytes(0x08, 0),
                     frame_bytes(0x09, 0, str16(b"")), frame_bytes(0x0A, 0, b"x")):
            self.assertRefused(wire)

    def test_bad_protocol_byte(self):
        for protocol in (2, 6, 17, 0xFF):
            self.assertRefused(open_bytes(protocol=protocol))
            self.assertRefused(routes_bytes(route_bytes(protocol=protocol)))

    def test_bad_role(self):
        for role in (0, 4, 0xFF):
            self.assertRefused(hello_bytes(role=role))

    def test_hello_wrong_length(self):
        self.assertRefused(frame_bytes(0x01, 0, u8(1) + u8(1) + NONCE + MAC[:-1]))
        self.assertRefused(frame_bytes(0x01, 0, u8(1) + u8(1) + NONCE + MAC + b"\x00"))
        self.assertRefused(frame_bytes(0x01, 0))

    def test_window_zero_and_over_max(self):
        for increment in (0, 2**31, 2**32 - 1):
            self.assertRefused(frame_bytes(0x07, 1, u32(increment)))

    def test_data_empty_or_over_max(self):
        self.assertRefused(frame_bytes(0x06, 1))
        self.assertRefused(frame_bytes(0x06, 1, b"x" * (MAX_DATA + 1)))

    def test_datagram_over_max(self):
        self.assertRefused(frame_bytes(0x0A, 1, b"x" * (MAX_DATAGRAM + 1)))
        self.assertEqual(len(decode(frame_bytes(0x0A, 1, b"x" * MAX_DATAGRAM)).data), MAX_DATAGRAM)

    def test_bad_utf8(self):
        for bad in (b"\xff", b"caf\xe9", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82"):
            self.assertRefused(frame_bytes(0x09, 1, str16(bad)))
            self.assertRefused(frame_bytes(0x05, 1, str16(bad)))
            self.assertRefused(frame_bytes(0x0D, 0, str16(bad)))
            self.assertRefused(routes_bytes(route_bytes(tags=bad)))
            self.assertRefused(open_bytes(labels=bad))

    def test_hosts(self):
        for host in (b"", b"a b", b"a\tb", b"h\n", b"\xff", b"caf\xe9", b"\xc3"):
            self.assertRefused(routes_bytes(route_bytes(host=host)))
        self.assertEqual(decode(routes_bytes(route_bytes(host="caf\u00e9.example".encode()))),
                         Routes((Route(443, "tcp", "caf\u00e9.example", 8443),)))
        for host in (b"", b"localhost", b"1.2.3", b"01.2.3.4", b"\xd9\xa1.0.0.1", b"::g", b"\xff"):
            self.assertRefused(open_bytes(host=host))

    def test_ports(self):
        self.assertRefused(routes_bytes(route_bytes(gate_port=0)))
        self.assertRefused(routes_bytes(route_bytes(service_port=0)))
        self.assertRefused(open_bytes(gate_port=0))
        self.assertEqual(decode(open_bytes(client_port=0)).client_port, 0)

    def test_bad_tags_and_labels(self):
        for tags in (b" ", b"a  b", b" a", b"a ", b"a\tb", b"a\nb"):
            self.assertRefused(routes_bytes(route_bytes(tags=tags)))
        for labels in (b",", b"a,", b",a", b"a,,b"):
            self.assertRefused(open_bytes(labels=labels))

    def test_too_many_routes(self):
        one = route_bytes()
        self.assertRefused(routes_bytes(*[one] * (ROUTES_MAX + 1)))
        self.assertRefused(routes_bytes(one, count=2))   # count runs past the frame
        self.assertRefused(routes_bytes(one, one, count=1))   # trailing route


class EncodeRejectionTests(unittest.TestCase):
    """L{encode} refuses every frame L{FrameDecoder} would refuse."""

    BAD = [
        Hello(role=0, nonce=NONCE, mac=MAC),
        Hello(role=4, nonce=NONCE, mac=MAC),
        Hello(version=256, role=1, nonce=NONCE, mac=MAC),
        Hello(version=-1, role=1, nonce=NONCE, mac=MAC),
        Hello(role=1, nonce=NONCE[:31], mac=MAC),
        Hello(role=1, nonce=NONCE, mac=MAC + b"x"),
        Routes(tuple(Route(1, "tcp", "h", 2) for _ in range(ROUTES_MAX + 1))),
        Routes((Route(0, "tcp", "h", 2),)),
        Routes((Route(65536, "tcp", "h", 2),)),
        Routes((Route(1, "tcp", "h", 0),)),
        Routes((Route(1, "tcp", "h", -1),)),
        Routes((Route(1, "sctp", "h", 2),)),
        Routes((Route(1, "TCP", "h", 2),)),
        Routes((Route(1, "tcp", "", 2),)),
        Routes((Route(1, "tcp", "h" * 256, 2),)),
        Routes((Route(1, "tcp", "\u00e9" * 128, 2),)),
        Routes((Route(1, "tcp", "a b", 2),)),
        Routes((Route(1, "tcp", "a\u2003b", 2),)),
        Routes((Route(1, "tcp", "\udc80", 2),)),
        Routes((Route(1, "tcp", "h", 2, tags=("",)),)),
        Routes((Route(1, "tcp", "h", 2, tags=("a b",)),)),
        Routes((Route(1, "tcp", "h", 2, tags=("a\tb",)),)),
        Routes((Route(1, "tcp", "h", 2, tags=("\ud800",)),)),
        Routes((Route(1, "tcp", "h", 2, tags=("t" * 65536,)),)),
        Routes((Route(1, "tcp", "h", 2, policy=b"p" * 65536),)),
        Open(0, 1, "tcp", "::1", 2),
        Open(2**32, 1, "tcp", "::1", 2),
        Open(1, 0, "tcp", "::1", 2),
        Open(1, 1, "tcp", "::1", 65536),
        Open(1, 1, "tcp", "::1", -1),
        Open(1, 1, "quic", "::1", 2),
        Open(1, 1, "tcp", "localhost", 2),
        Open(1, 1, "tcp", "", 2),
        Open(1, 1, "tcp", "\u0661.0.0.1", 2),
        Open(1, 1, "tcp", "::1", 2, labels=("",)),
        Open(1, 1, "tcp", "::1", 2, labels=("a,b",)),
        Open(1, 1, "tcp", "::1", 2, labels=("l" * 65536,)),
        OpenOk(0),
        OpenOk(-1),
        OpenFail(0, "x"),
        OpenFail(1, "r" * 65536),
        OpenFail(1, "\udcff"),
        Data(0, b"x"),
        Data(1, b""),
        Data(1, b"x" * (MAX_DATA + 1)),
        Window(0, 1),
        Window(1, 0),
        Window(1, -1),
        Window(1, 2**31),
        Fin(0),
        Reset(0, "x"),
        Reset(1, "r" * 65536),
        Datagram(0, b"x"),
        Datagram(1, b"x" * (MAX_DATAGRAM + 1)),
        Ping(-1),
        Ping(2**64),
        Pong(2**64),
        GoAway("r" * 65536),
        GoAway("\ud800"),
    ]

    def test_encode_refuses(self):
        for frame in self.BAD:
            try:
                encode(frame)
            except FrameError:
                pass
            except Exception as e:  # pragma: no cover - the failure being tested
                self.fail(f"{frame!r}: {type(e).__name__}: {e}")
            else:
                self.fail(f"{frame!r} encoded")

    def test_client_host_check_is_the_same_from_its_cache(self):
        # The address check of every OPEN, sent or received, is cached (clients come back):
        # a refusal comes from the cache as a refusal, both ways.
        good = encode(Open(1, 1, "tcp", "10.0.0.3", 2))
        bad = good.replace(b"10.0.0.3", b"10.0.0.x")
        for _ in range(2):
            self.assertRaises(FrameError, encode, Open(1, 1, "tcp", "localhost", 2))
            self.assertEqual(FrameDecoder().feed(good), [Open(1, 1, "tcp", "10.0.0.3", 2)])
            self.assertRaises(FrameError, FrameDecoder().feed, bad)

    def test_limits_themselves_are_fine(self):
        for frame in [
            Routes((Route(1, "tcp", "h" * 255, 65535, tags=("t" * 65535,), policy=b"p" * 65535),)),
            Open(2**32 - 1, 65535, "udp", "255.255.255.255", 65535, labels=("l" * 65535,)),
            OpenFail(1, "r" * 65535),
            Reset(1, "r" * 65535),
            GoAway("r" * 65535),
            Window(1, 2**31 - 1),
        ]:
            self.assertEqual(decode(encode(frame)), frame)

    def test_frame_over_max_frame_size(self):
        # 17 routes with 64 KiB policies exceed 1 MiB.
        big = Routes(tuple(Route(1, "tcp", "h", 2, policy=b"p" * 65535) for _ in range(17)))
        self.assertRaises(FrameError, encode, big)
        wire = encode(big, max_frame_size=2 * MAX_FRAME_SIZE)
        self.assertRaises(FrameError, FrameDecoder().feed, wire)
        self.assertEqual(FrameDecoder(2 * MAX_FRAME_SIZE).feed(wire), [big])

    def test_encode_max_frame_size_bound_is_exact(self):
        base = Routes((Route(1, "tcp", "h", 2),))
        size = len(encode(base)) - 4
        self.assertEqual(decode(encode(base, max_frame_size=max(size, frames.MIN_MAX_FRAME_SIZE))), base)
        room = frames.MIN_MAX_FRAME_SIZE - size
        fits = Routes((Route(1, "tcp", "h", 2, policy=b"p" * room),))
        self.assertEqual(len(encode(fits)) - 4, frames.MIN_MAX_FRAME_SIZE)
        self.assertEqual(decode(encode(fits, max_frame_size=frames.MIN_MAX_FRAME_SIZE),
                                max_frame_size=frames.MIN_MAX_FRAME_SIZE), fits)
        over = attrs.evolve(fits, routes=(attrs.evolve(fits.routes[0], policy=b"p" * (room + 1)),))
        self.assertRaises(FrameError, encode, over, max_frame_size=frames.MIN_MAX_FRAME_SIZE)
        self.assertRaises(FrameError, decode, encode(over), max_frame_size=frames.MIN_MAX_FRAME_SIZE)


# -- properties -------------------------------------------------------------------------------

channels = st.integers(1, 2**32 - 1)
ports = st.integers(1, 65535)
text = st.text(max_size=40)
words = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
                min_size=1, max_size=12).filter(lambda w: not any(c.isspace() for c in w))
labels = st.text(min_size=1, max_size=12).filter(lambda s: "," not in s)
service_hosts = words.filter(lambda w: len(w.encode()) <= 255)
protocols = st.sampled_from(["tcp", "udp"])
routes = st.builds(Route, gate_port=ports, protocol=protocols, service_host=service_hosts,
                   service_port=ports, tags=st.lists(words, max_size=5).map(tuple),
                   policy=st.binary(max_size=64))
frame_strategy = st.one_of(
    st.builds(Hello, version=st.integers(0, 255), role=st.sampled_from([1, 2, 3]),
              nonce=st.binary(min_size=32, max_size=32), mac=st.binary(min_size=32, max_size=32)),
    st.builds(Routes, st.lists(routes, max_size=8).map(tuple)),
    st.builds(Open, channels, ports, protocols, st.ip_addresses().map(str), st.integers(0, 65535),
              st.lists(labels, max_size=4).map(tuple)),
    st.builds(OpenOk, channels),
    st.builds(OpenFail, channels, text),
    st.builds(Data, channels, st.binary(min_size=1, max_size=2048)),
    st.builds(Window, channels, st.integers(1, 2**31 - 1)),
    st.builds(Fin, channels),
    st.builds(Reset, channels, text),
    st.builds(Datagram, channels, st.binary(max_size=2048)),
    st.builds(Ping, st.integers(0, 2**64 - 1)),
    st.builds(Pong, st.integers(0, 2**64 - 1)),
    st.builds(GoAway, text),
)


class PropertyTests(unittest.TestCase):

    @PROPERTY
    @given(frame_strategy)
    def test_round_trip(self, frame):
        self.assertEqual(decode(encode(frame)), frame)

    @PROPERTY
    @given(st.lists(frame_strategy, max_size=8), st.data())
    def test_stream_split_anywhere(self, sent, data):
        stream = b"".join(encode(f) for f in sent)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        decoder = FrameDecoder()
        self.assertEqual(feed_all(decoder, chunks), sent)
        self.assertEqual(decoder.buffered, 0)

    @PROPERTY
    @given(st.lists(frame_strategy, max_size=8), st.data())
    def test_data_pairs_are_the_data_frames(self, sent, data):
        # FrameDecoder(data_pairs=True) (a MuxLink's) gives each DATA frame as (channel, payload)
        # and everything else as the plain decoder does: the same frames, held bytes and errors
        # read by read, for streams split anywhere, as bytes or read-only views, and mutated.
        stream = bytearray(b"".join(encode(f) for f in sent))
        for _ in range(data.draw(st.integers(0, 2)) if stream else 0):
            stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        chunks = [bytes(stream[a:b]) for a, b in zip([0] + cuts, cuts + [len(stream)])]
        if data.draw(st.booleans()):
            chunks = [memoryview(chunk).toreadonly() for chunk in chunks]
        plain, paired = FrameDecoder(), FrameDecoder(data_pairs=True)

        def outcome(decoder, chunk):
            try:
                return decoder.feed(chunk), decoder.buffered
            except FrameError as e:
                return str(e)

        for chunk in chunks:
            expected = outcome(plain, chunk)
            if not isinstance(expected, str):
                received, held = expected
                expected = [(f.channel, f.data) if type(f) is Data else f for f in received], held
            got = outcome(paired, chunk)
            self.assertEqual(got, expected)
            if not isinstance(got, str):
                self.assertEqual([type(f[1]) for f in got[0] if type(f) is tuple], [bytes] * sum(
                    type(f) is tuple for f in got[0]))

    @PROPERTY
    @given(st.lists(st.one_of(frame_strategy, frame_strategy, st.builds(
        lambda channel, size, fill: Data(channel, bytes([fill]) * size),
        channels, st.integers(4000, MAX_DATA), st.integers(0, 255))), max_size=8), st.data())
    def test_views_are_the_data_pairs(self, sent, data):
        # FrameDecoder(data_pairs=True, views=True) (a MuxLink's) gives a DATA payload of 4 KiB or more
        # that lies whole in a read-only view (or in bytes) as a view of that read, uncopied; everything else as
        # the data_pairs decoder does: the same frames, payload bytes, held bytes and errors read by
        # read, for streams split anywhere, as bytes or read-only views, and mutated.
        stream = bytearray(b"".join(encode(f) for f in sent))
        for _ in range(data.draw(st.integers(0, 2)) if stream and data.draw(st.booleans()) else 0):
            stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        chunks = [bytes(stream[a:b]) for a, b in zip([0] + cuts, cuts + [len(stream)])]
        as_views = data.draw(st.booleans())
        if as_views:
            chunks = [memoryview(bytearray(chunk)).toreadonly() for chunk in chunks]
        paired, viewing = FrameDecoder(data_pairs=True), FrameDecoder(data_pairs=True, views=True)

        def outcome(decoder, chunk):
            try:
                return decoder.feed(chunk), decoder.buffered
            except FrameError as e:
                return str(e)

        def joined(outcome):
            # One channel's consecutive DATA as one payload (the viewing decoder groups the bulk ones)
            if isinstance(outcome, str):
                return outcome
            frames = []
            for frame in outcome[0]:
                if type(frame) is tuple:
                    payload = b"".join(frame[1]) if type(frame[1]) is list else bytes(frame[1])
                    if frames and type(frames[-1]) is tuple and frames[-1][0] == frame[0]:
                        frames[-1] = (frame[0], frames[-1][1] + payload)
                        continue
                    frame = (frame[0], payload)
                frames.append(frame)
            return frames, outcome[1]

        buffers = []
        for chunk in chunks:
            buffers.append(chunk.obj if as_views else chunk)
            expected, got = outcome(paired, chunk), outcome(viewing, chunk)
            self.assertEqual(joined(got), joined(expected))
            if isinstance(got, str):
                break
            previous = None
            for frame in got[0]:
                if type(frame) is tuple and type(frame[1]) is not bytes:
                    # a bulk payload, or one channel's consecutive ones, as views: never two pairs in a row
                    self.assertFalse(previous is not None and previous[0] == frame[0]
                                     and type(previous[1]) is not bytes)
                    pieces = frame[1] if type(frame[1]) is list else [frame[1]]
                    self.assertGreaterEqual(sum(map(len, pieces)), 4096)
                    for piece in pieces:
                        self.assertIs(type(piece), memoryview)
                        self.assertTrue(piece.readonly)
                        # (of a read given, or of bytes: the decoder's own when a read ended in a prefix)
                        self.assertTrue(type(piece.obj) is bytes or any(piece.obj is b for b in buffers))
                previous = frame if type(frame) is tuple else None
            self.assertEqual([f for f in got[0] if type(f) is not tuple],
                             [f for f in expected[0] if type(f) is not tuple])

    def test_a_bulk_payload_whole_in_a_view_is_given_as_a_view_of_it(self):
        # A bulk link's receiver copied every payload byte once here; now only the one across reads.
        first, second, third = Data(3, b"x" * 60_000), Data(4, b"y" * 50_000), Data(5, b"z" * 4087)
        wire = encode(first) + encode(second) + encode(third) + encode(Fin(5))
        decoder = FrameDecoder(data_pairs=True, views=True)
        view = memoryview(bytearray(wire[:100_000])).toreadonly()
        got = decoder.feed(view)
        self.assertEqual(got, [(3, first.data)])
        self.assertIs(got[0][1].obj, view.obj)   # no copy
        got = decoder.feed(memoryview(bytearray(wire[100_000:])).toreadonly())
        self.assertEqual([(4, b"".join(got[0][1]))] + got[1:], [(4, second.data), (5, third.data), Fin(5)])
        # across reads: its pieces, views of the two reads (no join); small: copied
        self.assertEqual([type(f[1]) for f in got[:2]], [list, bytes])
        self.assertIs(got[0][1][0].obj, view.obj)
        self.assertEqual(FrameDecoder(data_pairs=True).feed(view), [(3, first.data)])
        self.assertIs(type(FrameDecoder(data_pairs=True).feed(view)[0][1]), bytes)   # (not without views)

    def test_data_pairs_from_the_general_path(self):
        # A DATA frame across two reads (the general path) is a pair too.
        wire = encode(Data(5, b"x" * 300)) + encode(Fin(5))
        decoder = FrameDecoder(data_pairs=True)
        self.assertEqual(decoder.feed(wire[:100]), [])
        self.assertEqual(decoder.feed(wire[100:]), [(5, b"x" * 300), Fin(5)])

    @PROPERTY
    @given(st.lists(st.binary(max_size=64), max_size=8))
    def test_random_bytes_only_frame_errors(self, chunks):
        decoder = FrameDecoder()
        try:
            feed_all(decoder, chunks)
        except FrameError:
            pass

    @PROPERTY
    @given(st.integers(0, 0x0F), st.integers(0, 3), st.binary(max_size=300))
    def test_random_bodies_only_frame_errors(self, kind, channel, payload):
        # A well-formed length around a random body exercises every payload parser.
        try:
            frame = decode(frame_bytes(kind, channel, payload))
        except FrameError:
            return
        # Whatever decodes re-encodes to the same bytes.
        self.assertEqual(encode(frame), frame_bytes(kind, channel, payload))

    @PROPERTY
    @given(frame_strategy, st.data())
    def test_mutated_frames_only_frame_errors(self, frame, data):
        wire = bytearray(encode(frame))
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(4, len(wire) - 1))
            wire[i] = data.draw(st.integers(0, 255))
        try:
            got = decode(bytes(wire))
        except FrameError:
            return
        self.assertEqual(encode(got), bytes(wire))

    @PROPERTY
    @given(st.lists(st.sampled_from(["a", "b,c", "", ",", "\u00e9", "x y"]), max_size=3),
           st.sampled_from([b"203.0.113.9", b"::1", b"10.0.0.x", b"", b"\xc3\xa9"]),
           st.integers(0, 3), st.data())
    def test_open_read_in_one_step_or_by_the_general_reader_alike(self, labels, host, protocol, data):
        # An OPEN (one per tunnelled connection) is read in a few steps when it is valid
        # (frames._decode_open); anything that one declines goes through the general reader.
        # Both must give the same frame, or the same error, for any OPEN body.
        payload = bytearray(u16(data.draw(st.integers(0, 2))) + u8(protocol) + u16(40000) + str8(host)
                            + str16(",".join(labels).encode("utf-8")))
        for _ in range(data.draw(st.integers(0, 2))):
            i = data.draw(st.integers(0, len(payload) - 1))
            payload[i] = data.draw(st.integers(0, 255))
        payload += data.draw(st.sampled_from([b"", b"\x00"]))
        wire = frame_bytes(frames.OPEN, 1, bytes(payload))

        def outcome():
            try:
                return decode(wire)
            except FrameError as e:
                return str(e)
        fast = outcome()
        general = frames._decode_open
        frames._decode_open = lambda channel, payload: None
        try:
            self.assertEqual(fast, outcome())
        finally:
            frames._decode_open = general

    @PROPERTY
    @given(st.sampled_from([Open, Fin, OpenOk]), st.sampled_from([1, 2**32 - 1, 0, -1, 2**32]),
           st.sampled_from([1, 0, 65535, 65536, True]), st.sampled_from(["tcp", "udp", "sctp", ["tcp"]]),
           st.sampled_from(["203.0.113.9", "::1", "10.0.0.x", "", "\u00e9"]),
           st.sampled_from([40000, -1, 65536, "x"]), st.sampled_from([(), ("a",)]),
           st.sampled_from([MAX_FRAME_SIZE, 10, 4]))
    def test_open_fin_open_ok_written_in_one_step_or_by_the_general_path_alike(
            self, kind, channel, gate_port, protocol, host, client_port, labels, max_frame_size):
        # OPEN (without labels), FIN and OPEN_OK are written without encode's general
        # dispatch; a subclass of the frame's class goes the general way.  Both must give
        # the same bytes, or the same error, for any fields.
        if kind is Open:
            fields = dict(channel=channel, gate_port=gate_port, protocol=protocol, client_host=host,
                          client_port=client_port, labels=labels)
        else:
            fields = dict(channel=channel)
        general = attrs.make_class("General", {}, bases=(kind,), frozen=True)

        def outcome(frame):
            try:
                return encode(frame, max_frame_size)
            except Exception as e:
                return type(e), str(e)
        self.assertEqual(outcome(kind(**fields)), outcome(general(**fields)))

    @PROPERTY
    @given(st.sampled_from([frames.WINDOW, frames.FIN, frames.OPEN_OK, frames.OPEN]), st.binary(max_size=8))
    def test_short_frames_read_in_one_step_or_by_the_general_reader_alike(self, kind, payload):
        # WINDOW, FIN and OPEN_OK bodies (one per connection, or per DATA frames' credit) are
        # read without the general reader when they have the expected size.
        def outcome(read):
            try:
                return read(kind, 1, payload)
            except FrameError as e:
                return str(e)
        self.assertEqual(outcome(frames.decode_body), outcome(frames._decode_general))

    def test_valid_open_is_read_in_one_step(self):
        frame = Open(7, 2222, "udp", "203.0.113.9", 40000, ("a", "b"))
        self.assertEqual(frames._decode_open(7, encode(frame)[9:]), frame)
        self.assertIsNone(frames._decode_open(7, encode(frame)[9:] + b"\x00"))


# -- admission --------------------------------------------------------------------------------

SECRET = bytes.fromhex("a5" * 32)
EXPORTER = hashlib.sha256(b"some TLS session").digest()


class AdmissionTests(unittest.TestCase):

    def hello(self, role=ROLE_PROVIDER, nonce=NONCE, is_tls_client=True, secret=SECRET,
              exporter=EXPORTER) -> Hello:
        return Hello(role=role, nonce=nonce, mac=hello_mac(secret, exporter, role, nonce, is_tls_client))

    def test_exporter_label(self):
        self.assertEqual(EXPORTER_LABEL, b"EXPORTER-pipegate-mux-v1")
        self.assertEqual(EXPORTER_LENGTH, 32)

    def test_mac_formula(self):
        expected = hmac.new(
            SECRET, b"pipegate-mux-v1 hello\x00" + b"C" + b"\x02" + NONCE + EXPORTER,
            hashlib.sha256).digest()
        self.assertEqual(hello_mac(SECRET, EXPORTER, ROLE_GATEWAY, NONCE, True), expected)
        server = hmac.new(
            SECRET, b"pipegate-mux-v1 hello\x00" + b"S" + b"\x01" + NONCE + EXPORTER,
            hashlib.sha256).digest()
        self.assertEqual(hello_mac(SECRET, EXPORTER, ROLE_PROVIDER, NONCE, False), server)
        self.assertEqual(len(expected), frames.MAC_SIZE)

    def test_correct_mac_verifies(self):
        for role in (ROLE_PROVIDER, ROLE_GATEWAY, ROLE_OBSERVER):
            for client in (True, False):
                hello = self.hello(role=role, is_tls_client=client)
                self.assertTrue(verify_hello(SECRET, EXPORTER, hello, client))
                # and survives the wire
                self.assertTrue(verify_hello(SECRET, EXPORTER, decode(encode(hello)), client))

    def test_wrong_secret(self):
        hello = self.hello(secret=bytes(32))
        self.assertFalse(verify_hello(SECRET, EXPORTER, hello, True))

    def test_wrong_exporter(self):
        # A hello recorded on another TLS session is useless on this one.
        hello = self.hello(exporter=hashlib.sha256(b"another session").digest())
        self.assertFalse(verify_hello(SECRET, EXPORTER, hello, True))

    def test_swapped_direction(self):
        # Our own hello reflected back by the peer does not verify as the peer's.
        ours = self.hello(is_tls_client=True)
        self.assertFalse(verify_hello(SECRET, EXPORTER, ours, peer_is_tls_client=False))
        self.assertFalse(verify_hello(SECRET, EXPORTER, self.hello(is_tls_client=False), True))

    def test_changed_role_or_nonce(self):
        hello = self.hello(role=ROLE_OBSERVER)
        self.assertFalse(verify_hello(SECRET, EXPORTER, attrs.evolve(hello, role=ROLE_GATEWAY), True))
        nonce = bytes([NONCE[0] ^ 1]) + NONCE[1:]
        self.assertFalse(verify_hello(SECRET, EXPORTER, attrs.evolve(hello, nonce=nonce), True))

    def test_changed_mac(self):
        hello = self.hello()
        mac = hello.mac[:-1] + bytes([hello.mac[-1] ^ 0x80])
        self.assertFalse(verify_hello(SECRET, EXPORTER, attrs.evolve(hello, mac=mac), True))
        self.assertFalse(verify_hello(SECRET, EXPORTER, attrs.evolve(hello, mac=b""), True))


class RouterSecretTests(unittest.TestCase):

    def test_lower_and_upper_case(self):
        hexed = bytes(range(32)).hex()
        self.assertEqual(parse_router_secret(hexed), bytes(range(32)))
        self.assertEqual(parse_router_secret(hexed.upper()), bytes(range(32)))
        self.assertEqual(parse_router_secret("Ab" * 32), b"\xab" * 32)

    def test_surrounding_whitespace_stripped(self):
        self.assertEqual(parse_router_secret("  " + "0f" * 32 + "\n"), b"\x0f" * 32)

    def test_refused(self):
        for text in ("", "0" * 63, "0" * 65, "g" * 64, "0x" + "0" * 62, "0" * 31 + " " + "0" * 32,
                     "\u0661" * 64, "0" * 128, "0" * 64 + "\n0"):
            error = self.assertRaises(ValueError, parse_router_secret, text)
            self.assertEqual(
                str(error), "router secret must be 64 hex characters (pipegate router-secret makes one)")
