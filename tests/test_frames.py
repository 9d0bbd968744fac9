"""
Tests for L{pipegate.http.frames}: the C{pipegate.v1} codec and the credit windows.

The hand-built byte strings follow docs/protocol.md section 1 field by field, so that the
codec is checked against the specification and not only against itself.
"""

from __future__ import annotations

import struct

import attrs
from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from pipegate.http.frames import (
    MAX_DATA, MAX_FRAME_SIZE, Data, End, FrameError, GoAway, RequestHead, Reset, ResponseHead, Window, decode,
    encode,
)

PROPERTY = settings(deadline=None, max_examples=200)


# -- spec-level builders ----------------------------------------------------------------------

def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def str8(b: bytes) -> bytes:
    return u8(len(b)) + b


def str16(b: bytes) -> bytes:
    return u16(len(b)) + b


def header(kind: int, stream: int) -> bytes:
    return u8(kind) + u32(stream)


def headers_bytes(headers) -> bytes:
    return u16(len(headers)) + b"".join(str16(n) + str16(v) for n, v in headers)


def request_head_bytes(stream=1, flags=0, method=b"GET", target=b"/", client=b"", scheme=b"http",
                       host=b"", prefix=b"", correlation=b"", headers=()) -> bytes:
    return (header(0x01, stream) + u8(flags) + str8(method) + str16(target) + str8(client)
            + str8(scheme) + str16(host) + str16(prefix) + str8(correlation)
            + headers_bytes(headers))


def response_head_bytes(stream=1, flags=0, status=200, reason=b"OK", headers=()) -> bytes:
    return header(0x02, stream) + u8(flags) + u16(status) + str8(reason) + headers_bytes(headers)


CORRELATION = b"0123456789abcdef0123456789abcdef"

FULL_REQUEST = RequestHead(
    stream=7, method=b"POST", target=b"/api/items?x=1&y=%2F", client=b"203.0.113.9",
    scheme=b"https", host=b"relay.example:8443", prefix=b"/abc", correlation=CORRELATION,
    headers=(
        (b"Content-Type", b"application/json"),
        (b"X-Dup", b"first"),
        (b"Accept", b"*/*"),
        (b"X-Dup", b"second"),
        (b"X-Raw", b"caf\xc3\xa9 \xff\x00\x80"),
        (b"x-dup", b"third"),
    ),
)

# One or more valid frames of every type.  Data is kept apart where a test cannot apply
# to it (a prefix of a DATA frame is a shorter DATA frame).
SAMPLES = [
    RequestHead(stream=1, method=b"GET", target=b"/"),
    RequestHead(stream=2, method=b"GET", target=b"/", end=True),
    RequestHead(stream=3, method=b"GET", target=b"/ws", upgrade=True),
    RequestHead(stream=4, method=b"GET", target=b"/ws", end=True, upgrade=True),
    FULL_REQUEST,
    ResponseHead(stream=1, status=200),
    ResponseHead(stream=9, status=404, reason=b"Not Found", end=True),
    ResponseHead(stream=2**32 - 1, status=101, reason=b"Switching Protocols",
                 headers=((b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"))),
    ResponseHead(stream=5, status=200, reason=b"OK", headers=(
        (b"Set-Cookie", b"a=1"), (b"Content-Length", b"5"), (b"Set-Cookie", b"b=\xe2\x82\xac"))),
    Data(stream=1, data=b"x"),
    Data(stream=3, data=bytes(range(256)) * 3),
    Data(stream=4, data=b"\x00" * MAX_DATA),
    End(stream=1),
    End(stream=0),
    Window(stream=1, increment=1),
    Window(stream=2, increment=262_144),
    Window(stream=3, increment=2**31 - 1),
    Reset(stream=1, code=502),
    Reset(stream=6, code=499, reason=b"caller went away \xe2\x9c\x97"),
    GoAway(),
    GoAway(reason=b"relay shutting down"),
]
NON_DATA = [f for f in SAMPLES if not isinstance(f, Data)]


class RoundTripTests(unittest.TestCase):

    def test_every_sample_round_trips(self):
        for frame in SAMPLES:
            self.assertEqual(decode(encode(frame)), frame, frame)

    def test_all_frame_types_covered(self):
        kinds = {type(f) for f in SAMPLES}
        self.assertEqual(
            kinds, {RequestHead, ResponseHead, Data, End, Window, Reset, GoAway})

    def test_request_head_matches_spec_layout(self):
        wire = request_head_bytes(
            stream=7, flags=0, method=b"POST", target=b"/api/items?x=1&y=%2F",
            client=b"203.0.113.9", scheme=b"https", host=b"relay.example:8443", prefix=b"/abc",
            correlation=CORRELATION, headers=FULL_REQUEST.headers)
        self.assertEqual(encode(FULL_REQUEST), wire)
        self.assertEqual(decode(wire), FULL_REQUEST)

    def test_request_head_flags(self):
        for end, upgrade, flags in [(False, False, 0), (True, False, 1), (False, True, 2),
                                    (True, True, 3)]:
            frame = RequestHead(stream=1, method=b"GET", target=b"/", end=end, upgrade=upgrade)
            wire = encode(frame)
            self.assertEqual(wire[5], flags)
            self.assertEqual(wire, request_head_bytes(flags=flags))
            got = decode(wire)
            self.assertIs(got.end, end)
            self.assertIs(got.upgrade, upgrade)

    def test_request_head_duplicate_headers_kept_in_order(self):
        got = decode(encode(FULL_REQUEST))
        self.assertEqual(
            [v for n, v in got.headers if n.lower() == b"x-dup"], [b"first", b"second", b"third"])
        self.assertEqual(got.headers, FULL_REQUEST.headers)
        # header names keep their case
        self.assertEqual(got.headers[0][0], b"Content-Type")
        self.assertEqual(got.headers[5][0], b"x-dup")

    def test_request_head_raw_bytes(self):
        frame = RequestHead(
            stream=1, method=b"PROPFIND", target=b"/caf\xc3\xa9/%ZZ?q=\xff",
            host=b"h\xc3\xb6st", prefix=b"/\x80",
            headers=((b"X-Bin", b"\x00\x01\xfe\xff"), (b"X-Latin", b"caf\xe9")))
        got = decode(encode(frame))
        self.assertEqual(got, frame)
        self.assertEqual(got.headers[1][1], b"caf\xe9")
        self.assertEqual(got.target, b"/caf\xc3\xa9/%ZZ?q=\xff")

    def test_response_head_matches_spec_layout(self):
        frame = ResponseHead(stream=5, status=201, reason=b"Created", end=True,
                             headers=((b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")))
        wire = response_head_bytes(stream=5, flags=1, status=201, reason=b"Created",
                                   headers=frame.headers)
        self.assertEqual(encode(frame), wire)
        self.assertEqual(decode(wire), frame)
        self.assertIs(decode(response_head_bytes()).end, False)

    def test_response_head_status_bounds(self):
        for status in (100, 101, 200, 599):
            frame = ResponseHead(stream=1, status=status)
            self.assertEqual(decode(encode(frame)).status, status)

    def test_data_matches_spec_layout(self):
        self.assertEqual(encode(Data(3, b"hello")), b"\x03\x00\x00\x00\x03hello")
        self.assertEqual(decode(b"\x03\x00\x00\x00\x03hello"), Data(3, b"hello"))

    def test_data_max_size(self):
        frame = Data(1, bytes(range(256)) * (MAX_DATA // 256))
        self.assertEqual(len(frame.data), MAX_DATA)
        self.assertEqual(decode(encode(frame)), frame)

    def test_end_matches_spec_layout(self):
        self.assertEqual(encode(End(258)), b"\x04\x00\x00\x01\x02")
        self.assertEqual(decode(b"\x04\x00\x00\x01\x02"), End(258))

    def test_window_matches_spec_layout(self):
        wire = header(0x05, 9) + u32(1000)
        self.assertEqual(encode(Window(9, 1000)), wire)
        self.assertEqual(decode(wire), Window(9, 1000))

    def test_reset_matches_spec_layout(self):
        wire = header(0x06, 4) + u16(504) + str16(b"timeout")
        self.assertEqual(encode(Reset(4, 504, b"timeout")), wire)
        self.assertEqual(decode(wire), Reset(4, 504, b"timeout"))

    def test_goaway_matches_spec_layout(self):
        wire = header(0x07, 0) + str16(b"bye")
        self.assertEqual(encode(GoAway(b"bye")), wire)
        self.assertEqual(decode(wire), GoAway(b"bye"))
        self.assertEqual(decode(wire).stream, 0)

    def test_frame_of_exactly_max_frame_size(self):
        base = ResponseHead(stream=1, status=200, headers=tuple(
            (b"x-%d" % i, b"v" * 65_000) for i in range(4)))
        room = MAX_FRAME_SIZE - len(encode(base)) - (2 + 3 + 2)
        frame = attrs.evolve(base, headers=base.headers + ((b"x-z", b"w" * room),))
        wire = encode(frame)
        self.assertEqual(len(wire), MAX_FRAME_SIZE)
        self.assertEqual(decode(wire), frame)
        # one byte more is refused both ways
        bigger = attrs.evolve(base, headers=base.headers + ((b"x-z", b"w" * (room + 1)),))
        self.assertRaises(FrameError, encode, bigger)
        wire = response_head_bytes(status=200, reason=b"", headers=bigger.headers)
        self.assertEqual(len(wire), MAX_FRAME_SIZE + 1)
        self.assertRaises(FrameError, decode, wire)

    def test_encode_rejects_non_frames(self):
        self.assertRaises(TypeError, encode, b"\x04\x00\x00\x00\x01")


class DecodeRejectionTests(unittest.TestCase):

    def assertRefused(self, message: bytes) -> FrameError:
        return self.assertRaises(FrameError, decode, message)

    def test_every_prefix_of_non_data_frames_is_refused(self):
        for frame in NON_DATA:
            wire = encode(frame)
            for n in range(len(wire)):
                try:
                    decode(wire[:n])
                except FrameError:
                    pass
                except Exception as e:  # pragma: no cover - the failure being tested
                    self.fail(f"prefix {n} of {frame!r}: {type(e).__name__}: {e}")
                else:
                    self.fail(f"prefix {n} of {frame!r} decoded")

    def test_prefixes_of_data_frames(self):
        wire = encode(Data(5, b"abcdef"))
        for n in range(6):  # header only, or less: no payload
            self.assertRefused(wire[:n])
        for n in range(6, len(wire)):
            self.assertEqual(decode(wire[:n]), Data(5, b"abcdef"[:n - 5]))

    def test_truncated_length_fields(self):
        # A str16 announcing more bytes than the frame holds.
        self.assertRefused(header(0x07, 0) + u16(10) + b"short")
        self.assertRefused(header(0x06, 1) + u16(502) + u16(1))
        self.assertRefused(response_head_bytes()[:-2] + u16(3) + str16(b"a") + str16(b"b"))
        self.assertRefused(request_head_bytes()[:-2] + u16(1) + str16(b"name") + u16(100) + b"v")

    def test_trailing_bytes(self):
        for frame in NON_DATA:
            for extra in (b"\x00", b"junk"):
                try:
                    decode(encode(frame) + extra)
                except FrameError:
                    pass
                else:
                    self.fail(f"{frame!r} with {extra!r} appended decoded")

    def test_unknown_type(self):
        for kind in (0x00, 0x08, 0x10, 0x7F, 0x80, 0xFF):
            error = self.assertRefused(header(kind, 1) + b"\x00\x00\x00\x01")
            self.assertIn("type", str(error))
            self.assertRefused(header(kind, 0))

    def test_unknown_request_head_flags(self):
        for flags in (0x04, 0x08, 0x80, 0xFF, 0x07):
            self.assertRefused(request_head_bytes(flags=flags))

    def test_unknown_response_head_flags(self):
        for flags in (0x02, 0x04, 0x80, 0xFF, 0x03):
            self.assertRefused(response_head_bytes(flags=flags))

    def test_window_zero(self):
        self.assertRefused(header(0x05, 1) + u32(0))

    def test_window_over_max(self):
        self.assertRefused(header(0x05, 1) + u32(2**31))
        self.assertRefused(header(0x05, 1) + u32(2**32 - 1))

    def test_data_empty(self):
        self.assertRefused(header(0x03, 1))

    def test_data_over_max(self):
        self.assertRefused(header(0x03, 1) + b"x" * (MAX_DATA + 1))

    def test_frame_over_max_frame_size(self):
        self.assertRefused(header(0x03, 1) + b"x" * MAX_FRAME_SIZE)
        self.assertRefused(header(0x04, 1) + b"\x00" * MAX_FRAME_SIZE)
        headers = [(b"x-%d" % i, b"v" * 60_000) for i in range(5)]
        wire = response_head_bytes(headers=headers)
        self.assertGreater(len(wire), MAX_FRAME_SIZE)
        self.assertRefused(wire)

    def test_goaway_on_stream(self):
        for stream in (1, 2**32 - 1):
            self.assertRefused(header(0x07, stream) + str16(b"bye"))

    def test_bad_status(self):
        for status in (0, 99, 600, 999, 65535):
            self.assertRefused(response_head_bytes(status=status))

    def test_request_head_target_must_start_with_slash(self):
        for target in (b"", b"x", b"*", b"http://h/x", b"?q=1", b"\\x"):
            self.assertRefused(request_head_bytes(target=target))
        self.assertEqual(decode(request_head_bytes(target=b"/")).target, b"/")

    def test_request_head_empty_method(self):
        self.assertRefused(request_head_bytes(method=b""))

    def test_frame_error_is_value_error(self):
        self.assertTrue(issubclass(FrameError, ValueError))


class EncodeRejectionTests(unittest.TestCase):

    def test_request_head_oversize_fields(self):
        ok = dict(stream=1, method=b"GET", target=b"/")
        for field, limit in [("method", 255), ("client", 255), ("scheme", 255),
                             ("correlation", 255), ("target", 65535), ("host", 65535),
                             ("prefix", 65535)]:
            value = b"/" + b"a" * (limit - 1)
            frame = RequestHead(**{**ok, field: value})
            self.assertEqual(decode(encode(frame)), frame, field)  # the limit itself is fine
            too_long = RequestHead(**{**ok, field: value + b"a"})
            self.assertRaises(FrameError, encode, too_long)

    def test_header_name_and_value_oversize(self):
        for headers in [((b"n" * 65536, b"v"),), ((b"n", b"v" * 65536),)]:
            self.assertRaises(
                FrameError, encode, RequestHead(1, b"GET", b"/", headers=headers))
            self.assertRaises(FrameError, encode, ResponseHead(1, 200, headers=headers))

    def test_too_many_headers(self):
        headers = ((b"", b""),) * 65536
        self.assertRaises(FrameError, encode, ResponseHead(1, 200, headers=headers))
        self.assertRaises(FrameError, encode, RequestHead(1, b"GET", b"/", headers=headers))

    def test_request_head_over_max_frame_size(self):
        headers = tuple((b"x-%d" % i, b"v" * 60_000) for i in range(5))
        self.assertRaises(FrameError, encode, RequestHead(1, b"GET", b"/", headers=headers))

    def test_response_reason_oversize(self):
        self.assertRaises(FrameError, encode, ResponseHead(1, 200, reason=b"r" * 256))
        self.assertEqual(len(decode(encode(ResponseHead(1, 200, reason=b"r" * 255))).reason), 255)

    def test_response_bad_status(self):
        for status in (0, 99, 600, 65535):
            self.assertRaises(FrameError, encode, ResponseHead(1, status))

    def test_reset_and_goaway_reason_oversize(self):
        self.assertRaises(FrameError, encode, Reset(1, 502, b"r" * 65536))
        self.assertRaises(FrameError, encode, GoAway(b"r" * 65536))
        self.assertEqual(decode(encode(GoAway(b"r" * 65535))).reason, b"r" * 65535)

    def test_data_bounds(self):
        self.assertRaises(FrameError, encode, Data(1, b""))
        self.assertRaises(FrameError, encode, Data(1, b"x" * (MAX_DATA + 1)))

    def test_window_bounds(self):
        for increment in (0, -1, 2**31):
            self.assertRaises(FrameError, encode, Window(1, increment))


# -- properties -------------------------------------------------------------------------------

streams = st.integers(min_value=0, max_value=2**32 - 1)
small = st.binary(max_size=40)
header_lists = st.lists(st.tuples(small, small), max_size=8).map(tuple)

request_heads = st.builds(
    RequestHead, stream=streams, method=st.binary(min_size=1, max_size=255),
    target=st.binary(max_size=200).map(lambda b: b"/" + b), client=st.binary(max_size=255),
    scheme=st.binary(max_size=10), host=small, prefix=small,
    correlation=st.binary(max_size=255), headers=header_lists, end=st.booleans(),
    upgrade=st.booleans())
response_heads = st.builds(
    ResponseHead, stream=streams, status=st.integers(100, 599), reason=st.binary(max_size=255),
    headers=header_lists, end=st.booleans())
valid_frames = st.one_of(
    request_heads,
    response_heads,
    st.builds(Data, stream=streams, data=st.binary(min_size=1, max_size=2000)),
    st.builds(End, stream=streams),
    st.builds(Window, stream=streams, increment=st.integers(1, 2**31 - 1)),
    st.builds(Reset, stream=streams, code=st.integers(0, 65535), reason=small),
    st.builds(GoAway, reason=st.binary(max_size=300)),
)


def decode_or_frame_error(testcase, message: bytes) -> None:
    try:
        frame = decode(message)
    except FrameError:
        return
    except Exception as e:  # pragma: no cover - the failure being tested
        testcase.fail(f"decode({message!r}) raised {type(e).__name__}: {e}")
    # Whatever decodes must be a frame that encodes back to the same bytes.
    testcase.assertEqual(encode(frame), message)


class PropertyTests(unittest.TestCase):

    @PROPERTY
    @given(valid_frames)
    def test_round_trip(self, frame):
        wire = encode(frame)
        self.assertLessEqual(len(wire), MAX_FRAME_SIZE)
        self.assertEqual(decode(wire), frame)

    @PROPERTY
    @given(st.binary(max_size=600))
    def test_arbitrary_bytes(self, message):
        decode_or_frame_error(self, message)

    @PROPERTY
    @given(st.integers(0, 9), streams, st.binary(max_size=300))
    def test_arbitrary_payload_of_each_type(self, kind, stream, payload):
        decode_or_frame_error(self, header(kind, stream) + payload)

    @PROPERTY
    @given(valid_frames, st.data())
    def test_mutated_frames(self, frame, data):
        wire = bytearray(encode(frame))
        for _ in range(data.draw(st.integers(1, 4))):
            op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            pos = data.draw(st.integers(0, len(wire)))
            if op == "flip" and pos < len(wire):
                wire[pos] = data.draw(st.integers(0, 255))
            elif op == "cut":
                del wire[pos:pos + data.draw(st.integers(1, 4))]
            else:
                wire[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        decode_or_frame_error(self, bytes(wire))
