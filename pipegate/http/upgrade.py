"""
Passthrough (C{Upgrade}) connections on the relay.

A public request carrying C{Upgrade} (without the C{pipegate.v1} subprotocol, and without a
body) becomes an C{UPGRADE} stream (docs/protocol.md 1.6): the connector writes the request
head to the local app, and from then on C{DATA} carries raw bytes each way.  The relay does not
take it on trust that the app switches protocols.  L{UpgradePipe} holds every byte the caller
sends after its request head until the app's answer head is in, and then:

  - C{101}: the head goes to the caller, the held bytes to the app, and the connection is a raw
    pipe from then on, closed after C{--upgrade-idle-timeout} seconds without a byte either way;
  - another C{1xx}: forwarded; the pipe waits on for the final answer;
  - anything else: that one response goes to the caller with C{Connection: close}, the connection
    closes once the response ends (by C{Content-Length}, chunked framing, or the app closing),
    and the caller's held bytes are dropped: they never reach the app unrouted.

L{parse_response_head} and L{BodyEnd} are pure; L{UpgradePipe} is the protocol on the caller's
socket once the relay has taken it over from twisted.web (L{take_over}).
"""

from __future__ import annotations

import re
from typing import Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper

from pipegate.http import frames
from pipegate.http.pipe import FrameSink, StreamPipe
from pipegate.sockets import UnreadAbort
from pipegate.timers import IdleTimer, cancel

#: The longest response head the relay waits for from the local app (then 502).
MAX_RESPONSE_HEAD = 64 * 1024
#: Caller bytes held while the app has not answered; beyond it the caller's socket is paused.
MAX_HELD = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [^\r\n]*)?")


class UpgradeError(Exception):
    """The local app's answer is not a well-formed HTTP/1.1 response."""


@attrs.frozen
class ResponseHead:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    raw: bytes  # as the app sent it, the blank line included

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]

    def closing(self) -> bytes:
        """This head with its C{Connection} and C{Keep-Alive} replaced by C{Connection: close}."""
        lines = self.raw.split(b"\r\n")
        kept = [lines[0]] + [line for line in lines[1:] if line
                             and line.split(b":", 1)[0].strip().lower() not in (b"connection", b"keep-alive")]
        return b"\r\n".join(kept + [b"Connection: close", b"", b""])


def parse_response_head(buffer: bytes) -> tuple[ResponseHead, bytes] | None:
    """
    The response head at the start of C{buffer} and the bytes after it, or None while it is
    incomplete.

    @raise UpgradeError: not HTTP/1.x, or a head longer than L{MAX_RESPONSE_HEAD}.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_RESPONSE_HEAD:
            raise UpgradeError("response head too large")
        if len(buffer) >= 5 and not buffer.startswith(b"HTTP/"):
            raise UpgradeError("not an HTTP response")
        return None
    if end + 4 > MAX_RESPONSE_HEAD:
        raise UpgradeError("response head too large")
    raw, rest = buffer[:end + 4], buffer[end + 4:]
    lines = raw[:end].split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise UpgradeError("not an HTTP response")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise UpgradeError("malformed response header")
        headers.append((name, value.strip()))
    return ResponseHead(int(match.group(1)), tuple(headers), raw), rest


class BodyEnd:
    """
    Where a response body ends: C{feed(data)} returns how many bytes of C{data} finish the
    body, or None while the body goes on.  Kinds: no body, C{Content-Length}, chunked, or until
    the app closes (C{feed} never ends it).
    """

    def __init__(self, head: ResponseHead, method: bytes) -> None:
        self._line = b""
        self._state = "size"
        self._left = 0
        if method == b"HEAD" or head.status in (204, 304) or head.status < 200:
            self.kind = "none"
        elif any(b"chunked" in v.lower() for v in head.values(b"transfer-encoding")):
            self.kind = "chunked"
        elif head.values(b"content-length"):
            try:
                self._left = int(head.values(b"content-length")[0])
            except ValueError:
                raise UpgradeError("invalid Content-Length") from None
            if self._left < 0:
                raise UpgradeError("invalid Content-Length")
            self.kind = "length"
        else:
            self.kind = "close"

    @property
    def done_at_head(self) -> bool:
        return self.kind == "none" or (self.kind == "length" and self._left == 0)

    def feed(self, data: bytes) -> int | None:
        if self.kind == "close":
            return None
        if self.kind == "length":
            if len(data) >= self._left:
                used, self._left = self._left, 0
                return used
            self._left -= len(data)
            return None
        if self.kind == "none":
            return 0
        return self._chunked(data)

    def _chunked(self, data: bytes) -> int | None:
        i, n = 0, len(data)
        while i < n:
            if self._state == "data":
                take = min(self._left, n - i)
                self._left -= take
                i += take
                if self._left == 0:
                    self._state = "size"
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                if len(self._line) > 8192:
                    raise UpgradeError("chunk line too long")
                return None
            line, self._line = (self._line + data[i:j]).rstrip(b"\r"), b""
            i = j + 1
            if self._state == "trailer":
                if not line:
                    return i
                continue
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise UpgradeError("invalid chunk size") from None
            if size == 0:
                self._state = "trailer"
            else:
                self._state, self._left = "data", size + 2  # the chunk and its CRLF
        return None


HANDSHAKE, OPEN, ANSWERED = "handshake", "open", "answered"


class UpgradePipe(StreamPipe):
    """
    The caller's socket of an C{UPGRADE} stream, from the request head on (see the module
    docstring).  C{on_answer(status)} is called once the app's final answer head is in;
    C{on_closed(pipe)} once the caller's connection is gone, for the access log.
    """

    log = Logger()

    def __init__(self, link: FrameSink, stream_id: int, *, clock: IReactorTime, method: bytes,
                 idle_timeout: float, held: bytes = b"", min_rate: float = 0.0,
                 on_answer: Callable[[int], None] = lambda status: None,
                 on_closed: Callable[[UpgradePipe], None] = lambda pipe: None) -> None:
        super().__init__(link, stream_id)
        self.clock = clock
        self.method = method
        self.idle_timeout = idle_timeout
        self.min_rate = min_rate   # bytes/s a caller closed behind must take (UnreadAbort); 0: any
        self.state = HANDSHAKE
        self.status = 0
        self.started = clock.seconds()
        self.bytes_up = 0      # caller -> app, after the request head
        self.bytes_down = 0    # app -> caller, heads included
        self._held = bytearray(held)
        self._head = b""
        self._body: BodyEnd | None = None
        self._on_answer = on_answer
        self._on_closed = on_closed
        self._idle: IdleTimer | None = None   # from the app's answer on
        self._closed_reported = False

    # -- the caller's socket
    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        StreamPipe.resumeProducing(self)  # credit for the app's answer
        # Keep reading while the app has not answered (a caller that leaves is noticed), but
        # hold what arrives: beyond MAX_HELD the caller is paused.
        if len(self._held) <= MAX_HELD:
            self.transport.resumeProducing()
        else:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.state == OPEN:
            self._touch()
            self.bytes_up += len(data)
            super().dataReceived(data)
        elif self.state == HANDSHAKE and not self._done:
            self._held += data
            if len(self._held) > MAX_HELD and self.transport is not None:
                self.transport.pauseProducing()
        # ANSWERED: the caller's bytes after a refused upgrade are dropped

    def connectionLost(self, reason=None) -> None:
        self._cancel_idle()
        super().connectionLost(reason)
        if not self._closed_reported:
            self._closed_reported = True
            self._on_closed(self)

    def write_to_caller(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.bytes_down += len(data)
            self.transport.write(data)

    # -- the tunnel
    def frame_received(self, frame: frames.Frame) -> None:
        if self.state == OPEN:
            if isinstance(frame, frames.Data):
                self._touch()
                self.bytes_down += len(frame.data)
            super().frame_received(frame)
            return
        if isinstance(frame, frames.Window):
            # Credit for caller bytes, which do not flow before a 101: nothing to resume.
            self.flow.credited(frame.increment)
            return
        if isinstance(frame, frames.End):
            if self.state == ANSWERED:
                self._finish_answer()  # a close-delimited body ends with the app's connection
            else:
                self._bad_answer("the local app closed without answering")
            return
        if not isinstance(frame, frames.Data):
            super().frame_received(frame)
            return
        self.flow.held(len(frame.data))
        self._touch()
        if self.state == HANDSHAKE:
            self._handshake_data(frame.data)
        else:
            self._answer_data(frame.data)
        if not self._done:
            credit = self.flow.handed_on(len(frame.data))
            if credit:
                self.link.send(frames.Window(self.stream_id, credit))

    def _handshake_data(self, data: bytes) -> None:
        buffer = self._head + data
        while True:
            try:
                parsed = parse_response_head(buffer)
            except UpgradeError as e:
                self._bad_answer(str(e))
                return
            if parsed is None:
                self._head = buffer
                return
            head, buffer = parsed
            if head.status == 101:
                self._switch(head, buffer)
                return
            if head.status >= 200:
                self._refused(head, buffer)
                return
            self.write_to_caller(head.raw)  # 100 Continue, 103 Early Hints: the final answer follows

    def _switch(self, head: ResponseHead, rest: bytes) -> None:
        self.state, self.status, self._head = OPEN, 101, b""
        self._on_answer(101)
        self.write_to_caller(head.raw + rest)
        held, self._held = bytes(self._held), bytearray()
        self._arm_idle()
        if held:
            self.dataReceived(held)
        if not self.flow.blocked and self.transport is not None and not self._done:
            self.transport.resumeProducing()

    def _refused(self, head: ResponseHead, rest: bytes) -> None:
        self.state, self.status, self._head = ANSWERED, head.status, b""
        self._held = bytearray()
        self._on_answer(head.status)
        try:
            self._body = BodyEnd(head, self.method)
        except UpgradeError as e:
            self._bad_answer(str(e))
            return
        self.write_to_caller(head.closing())
        self._arm_idle()  # an answer that never ends (no length, the app keeps its connection)
        if self._body.done_at_head:
            self._finish_answer()
        else:
            self._answer_data(rest)

    def _answer_data(self, data: bytes) -> None:
        if self._done or self._body is None:
            return
        try:
            used = self._body.feed(data)
        except UpgradeError:
            used = 0  # framing broken mid-body: end the response here
        if used is None:
            self.write_to_caller(data)
        else:
            self.write_to_caller(data[:used])
            self._finish_answer()

    def _finish_answer(self) -> None:
        """The refused upgrade's response is complete: close both ends."""
        if self._done:
            return
        self._done = True
        self.link.send(frames.Reset(self.stream_id, 499, b"upgrade refused by the local app; connection closed"))
        self.link.stream_closed(self.stream_id)
        self.close_caller()

    def _bad_answer(self, reason: str) -> None:
        self.log.info("passthrough answer from the local app refused: {reason}", reason=reason)
        if self._done:
            return
        self._done = True
        self.status = 502
        self.link.send(frames.Reset(self.stream_id, 502, reason.encode()))
        self.link.stream_closed(self.stream_id)
        if self.transport is not None:
            if self.state == HANDSHAKE:
                body = b"the local app's answer is not valid HTTP\n"
                self.write_to_caller(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n"
                                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            self.close_caller()

    # -- idle timeout of an open pipe (or of a refused upgrade's answer)
    def _arm_idle(self) -> None:
        if self._idle is None:
            self._idle = IdleTimer(self.clock, self.idle_timeout, self._idle_out)   # (0: never)
        else:
            self._idle.touch()

    def _touch(self) -> None:
        if self._idle is not None:
            self._idle.touch()

    def _idle_out(self) -> None:
        if self._done:
            return
        self.log.info("passthrough connection idle for {seconds:g} s; closing", seconds=self.idle_timeout)
        self._done = True
        self.link.send(frames.Reset(self.stream_id, 504, b"passthrough connection idle"))
        self.link.stream_closed(self.stream_id)
        self.close_caller()

    def close_caller(self) -> None:
        """
        Close the caller's connection once it has read what is queued for it.  Twisted's
        loseConnection waits for that as long as it takes: a caller that never reads would
        hold the connection (its fd, its unit of the per-IP and total caps) for ever, so it
        is aborted if it is still open C{idle_timeout} after this (0: never).
        """
        if self.transport is None:
            return
        self._cancel_idle()
        self._idle = UnreadAbort(self.clock, self.idle_timeout, self.transport, self._unread, self.min_rate)
        # A streaming producer still registered (this pipe) would keep the connection open
        # once its queue drained: Twisted then resumes the producer instead of closing.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _unread(self) -> None:
        self.log.info("passthrough caller did not read its answer within {seconds:g} s of the close; "
                      "closing", seconds=self.idle_timeout)

    def _cancel_idle(self) -> None:
        self._idle = cancel(self._idle)

    def abort(self) -> None:
        self._cancel_idle()
        super().abort()


def take_over(request, pipe: StreamPipe) -> None:
    """
    Move the caller's connection from twisted.web's HTTP channel to C{pipe}; bytes the channel
    read past the request head go to C{pipe} too (L{RelayChannel.raw_sink}).
    """
    channel = request.channel
    transport, channel.transport = channel.transport, None
    transport.unregisterProducer()  # the HTTP channel's registration
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = pipe
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = pipe
    else:
        transport.protocol = pipe
    channel.raw_sink = pipe.dataReceived
    pipe.makeConnection(transport)
