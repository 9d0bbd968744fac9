"""
Pieces shared by the relay and the connector: header filtering, the link's frame
sending interface, and L{StreamPipe}, a protocol that carries a raw byte stream
(passthrough connections) over one tunnel stream with credit windows both ways.
"""

from __future__ import annotations

import struct
from random import getrandbits as _random_bits
from typing import Callable, Iterator, Protocol as TypingProtocol

from autobahn.exception import Disconnected
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pipegate._compat import autobahn_between_frames, autobahn_traffic_seen, xor_mask
from pipegate.core import window
from pipegate.http import frames
from pipegate.sockets import eager_writes, no_delay, send_now

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"trailers",
    b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})
_STRIP_KEEPING_UPGRADE = HOP_BY_HOP - {b"connection", b"upgrade"}


def connection_names(value: bytes) -> set[bytes]:
    """The header names a C{Connection} value lists (hop-by-hop for this one hop), lower case."""
    return {t for t in (t.strip().lower() for t in value.split(b",")) if t}


def filter_headers(raw: list[tuple[bytes, list[bytes]]] | frames.Headers, *,
                   keep_upgrade: bool = False, drop: frozenset[bytes] = frozenset()) -> frames.Headers:
    """
    Flatten C{(name, [values])} or C{(name, value)} pairs in order, dropping hop-by-hop
    headers and any header that C{Connection} names.  With C{keep_upgrade}, C{Connection}
    and C{Upgrade} stay (passthrough).
    """
    pairs: list[tuple[bytes, bytes]] = []
    for name, values in raw:
        if isinstance(values, bytes):
            pairs.append((name, values))
        else:
            pairs.extend([(name, v) for v in values])
    # Each name lowered once (a head is filtered for every request, both ways).
    lowered = [name.lower() for name, _ in pairs]
    strip = _STRIP_KEEPING_UPGRADE if keep_upgrade else HOP_BY_HOP
    if b"connection" in lowered:
        named = set()
        for low, (_, value) in zip(lowered, pairs):
            if low == b"connection":
                named |= connection_names(value)
        if keep_upgrade:
            named.discard(b"upgrade")
        strip = strip | named
    if drop:
        strip = strip | drop
    return tuple([pair for low, pair in zip(lowered, pairs) if low not in strip])


class FrameLink:
    """
    The frame-sending half of a link's WebSocket protocol (relay and connector ends).

    Each frame is one binary message.  The link's socket has Nagle off, and what one
    C{send} (or one corked stretch) wrote goes to the kernel at once instead of after
    the reactor has handled every other ready socket: the next hop starts on this
    request while this end is still reading the next ones.  The socket's writes are
    eager (L{pipegate.sockets.eager_writes}): a write the socket takes whole costs one
    C{send} and no C{epoll_ctl} registering the socket for writing and unregistering
    it again (two per request at each end, before).  Between L{cork} and L{uncork} the
    WebSocket frames are collected and written as one.  Both ends cork for each reactor turn (L{send_in_turn}): under load one write for
    many callers' request heads, or many apps' answers, saves more than starting each at
    once gains (benchmarks/README.md, "relay public side", second pass; the connector's,
    2026-12-07: 2.0 -> 1.1 sendto per request).

    Once the link is open, its binary frames are framed and parsed here (L{ws_frame},
    L{WireReader}) rather than by Autobahn's general message machinery, which cost
    about a fifth of the relay's CPU per small request (benchmarks/README.md, "HTTP
    plane per-request CPU, second pass").  The frames are the same RFC 6455 frames
    (the client masks every frame with a fresh random key; the server's are unmasked):
    a peer, or a proxy in between, sees no difference.  Control frames (ping, pong,
    close) still go to Autobahn, and so does everything after a frame this fast path
    does not take (text, fragments, extension bits, a frame over the size limit), so
    Autobahn keeps answering those the way it did.
    """

    _corked = 0
    _collector: _Collector | None = None
    _reader: WireReader | None = None

    _turn_corked = False

    def link_opened(self) -> None:
        no_delay(self.transport)
        eager_writes(self.transport)

    def send_in_turn(self, frame: frames.Frame, clock) -> None:
        """
        Send C{frame} with every other frame this link sends in this reactor turn: corked
        until C{clock} calls L{end_turn} after the turn (one write for the heads of many
        callers at the relay, for many apps' answers at the connector).
        """
        if not self._turn_corked:
            self._turn_corked = True
            self.cork()
            clock.callLater(0, self.end_turn)
        self.send_message(frame)

    def end_turn(self) -> None:
        """The turn is over: what L{send_in_turn} collected goes out."""
        self._turn_corked = False
        self.uncork()

    def send_message(self, frame: frames.Frame) -> None:
        if self.state != self.STATE_OPEN:
            raise Disconnected("Attempt to send on a closed protocol")
        self.transport.write(ws_frame(frames.encode(frame), not self.factory.isServer))
        if not self._corked:
            send_now(self.transport)  # (what eager writes could not send whole)

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            if self.state != self.STATE_OPEN or not autobahn_between_frames(self):
                super().dataReceived(data)
                return
            reader = self._reader = WireReader(masked=self.factory.isServer)
        if reader.done:
            super().dataReceived(data)
            return
        seen = False
        for kind, payload in reader.feed(data):
            if kind is WireReader.MESSAGE:
                if self.state != self.STATE_OPEN:
                    # Closing: Autobahn decides what still counts, from this frame on.
                    super().dataReceived(reader.hand_over())
                    return
                if not seen:
                    seen = True   # (once per read: the same pending ping timeout to cancel)
                    autobahn_traffic_seen(self)
                self.onMessage(payload, True)
            else:
                # A control frame, whole (Autobahn answers it), or where Autobahn takes over.
                super().dataReceived(payload)
            if reader.done or self.transport is None:
                return

    def cork(self) -> None:
        """Collect the frames sent from now on, until as many L{uncork} calls."""
        self._corked += 1
        if self._corked == 1 and self.transport is not None and self._collector is None:
            # Frames are written to self.transport: collect them for the block.
            self._collector = self.transport = _Collector(self.transport)

    def uncork(self) -> None:
        """The last of the L{cork}s: what was collected goes to the kernel in one write."""
        self._corked -= 1
        if not self._corked:
            collector, self._collector = self._collector, None
            if collector is not None:
                if self.transport is collector:
                    self.transport = collector.transport
                if collector.chunks and self.transport is not None:
                    self.transport.write(b"".join(collector.chunks))
            if self.transport is not None:
                send_now(self.transport)


# Below this, masking with Python's big integers beats setting up the native masker
# (about 1 µs; 0.35 µs for 8 bytes, 1.45 µs for 512 with big integers).
_SMALL_MASK = 384


def _xor(mask: bytes, payload: bytes) -> bytes:
    """RFC 6455 section 5.3 masking (its own inverse)."""
    n = len(payload)
    if n >= _SMALL_MASK:
        return xor_mask(mask, payload)
    if not n:
        return payload
    key = (mask * ((n + 3) >> 2))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


_LEN16 = struct.Struct(">BBH")
_LEN64 = struct.Struct(">BBQ")


def ws_frame(payload: bytes, masked: bool) -> bytes:
    """One unfragmented binary WebSocket frame (RFC 6455 section 5.2); C{masked} on a client."""
    n = len(payload)
    if n < 126:
        head = bytes((0x82, n | 0x80)) if masked else bytes((0x82, n))
    elif n < 0x10000:
        head = _LEN16.pack(0x82, 126 | 0x80 if masked else 126, n)
    else:
        head = _LEN64.pack(0x82, 127 | 0x80 if masked else 127, n)
    if not masked:
        return head + payload
    mask = _random_bits(32).to_bytes(4, "big")  # a fresh key per frame, as Autobahn does
    if n >= _SMALL_MASK or not n:
        return head + mask + _xor(mask, payload)
    # (_xor's big-integer masking, inline: most frames are small)
    key = (mask * ((n + 3) >> 2))[:n]
    return head + mask + (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class WireReader:
    """
    Splits the bytes of an open WebSocket into frames, for L{FrameLink}.

    L{feed} yields C{(MESSAGE, payload)} for each complete unfragmented binary frame
    within L{frames.MAX_FRAME_SIZE}, unmasked (C{masked}: the peer is a client, whose
    frames must be masked; a server's must not be), and C{(RAW, frame bytes)} for each
    complete control frame.  At the first other frame it yields C{(RAW, everything from
    that frame on)} and sets L{done}: from then on all bytes are Autobahn's, which
    reads them as it always did (and fails the connection where RFC 6455 says so).
    A frame not yet complete is kept, up to the size limit plus its header.
    """

    MESSAGE = "message"
    RAW = "raw"

    def __init__(self, masked: bool) -> None:
        self.masked = masked
        self.done = False
        self._chunks: list[bytes] = []
        self._held = 0
        self._need = 2  # bytes held before the next parse can make progress
        self._buf = b""  # what feed() is parsing, and where the frame it yielded last starts
        self._start = 0

    def hand_over(self) -> bytes:
        """
        Inside L{feed}'s loop: the bytes from the frame just yielded on, which the caller
        hands to Autobahn; L{done} from now on.
        """
        self.done = True
        return self._buf[self._start:]

    def feed(self, data: bytes) -> Iterator[tuple[str, bytes]]:
        if self._chunks:
            self._chunks.append(data)
            self._held += len(data)
            if self._held < self._need:
                return
            buf = b"".join(self._chunks)
            self._chunks, self._held = [], 0
        else:
            buf = data
        self._buf = buf
        size = len(buf)
        pos = 0
        masked = self.masked
        while size - pos >= 2:
            self._start = pos
            header = _header(buf, pos)
            if header is None:
                break
            head, n, minimal = header
            b0 = buf[pos]
            has_mask = bool(buf[pos + 1] & 0x80)
            end = head + n
            if b0 == 0x82 and has_mask == masked and minimal and n <= frames.MAX_FRAME_SIZE:
                if size < end:
                    break
                payload = buf[head:end]
                if masked:
                    payload = _xor(buf[head - 4:head], payload)
                pos = end
                yield self.MESSAGE, payload
            elif b0 & 0x88 == 0x88 and n <= 125:  # a whole control frame (FIN, opcode >= 8)
                if size < end:
                    break
                frame, pos = buf[pos:end], end
                yield self.RAW, frame
            else:
                self.done = True
                yield self.RAW, buf[pos:]
                return
            if self.done:
                return
        self._buf = b""
        if pos < size:
            rest = buf[pos:]
            self._chunks, self._held = [rest], len(rest)
            # At least the next frame's length field; once it is known, the whole frame.
            self._need = _needed(rest)


# An extended payload length (RFC 6455 section 5.2), by the 7-bit length that announces it:
# its width in bytes, and the least length it may carry (a shorter one has a shorter form).
_EXTENDED = {126: (2, 126), 127: (8, 0x10000)}


def _header(buf: bytes, pos: int) -> tuple[int, int, bool] | None:
    """
    The header of the frame at C{buf[pos:]} (at least 2 bytes there): where its payload
    starts (after the masking key, if any), the payload's length, and whether that length
    is written in its shortest form; C{None} while its extended length is incomplete.
    """
    b1 = buf[pos + 1]
    n = b1 & 0x7F
    head = pos + 2
    minimal = True
    if n >= 126:
        width, least = _EXTENDED[n]
        if len(buf) < head + width:
            return None
        n = int.from_bytes(buf[head:head + width], "big")
        head += width
        minimal = n >= least
    if b1 & 0x80:
        head += 4
    return head, n, minimal


def _needed(buf: bytes) -> int:
    """How many bytes the frame starting C{buf} needs before it can be parsed (at least the header)."""
    if len(buf) < 2:
        return 2
    header = _header(buf, 0)
    if header is None:
        return 2 + _EXTENDED[buf[1] & 0x7F][0]
    head, n, _minimal = header
    return head + n


class _Collector:
    """
    Stands for a link's transport while it is corked (L{FrameLink.cork}): keeps what is
    written (WebSocket frames) for one write at the end; anything else goes to the
    transport.
    """

    def __init__(self, transport) -> None:
        self.transport = transport
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def writeSequence(self, data) -> None:
        self.chunks.extend(data)

    def loseConnection(self) -> None:
        """What was collected goes first (a close after frames must not lose them)."""
        if self.chunks:
            chunks, self.chunks = self.chunks, []
            self.transport.write(b"".join(chunks))
        self.transport.loseConnection()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class FrameSink(TypingProtocol):
    """What a stream needs from its link."""

    def send(self, frame: frames.Frame) -> None: ...

    def stream_closed(self, stream_id: int) -> None: ...


@implementer(IPushProducer)
class StreamPipe(Protocol):
    """
    A raw byte pipe between a socket and a tunnel stream.  Bytes read from the socket go
    out as DATA within the peer's credit (the socket is paused while there is none);
    DATA from the tunnel is written to the socket and credited back once the socket is
    not pushing back.  END half-closes; connection loss ends the stream.
    """

    log = Logger()

    def __init__(self, link: FrameSink, stream_id: int,
                 on_first_byte: Callable[[], None] | None = None, preamble: bytes = b"") -> None:
        self.link = link
        self._preamble = preamble  # written to the socket first (a passthrough's request head)
        self.stream_id = stream_id
        self.flow = window.Flow.of()  # a fixed window both ways (passthrough streams do not grow)
        self._ended_by_peer = False
        self._done = False
        self._early: list[bytes] = []
        self._on_first_byte = on_first_byte

    # socket side
    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        if self._preamble:
            self.transport.write(self._preamble)
        early, self._early = self._early, []
        for chunk in early:
            self.transport.write(chunk)
            self.flow.recv.consumed(len(chunk))  # (the credit goes back below)
        self.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        if self._on_first_byte is not None:
            callback, self._on_first_byte = self._on_first_byte, None
            callback()
        for chunk in self.flow.write(data):
            self.link.send(frames.Data(self.stream_id, chunk))
        if self.flow.blocked:
            self.transport.pauseProducing()

    def connectionLost(self, reason=None) -> None:
        if not self._done:
            self._done = True
            self.link.send(frames.End(self.stream_id))
            self.link.stream_closed(self.stream_id)

    # IPushProducer: the socket tells us when its write buffer is full
    # (The window is fixed, so how long the socket stays full does not matter: no clock.)
    def pauseProducing(self) -> None:
        self.flow.sink_paused(0.0)

    def resumeProducing(self) -> None:
        credit = self.flow.sink_resumed(0.0)
        if credit and not self._done:
            self.link.send(frames.Window(self.stream_id, credit))

    def stopProducing(self) -> None:
        pass

    # tunnel side
    def frame_received(self, frame: frames.Frame) -> None:
        if isinstance(frame, frames.Data):
            if self.transport is None:
                self.flow.held(len(frame.data))
                self._early.append(frame.data)
                return
            credit = self.flow.arrived(len(frame.data))
            self.transport.write(frame.data)
            if credit:
                self.link.send(frames.Window(self.stream_id, credit))
        elif isinstance(frame, frames.Window):
            for chunk in self.flow.credited(frame.increment):
                self.link.send(frames.Data(self.stream_id, chunk))
            if not self.flow.blocked and self.transport is not None:
                self.transport.resumeProducing()
        elif isinstance(frame, frames.End):
            self._ended_by_peer = True
            if self.transport is not None:
                self.transport.loseConnection()
        elif isinstance(frame, frames.Reset):
            self.abort()

    def abort(self) -> None:
        """The tunnel side is gone: drop the socket without sending anything more."""
        self._done = True
        if self.transport is not None:
            self.transport.abortConnection()
