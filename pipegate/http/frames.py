"""
Sans-IO frame codec for the HTTP plane (`pipegate.v1`).

One WebSocket message carries one frame; see docs/protocol.md section 1.  Nothing here
touches a transport or a reactor: frames are built from and parsed into attrs objects.
"""

from __future__ import annotations

import struct

import attrs

from pipegate.core.codec import FrameError, Reader
from pipegate.core.codec import str8 as _str8, str16 as _str16
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
    return struct.pack(">H", len(headers)) + b"".join(
        _str16(name) + _str16(value) for name, value in headers
    )


def encode(frame: Frame) -> bytes:
    """
    Serialise one frame.  Raises L{FrameError} when it would exceed a bound or be
    refused by L{decode}, so a caller learns before sending that e.g. a response head
    is too large.
    """
    try:
        return _encode(frame)
    except struct.error as e:
        raise FrameError(f"field out of range: {e}") from None


def _encode(frame: Frame) -> bytes:
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
            out = b"".join((
                _HEADER.pack(REQUEST_HEAD, frame.stream), bytes((flags,)),
                _str8(frame.method), _str16(frame.target), _str8(frame.client),
                _str8(frame.scheme), _str16(frame.host), _str16(frame.prefix),
                _str8(frame.correlation), _headers(frame.headers),
            ))
        case ResponseHead():
            if not 100 <= frame.status <= 599:
                raise FrameError(f"status {frame.status}")
            out = b"".join((
                _HEADER.pack(RESPONSE_HEAD, frame.stream),
                bytes((FLAG_END if frame.end else 0,)),
                struct.pack(">H", frame.status), _str8(frame.reason), _headers(frame.headers),
            ))
        case _:
            raise TypeError(f"not a frame: {frame!r}")
    if len(out) > MAX_FRAME_SIZE:
        raise FrameError(f"frame of {len(out)} bytes exceeds {MAX_FRAME_SIZE}")
    return out


class _Reader(Reader):
    """The codec reader plus header lists."""

    def headers(self) -> Headers:
        # The loop of str16 reads inlined (a head is decoded for every request): the
        # same bounds, each length checked against the message before slicing.
        count = self.u16()
        data, pos, end = self._data, self._pos, len(self._data)
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
        self._pos = pos
        return tuple(out)


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
    r = _Reader(message, _HEADER.size)
    frame: Frame
    if kind == DATA:
        size = len(message) - _HEADER.size
        if not 0 < size <= MAX_DATA:
            raise FrameError(f"DATA payload of {size} bytes")
        return Data(stream, message[_HEADER.size:])
    elif kind == WINDOW:
        frame = Window(stream, checked_increment(r.u32()))
    elif kind == END:
        frame = End(stream)
    elif kind == RESET:
        frame = Reset(stream, r.u16(), r.str16())
    elif kind == GOAWAY:
        if stream != 0:
            raise FrameError("GOAWAY on a stream")
        frame = GoAway(r.str16())
    elif kind == REQUEST_HEAD:
        flags = r.u8()
        if flags & ~(FLAG_END | FLAG_UPGRADE):
            raise FrameError(f"unknown REQUEST_HEAD flags {flags:#x}")
        frame = RequestHead(
            stream=stream, method=r.str8(), target=r.str16(), client=r.str8(),
            scheme=r.str8(), host=r.str16(), prefix=r.str16(), correlation=r.str8(),
            headers=r.headers(), end=bool(flags & FLAG_END), upgrade=bool(flags & FLAG_UPGRADE),
        )
        if not frame.method or not frame.target.startswith(b"/"):
            raise FrameError("REQUEST_HEAD without method or absolute target")
    elif kind == RESPONSE_HEAD:
        flags = r.u8()
        if flags & ~FLAG_END:
            raise FrameError(f"unknown RESPONSE_HEAD flags {flags:#x}")
        status = r.u16()
        if not 100 <= status <= 599:
            raise FrameError(f"status {status}")
        frame = ResponseHead(stream, status, r.str8(), r.headers(), bool(flags & FLAG_END))
    else:
        raise FrameError(f"unknown frame type {kind:#x}")
    r.done()
    return frame
