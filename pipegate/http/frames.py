"""
Sans-IO codec and flow-control accounting for the HTTP plane (`pipegate.v1`).

One WebSocket message carries one frame; see docs/protocol.md section 1.  Nothing here
touches a transport or a reactor: frames are built from and parsed into attrs objects.
"""

from __future__ import annotations

import struct

import attrs

from pipegate.codec import FrameError, Reader
from pipegate.codec import str8 as _str8, str16 as _str16

SUBPROTOCOL = "pipegate.v1"
MAX_FRAME_SIZE = 262_144
MAX_DATA = 65_536
INITIAL_WINDOW = 262_144
MAX_WINDOW = 4_194_304        # default credit a stream's window may grow to (--max-window)
WINDOW_BUDGET = 8_388_608     # default growth shared by all streams of a service (--window-budget)
# A next hop (socket) that pushed back this long (seconds) is not keeping up: the window shrinks.
SLOW_CONSUMER = 0.1
MAX_WINDOW_INCREMENT = 2**31 - 1

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
            if not 0 < increment <= MAX_WINDOW_INCREMENT:
                raise FrameError(f"WINDOW increment {increment}")
            return _HEADER.pack(WINDOW, stream) + struct.pack(">I", increment)
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
        count = self.u16()
        return tuple((self.str16(), self.str16()) for _ in range(count))


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
        increment = r.u32()
        if not 0 < increment <= MAX_WINDOW_INCREMENT:
            raise FrameError(f"WINDOW increment {increment}")
        frame = Window(stream, increment)
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


@attrs.define
class SendWindow:
    """
    The sending half of one stream direction: splits bytes into DATA payloads no larger
    than L{MAX_DATA} and no more than the credit the peer granted; what does not fit
    waits in a queue until L{credit} is called.  The owner pauses its producer while
    L{blocked} is true, so the queue holds at most one read's worth.
    """

    window: int = INITIAL_WINDOW
    # A list, not a deque: it is empty nearly always and never longer than one read's
    # chunks, and an empty deque costs 760 bytes with its first 64-slot block, an empty
    # list 56: 7 MiB less at the gateway and at the provider for 10,000 idle connections.
    _queue: list[bytes | memoryview] = attrs.field(factory=list)
    queued: int = 0

    @property
    def blocked(self) -> bool:
        return self.queued > 0 or self.window <= 0

    def write(self, data: bytes) -> list[bytes | memoryview]:
        size = len(data)
        if not self._queue and 0 < size <= self.window and size <= MAX_DATA:
            # What _drain would do with an empty queue and enough credit: the common case
            # of a small message (a request or a reply) on a stream that keeps up.
            self.window -= size
            return [data]
        if data:
            self._queue.append(data)
            self.queued += len(data)
        return self._drain()

    def credit(self, increment: int) -> list[bytes | memoryview]:
        self.window += increment
        return self._drain()

    def _drain(self) -> list[bytes | memoryview]:
        # Split without copying: a payload cut from a larger read is a memoryview of it
        # (each is copied once, into the frame that carries it).  Sent chunks leave the
        # queue in one del at the end, so a drain is linear in the chunks it sends.
        out = []
        queue = self._queue
        sent = 0
        while sent < len(queue) and self.window > 0:
            head = queue[sent]
            n = min(len(head), self.window, MAX_DATA)
            if n == len(head):
                out.append(head)
                sent += 1
            else:
                view = memoryview(head)
                out.append(view[:n])
                queue[sent] = view[n:]
            self.window -= n
            self.queued -= n
        if sent:
            del queue[:sent]
        return out


@attrs.define
class GrowthBudget:
    """
    Credit that windows may grow by, shared by every window of a service: bounds what
    all grown windows together can make it buffer.  L{take} hands out what is left.
    """

    limit: int
    used: int = 0

    def take(self, size: int) -> int:
        size = max(0, min(size, self.limit - self.used))
        self.used += size
        return size

    def give(self, size: int) -> None:
        self.used -= size


@attrs.define
class ReceiveWindow:
    """
    The receiving half of one stream direction.  C{available} is the credit the peer
    still holds: it shrinks as DATA arrives and grows only when credit is granted back,
    so a peer that ignores backpressure is caught by L{received}.

    With C{max_window} above the initial credit the window grows: each time a whole
    window has been handed on with the next hop keeping up, it doubles (up to
    C{max_window}) and the extra credit goes out with the next grant.  L{shrink} (the
    next hop is not keeping up) returns it to the initial credit by withholding grants, so a
    fast stream gets a window that covers the time credit takes to come back, and a slow
    one goes back to the initial credit once its next hop holds more than that.  The
    peer needs no notice: it only ever sees more or less credit.  With a C{budget}
    (L{GrowthBudget}), growth beyond the initial credit is taken from it and given
    back by L{shrink} and L{release}.
    """

    available: int = INITIAL_WINDOW
    buffered: int = 0    # received, not yet handed on
    ungranted: int = 0   # handed on, credit not yet returned to the peer (< 0: withheld after a shrink)
    max_window: int = 0  # 0 (or at most the initial credit): a fixed window
    budget: GrowthBudget | None = None
    window: int = attrs.field(init=False)  # available + buffered + ungranted: what the peer may have in flight
    initial: int = attrs.field(init=False)  # the credit the peer starts with
    _run: int = attrs.field(init=False, default=0)  # handed on since the window last changed

    def __attrs_post_init__(self) -> None:
        self.window = self.initial = self.available + self.buffered + self.ungranted

    def received(self, size: int) -> None:
        if size > self.available:
            raise FrameError(f"peer sent {size} bytes with {self.available} of credit")
        self.available -= size
        self.buffered += size

    def consumed(self, size: int) -> None:
        """Record C{size} bytes handed on to the next hop."""
        self.buffered -= size
        # Bytes that pay back credit withheld after a shrink do not count toward growth.
        self._run += max(0, self.ungranted + size) - max(0, self.ungranted)
        self.ungranted += size

    def passed_on(self, size: int) -> None:
        """L{received} and L{consumed} at once: C{size} bytes arrived and were handed on."""
        if size > self.available:
            raise FrameError(f"peer sent {size} bytes with {self.available} of credit")
        self.available -= size
        ungranted = self.ungranted
        if ungranted >= 0:
            self._run += size
        else:
            self._run += max(0, ungranted + size)
        self.ungranted = ungranted + size

    def grant(self, at_least: int = 0) -> int:
        """
        Return the credit to send in a WINDOW frame now (0 = nothing to send).  With
        C{at_least}, credit is held back until that much is due, so that a receiver
        can return credit in a few large WINDOW frames instead of one per DATA frame.
        """
        if self._run >= self.window and self.window < self.max_window:
            extra = min(self.window, self.max_window - self.window)
            if self.budget is not None:
                extra = self.budget.take(extra)
            self.window += extra
            self.ungranted += extra
            self._run = 0
        if self.ungranted <= 0 or self.ungranted < at_least:
            return 0
        credit, self.ungranted = self.ungranted, 0
        self.available += credit
        return credit

    def shrink(self) -> None:
        """The next hop is not keeping up: back to the initial window (credit granted stands)."""
        self._run = 0
        if self.window > self.initial:
            if self.budget is not None:
                self.budget.give(self.window - self.initial)
            self.ungranted -= self.window - self.initial
            self.window = self.initial

    def release(self) -> None:
        """The stream is done: give its growth back to the budget, and grow no more."""
        if self.budget is not None:
            self.budget.give(self.window - self.initial)
            self.budget, self.max_window = None, 0
