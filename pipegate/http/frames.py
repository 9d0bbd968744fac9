"""
Sans-IO frame codec for the HTTP plane (`pipegate.v1`).

One WebSocket message carries one frame; see docs/protocol.md section 1.  Nothing here
touches a transport or a reactor: frames are built from and parsed into attrs objects.
"""

from __future__ import annotations

import struct

import attrs

from pipegate.core.codec import FrameError, Reader, check_done, too_long
from pipegate.core.codec import str16 as _str16
from pipegate.core.window import MAX_DATA, checked_increment

SUBPROTOCOL = "pipegate.v1"
PROTOCOL_ERROR = 4002  # WebSocket close code for a pipegate.v1 protocol error
MAX_FRAME_SIZE = 262_144
MAX_WINDOW = 4_194_304        # default credit a stream's window may grow to (--max-window)
WINDOW_BUDGET = 8_388_608     # default growth shared by all streams of a service (--window-budget)

REQUEST_HEAD = 0x01
RESPONSE_HEAD = 0x02
DATA = 0x03
END = 0x04
WINDOW = 0x05
RESET = 0x06
GOAWAY = 0x07

FLAG_END = 0x01
FLAG_UPGRADE = 0x02

_HEADER = struct.Struct(">BI")


Headers = tuple[tuple[bytes, bytes], ...]


@attrs.frozen
class RequestHead:
    stream: int
    method: bytes
    target: bytes
    client: bytes = b""
    scheme: bytes = b"http"
    host: bytes = b""
    prefix: bytes = b""
    correlation: bytes = b""
    headers: Headers = ()
    end: bool = False
    upgrade: bool = False


@attrs.frozen
class ResponseHead:
    stream: int
    status: int
    reason: bytes = b""
    headers: Headers = ()
    end: bool = False


@attrs.frozen
class Data:
    stream: int
    data: bytes


@attrs.frozen
class End:
    stream: int


@attrs.frozen
class Window:
    stream: int
    increment: int


@attrs.frozen
class Reset:
    stream: int
    code: int
    reason: bytes = b""


@attrs.frozen
class GoAway:
    reason: bytes = b""
    stream: int = 0


Frame = RequestHead | ResponseHead | Data | End | Window | Reset | GoAway


_U16 = struct.Struct(">H")


def _headers(headers: Headers) -> bytes:
    if len(headers) > 0xFFFF:
        raise FrameError("too many headers")
    # str16 of each name and value, inlined (a head is encoded for every request).
    pack = _U16.pack
    parts = [pack(len(headers))]
    for name, value in headers:
        for field in (name, value):
            if len(field) > 0xFFFF:
                raise too_long(field, 0xFFFF)
            parts += (pack(len(field)), field)
    return b"".join(parts)


_REQUEST_START = struct.Struct(">BIBB")  # frame header, flags, the method's length


def _first_too_long(*fields: bytes) -> None:
    """Raise the error for the first of a REQUEST_HEAD's fields (str8, str16, ...) that is too long."""
    for value, limit in zip(fields, (0xFF, 0xFFFF, 0xFF, 0xFF, 0xFFFF, 0xFFFF, 0xFF)):
        if len(value) > limit:
            raise too_long(value, limit)


def encode(frame: Frame) -> bytes:
    """
    Serialise one frame.  Raises L{FrameError} when it would exceed a bound or be
    refused by L{decode}, so a caller learns before sending that e.g. a response head
    is too large.
    """
    try:  # (no inner function: a call per frame)
        match frame:
            case Data(stream, data):
                if not 0 < len(data) <= MAX_DATA:
                    raise FrameError(f"DATA payload of {len(data)} bytes")
                return _HEADER.pack(DATA, stream) + data
            case Window(stream, increment):
                return _HEADER.pack(WINDOW, stream) + struct.pack(">I", checked_increment(increment))
            case End(stream):
                return _HEADER.pack(END, stream)
            case Reset(stream, code, reason):
                return _HEADER.pack(RESET, stream) + struct.pack(">H", code) + _str16(reason)
            case GoAway(reason, stream):
                if stream != 0:
                    raise FrameError("GOAWAY on a stream")
                return _HEADER.pack(GOAWAY, stream) + _str16(reason)
            case RequestHead():
                if not frame.method or not frame.target.startswith(b"/"):
                    raise FrameError("REQUEST_HEAD without method or absolute target")
                flags = (FLAG_END if frame.end else 0) | (FLAG_UPGRADE if frame.upgrade else 0)
                method, target, client, scheme = frame.method, frame.target, frame.client, frame.scheme
                host, prefix, correlation = frame.host, frame.prefix, frame.correlation
                if (len(method) > 0xFF or len(target) > 0xFFFF or len(client) > 0xFF or len(scheme) > 0xFF
                        or len(host) > 0xFFFF or len(prefix) > 0xFFFF or len(correlation) > 0xFF):
                    _first_too_long(method, target, client, scheme, host, prefix, correlation)
                u16 = _U16.pack
                # (str8 and str16 of each field inlined: a head is encoded for every request)
                out = b"".join((
                    _REQUEST_START.pack(REQUEST_HEAD, frame.stream, flags, len(method)), method,
                    u16(len(target)), target, bytes((len(client),)), client, bytes((len(scheme),)), scheme,
                    u16(len(host)), host, u16(len(prefix)), prefix, bytes((len(correlation),)), correlation,
                    _headers(frame.headers),
                ))
            case ResponseHead():
                if not 100 <= frame.status <= 599:
                    raise FrameError(f"status {frame.status}")
                reason = frame.reason
                if len(reason) > 0xFF:
                    raise too_long(reason, 0xFF)
                out = b"".join((
                    _HEADER.pack(RESPONSE_HEAD, frame.stream),
                    bytes((FLAG_END if frame.end else 0, frame.status >> 8, frame.status & 0xFF, len(reason))),
                    reason, _headers(frame.headers),
                ))
            case _:
                raise TypeError(f"not a frame: {frame!r}")
        if len(out) > MAX_FRAME_SIZE:
            raise FrameError(f"frame of {len(out)} bytes exceeds {MAX_FRAME_SIZE}")
        return out
    except struct.error as e:
        raise FrameError(f"field out of range: {e}") from None


def _strings(data: bytes, pos: int, widths: tuple[int, ...]) -> tuple[list[bytes], int]:
    """
    The str8 (width 1) and str16 (width 2) fields at C{data[pos:]}, read in one loop (a
    head is decoded for every request), and where they end; each length is checked
    against the message before anything is sliced, as L{Reader} does.
    """
    end = len(data)
    out = []
    for width in widths:
        start = pos + width
        if start > end:
            raise FrameError("truncated frame")
        stop = start + (data[pos] if width == 1 else data[pos] << 8 | data[pos + 1])
        if stop > end:
            raise FrameError("truncated frame")
        out.append(data[start:stop])
        pos = stop
    return out, pos


def _headers_at(data: bytes, pos: int) -> tuple[Headers, int]:
    """A header list (u16 count, then str16 name and value pairs) at C{data[pos:]}, and where it ends."""
    end = len(data)
    if pos + 2 > end:
        raise FrameError("truncated frame")
    count = data[pos] << 8 | data[pos + 1]
    pos += 2
    unpack = _U16.unpack_from
    out = []
    for _ in range(count):
        if pos + 2 > end:
            raise FrameError("truncated frame")
        stop = pos + 2 + unpack(data, pos)[0]
        if stop + 2 > end:
            raise FrameError("truncated frame")
        name = data[pos + 2:stop]
        pos = stop + 2 + unpack(data, stop)[0]
        if pos > end:
            raise FrameError("truncated frame")
        out.append((name, data[stop + 2:pos]))
    return tuple(out), pos


_REQUEST_FIELDS = (1, 2, 1, 1, 2, 2, 1)  # method, target, client, scheme, host, prefix, correlation


def decode(message: bytes) -> Frame:
    """
    Parse one WebSocket message into a frame, or raise L{FrameError}.  Every length is
    checked against the message before anything is sliced out of it.
    """
    if len(message) > MAX_FRAME_SIZE:
        raise FrameError(f"frame of {len(message)} bytes exceeds {MAX_FRAME_SIZE}")
    if len(message) < _HEADER.size:
        raise FrameError("truncated frame header")
    kind, stream = _HEADER.unpack_from(message)
    frame: Frame
    if kind == DATA:
        size = len(message) - _HEADER.size
        if not 0 < size <= MAX_DATA:
            raise FrameError(f"DATA payload of {size} bytes")
        return Data(stream, message[_HEADER.size:])
    elif kind == END:
        check_done(message, _HEADER.size)
        return End(stream)
    elif kind == REQUEST_HEAD:
        flags = _flags(message)
        if flags & ~(FLAG_END | FLAG_UPGRADE):
            raise FrameError(f"unknown REQUEST_HEAD flags {flags:#x}")
        (method, target, client, scheme, host, prefix, correlation), pos = _strings(
            message, _HEADER.size + 1, _REQUEST_FIELDS)
        headers, pos = _headers_at(message, pos)
        frame = RequestHead(
            stream=stream, method=method, target=target, client=client,
            scheme=scheme, host=host, prefix=prefix, correlation=correlation,
            headers=headers, end=bool(flags & FLAG_END), upgrade=bool(flags & FLAG_UPGRADE),
        )
        if not frame.method or not frame.target.startswith(b"/"):
            raise FrameError("REQUEST_HEAD without method or absolute target")
        check_done(message, pos)
        return frame
    elif kind == RESPONSE_HEAD:
        flags = _flags(message)
        if flags & ~FLAG_END:
            raise FrameError(f"unknown RESPONSE_HEAD flags {flags:#x}")
        if len(message) < _HEADER.size + 3:
            raise FrameError("truncated frame")
        status = message[_HEADER.size + 1] << 8 | message[_HEADER.size + 2]
        if not 100 <= status <= 599:
            raise FrameError(f"status {status}")
        (reason,), pos = _strings(message, _HEADER.size + 3, (1,))
        headers, pos = _headers_at(message, pos)
        check_done(message, pos)
        return ResponseHead(stream, status, reason, headers, bool(flags & FLAG_END))
    r = Reader(message, _HEADER.size)
    if kind == WINDOW:
        frame = Window(stream, checked_increment(r.u32()))
    elif kind == RESET:
        frame = Reset(stream, r.u16(), r.str16())
    elif kind == GOAWAY:
        if stream != 0:
            raise FrameError("GOAWAY on a stream")
        frame = GoAway(r.str16())
    else:
        raise FrameError(f"unknown frame type {kind:#x}")
    r.done()
    return frame


def _flags(message: bytes) -> int:
    """A head's flags byte, right after the frame header."""
    if len(message) <= _HEADER.size:
        raise FrameError("truncated frame")
    return message[_HEADER.size]
