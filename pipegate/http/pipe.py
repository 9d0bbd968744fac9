"""
Pieces shared by the relay and the connector: header filtering, the link's frame
sending interface, and L{StreamPipe}, a protocol that carries a raw byte stream
(passthrough connections) over one tunnel stream with credit windows both ways.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Protocol as TypingProtocol

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pipegate.core import window
from pipegate.http import frames
from pipegate.sockets import eager_writes, no_delay, send_now

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"trailers",
    b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})


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
            pairs.extend((name, v) for v in values)
    named = set()
    for name, value in pairs:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    if keep_upgrade:
        named -= {b"upgrade"}
        strip = HOP_BY_HOP - {b"connection", b"upgrade"}
    else:
        strip = HOP_BY_HOP
    strip = strip | named | drop
    return tuple((n, v) for n, v in pairs if n.lower() not in strip)


class FrameLink:
    """
    The frame-sending half of a link's WebSocket protocol (relay and connector ends).

    Each frame is one binary message.  The link's socket has Nagle off, and what one
    C{send} (or one L{corked} block) wrote goes to the kernel at once instead of after
    the reactor has handled every other ready socket: the next hop starts on this
    request while this end is still reading the next ones.  The socket's writes are
    eager (L{pipegate.sockets.eager_writes}): a write the socket takes whole costs one
    C{send} and no C{epoll_ctl} registering the socket for writing and unregistering
    it again (two per request at each end, before).  Inside a L{corked} block the
    WebSocket frames are collected and written as one.
    """

    _corked = 0
    _collector: _Collector | None = None

    def link_opened(self) -> None:
        no_delay(self.transport)
        eager_writes(self.transport)

    def send_message(self, frame: frames.Frame) -> None:
        self.sendMessage(frames.encode(frame), isBinary=True)
        if not self._corked:
            send_now(self.transport)  # (what eager writes could not send whole)

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Frames sent inside the block go to the kernel together, in one write, when it ends."""
        self._corked += 1
        if self._corked == 1 and self.transport is not None and self._collector is None:
            # Autobahn writes each frame to self.transport: collect them for the block.
            self._collector = self.transport = _Collector(self.transport)
        try:
            yield
        finally:
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


class _Collector:
    """
    Stands for a link's transport inside a L{FrameLink.corked} block: keeps what is
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
