"""
One public request carried over one connector link (L{RelayStream}): the request head
and body go to the connector as frames within the connector's credit, the response comes
back within the credit the relay grants, and the caller's connection pushes back on it.

Flow control is L{pipegate.core.window.Flow}'s: the response's window grows while the
caller keeps up (docs/protocol.md 1.5), with its growth taken from the relay's budget;
a shaped response (per-IP or per-tunnel rate) keeps the initial window; credit goes
back once half the window is due.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import http, server
# The status codes the per-request path uses, bound once: twisted.web.http is a
# deprecation proxy module, and every attribute read through it costs a Python call.
from twisted.web.http import BAD_GATEWAY, GATEWAY_TIMEOUT, NOT_FOUND, REQUEST_TIMEOUT
from zope.interface import implementer

from pipegate.core import window
from pipegate.core.pace import MinimumPace, ReadingPace
from pipegate.http import frames
from pipegate.http.cookies import scope_cookies
from pipegate.http.pipe import StreamPipe, filter_headers
from pipegate.http.tunnels import Tunnel
from pipegate.sockets import bytes_acked
from pipegate.timers import IdleTimer

if TYPE_CHECKING:   # the passthrough code loads with a relay's first upgrade request, where used
    from pipegate.http.upgrade import UpgradePipe   # (an idle relay does not hold it: test_lean_startup)

# What a connector may put in a response head (RFC 9110 token names; no CR, LF or NUL in
# values or the reason): anything else would split the caller's response.
_HEADER_NAMES = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")
_UNSAFE_TEXT = re.compile(rb"[\r\n\x00]")


def _correlation_ids() -> Iterator[bytes]:
    """
    Random 128-bit ids in hex, as C{uuid4().hex}, from C{os.urandom} read 4 KiB at a time:
    one C{getrandom} call per 256 requests instead of one per request.  The pool is
    first read when the first request needs it (after twistd has daemonized).
    """
    while True:
        pool = os.urandom(4096).hex().encode()
        for start in range(0, len(pool), 32):
            yield pool[start:start + 32]


#: The next correlation id (X-PipeGate-Correlation-Id) for a public request.
next_correlation_id = _correlation_ids().__next__


def own_headers(request: server.Request) -> None:
    """
    C{Server} and C{Date}, as twisted.web's C{Request.process} sets them, on an answer of
    the relay's own (RelayRequest.process leaves them out: a proxied response has the app's).
    """
    request.setHeader(b"server", server.version)
    request.setHeader(b"date", http.datetimeToString())


def plain(request: server.Request, code: int, message: str) -> None:
    """Answer with a short text/plain body and finish."""
    own_headers(request)
    body = message.encode() + b"\n"
    request.setResponseCode(code, b"Too Many Requests" if code == 429 else None)  # not in twisted's table
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    request.write(body)
    request.finish()


def _stream_over(reason: Any) -> None:
    """The caller-gone hook of a request whose stream is over: nothing is left to stop."""


@implementer(IPushProducer)
class RelayStream:
    """One public request carried over one connector link."""

    log = Logger()
    up_buckets: list = []
    down_buckets: list = []
    bucket_keys: list = []
    caller = ""          # the caller (source_key of its IP) whose share of the tunnel's slots this stream holds
    _download_hold = None
    _upload_hold = None
    _timer: IdleTimer | None = None   # the 404 / 504 deadline (_arm)
    _expiry: tuple[int, str] = (GATEWAY_TIMEOUT, "")
    _reading = None        # the caller's pace taking the answer (ReadingPace), once it began
    _reading_call = None
    _left = None           # bytes of the answer its Content-Length still owes the caller (None: not framed by it)
    _given = 0             # bytes of the answer handed to the caller's connection
    _acked = None          # what its TCP stack had acknowledged when the answer began (None: unknown)

    def __init__(self, relay, tunnel: Tunnel, request, target: bytes, prefix: bytes, upgrade: bool) -> None:
        # relay: pipegate.http.relay.Relay; request: pipegate.http.public.RelayRequest
        # (not imported: both import this module)
        self.relay = relay
        self.tunnel = tunnel
        self.request = request
        self.target = target
        self.prefix = prefix
        self.upgrade = upgrade
        self.link = None  # the ConnectorLink (pipegate/http/relay.py) it is assigned to
        self.stream_id = 0
        # Outgoing: the request body; incoming: the response, whose window grows while the
        # caller keeps up (docs/protocol.md 1.5).  The sink is the caller's connection and,
        # for a shaped response, the hold its token buckets put on it.
        self.flow = window.Flow.of(max_window=relay.config.max_window, budget=relay.window_budget)
        self._early: list[bytes] = []
        self._body_bytes = 0
        self._has_body = request.declared_length != 0
        self._body_done = not self._has_body
        self._pace = self._pace_call = None
        config = relay.config
        if self._has_body and config.min_body_rate and not upgrade:
            # A slow POST would hold its slot for as long as it trickles (core/pace.py).
            self._pace = MinimumPace(config.min_body_rate, config.body_grace, relay.clock.seconds())
            self._pace_call = relay.clock.callLater(config.body_grace, self._check_pace)
        self._end_sent = False
        self._responding = False
        self._paused = False  # the caller's connection pushes back (pauseProducing)
        self._done = False
        self.pipe: StreamPipe | None = None
        self._share_held = True
        self._held = bytearray()  # an upgrade's caller bytes past its head, until the pipe takes them
        if upgrade and request.channel is not None:
            # Whatever happens to the upgrade, the connection carries no further HTTP request.
            request.channel.persistent = False
            request.channel.raw_sink = self._hold_raw
        request.on_caller_gone = self._caller_gone   # (RelayRequest.connectionLost)

    def release_share(self) -> None:
        """Give back the caller's slot (its answer head is in, or the stream is over)."""
        if self._share_held:
            self._share_held = False
            self.tunnel.callers.release(self.caller)

    def _hold_raw(self, data: bytes) -> None:
        from pipegate.http.upgrade import MAX_HELD   # (after the first time: a lookup)
        self._held += data
        transport = self.request.channel.transport if self.request.channel else None
        if len(self._held) > MAX_HELD and transport is not None:
            transport.pauseProducing()

    # -- lifecycle
    def wait_for_connector(self) -> None:
        self.tunnel.waiting.append(self)
        self._pause_upload()
        self._arm(self.relay.config.offline_grace, NOT_FOUND, "tunnel offline")

    def assign(self, link) -> None:
        if self._done:
            return
        self.link = link
        self.stream_id = link.add_stream(self)
        req = self.request
        head = frames.RequestHead(
            stream=self.stream_id,
            method=req.method,
            target=self.target,
            # The relay's own hop: the connector appends it to the caller's X-Forwarded-For.
            client=getattr(req.client, "host", "").encode("ascii", "replace"),
            scheme=req.caller_scheme(),
            host=req.host_header() or b"",
            prefix=self.prefix,
            correlation=next_correlation_id(),
            headers=filter_headers(list(req.requestHeaders.getAllRawHeaders()),
                                   keep_upgrade=self.upgrade),
            end=not self._has_body and not self.upgrade,
            upgrade=self.upgrade,
        )
        try:
            link.send(head)
        except frames.FrameError:
            self.fail(431, "request head too large")
            return
        self._arm(self.relay.config.request_timeout, GATEWAY_TIMEOUT,
                  "the local app did not answer in time")
        if self.upgrade:
            # From here the caller's bytes, and their end, are the pipe's (pipe.StreamPipe
            # sends END on the caller's half-close): no END for the head alone.
            self._end_sent = True
            self._hijack()
            return
        self._end_sent = head.end
        early, self._early = self._early, []
        for chunk in early:
            self._send_body(chunk)
        if not self.flow.blocked:
            self._resume_upload()
        self._maybe_send_end()

    def _arm(self, seconds: float, code: int, reason: str) -> None:
        """
        The 404 / 504 deadline, C{seconds} from now, moved on by each sign of progress: an
        L{IdleTimer}, an entry on its clock's one shared schedule that a move only touches,
        not a DelayedCall made and cancelled per request (each a Python comparison per
        step of the reactor's heap).  It fires C{fail(code, reason)} with those last set.
        C{seconds} 0 (no such deadline) drops the one armed before (a waiting request's grace).
        """
        if seconds <= 0:
            self._cancel_timer()
        else:
            self._expiry = (code, reason)
            timer = self._timer
            if timer is not None and timer.seconds == seconds and timer.active():
                timer.touch()
            else:
                self._cancel_timer()
                self._timer = IdleTimer(self.relay.clock, seconds, self._expired)

    def _check_pace(self) -> None:
        self._pace_call = None
        pace = self._pace
        if self._done or pace is None or pace.paused:
            return   # (a resume arms it again)
        now = self.relay.clock.seconds()
        if pace.too_slow(now):
            self.fail(REQUEST_TIMEOUT, f"request body too slow (under {pace.rate:g} bytes/s)",
                      notify=REQUEST_TIMEOUT)
        else:
            self._pace_call = self.relay.clock.callLater(pace.deadline() - now, self._check_pace)

    def _check_reading(self) -> None:
        self._reading_call = None
        reading = self._reading
        if self._done or reading is None:
            return
        now = self.relay.clock.seconds()
        deadline = reading.deadline(self._taken())
        if deadline is None:
            return   # (taking again: the next push-back arms it)
        if now >= deadline:
            self.log.info("{tunnel_id}: caller {caller} took the answer too slowly (under {rate:g} bytes/s); cut",
                          tunnel_id=self.tunnel.id, caller=self.caller, rate=reading.rate)
            self.fail(REQUEST_TIMEOUT, f"caller too slow taking the answer (under {reading.rate:g} bytes/s)",
                      notify=REQUEST_TIMEOUT)
        else:
            self._reading_call = self.relay.clock.callLater(deadline - now, self._check_reading)

    def _taken(self) -> int:
        """What the caller took of the answer: acknowledged bytes where known, else what it was given."""
        start, transport = self._acked, self.request.transport
        acked = bytes_acked(transport) if start is not None and transport is not None else None
        return self._given if acked is None else acked - start

    def _stop_reading_check(self) -> None:
        call, self._reading_call = self._reading_call, None
        if call is not None and call.active():
            call.cancel()

    def _stop_pace(self) -> None:
        self._pace = None
        call, self._pace_call = self._pace_call, None
        if call is not None and call.active():
            call.cancel()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()   # (which drops its callback: the heap entry does not keep the stream)

    def _expired(self) -> None:
        code, reason = self._expiry
        self.fail(code, reason, notify=GATEWAY_TIMEOUT)

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self.flow.release()
        # The stream's references to itself (through its deadline's callback and its
        # request's caller-gone hook) go with it: stream and request are then freed by
        # reference counting once the link and the channel let go of them, instead of
        # by the cycle collector (25 objects a request, a collection every ~30 requests).
        self._cancel_timer()
        self._stop_pace()
        self._stop_reading_check()
        if self.request.on_caller_gone == self._caller_gone:
            self.request.on_caller_gone = _stream_over
        for hold in (self._download_hold, self._upload_hold):
            if hold is not None and hold.active():
                hold.cancel()
        if self.link is not None:
            self.link.remove_stream(self.stream_id)
        self.relay.stream_done(self)

    def fail(self, code: int, reason: str, notify: int | None = None) -> None:
        """Answer the caller with C{code} (or cut it off once a response has begun)."""
        if self._done:
            return
        if self.link is not None and notify is not None:
            self.link.send(frames.Reset(self.stream_id, notify, reason.encode()))
        self._finish()
        if self.pipe is not None:
            if self.pipe.transport is not None and not self._responding:
                self.pipe.status = code
                body = reason.encode() + b"\n"
                self.pipe.write_to_caller(
                    b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s"
                    % (code, http.RESPONSES.get(code, b"Error"), len(body), body))
                self.pipe.close_caller()
            else:
                self.pipe.abort()
            return
        if self.request.caller_gone:
            return
        request = self.request
        if self._responding:
            request.unregisterProducer()
            if request.startedWriting:
                # Logged and counted as "aborted" when the connection is gone (RelayRequest.connectionLost).
                request.cut = True
                request.abort()
                return
            # The app's head is held until its first body byte (RelayRequest.proxied_head):
            # nothing went out, so the caller can still get this answer instead.
            request.proxied_head = None
        request.body_sink = None
        plain(request, code, reason)

    def _caller_gone(self, failure: Any) -> None:
        if not self._done and self.link is not None:
            self.link.send(frames.Reset(self.stream_id, 499, b"caller went away"))
        self._finish()
        if self.request.producer is self:
            # Nothing unregisters a producer from a request whose connection is gone
            # (its channel is); the stream and the request would hold each other.
            self.request.producer = None

    # -- request body (caller -> connector)
    def body_chunk(self, data: bytes) -> None:
        if self._done:
            return
        self._body_bytes += len(data)
        if self._pace is not None:
            self._pace.received(len(data))
        limit = self.relay.config.max_body_bytes
        if limit and self._body_bytes > limit:
            self.fail(http.REQUEST_ENTITY_TOO_LARGE, f"request body exceeds {limit} bytes", notify=413)
            return
        if self.link is None:
            self._early.append(data)
            self._pause_upload()
            return
        # A body still arriving is progress: the timeout is for silence, not for size.
        self._arm(self.relay.config.request_timeout, GATEWAY_TIMEOUT,
                  "the local app did not answer in time")
        self._send_body(data)

    def _send_body(self, data: bytes) -> None:
        self.relay.stats.inc("bytes", "up", len(data))
        for chunk in self.flow.write(data):
            self.link.send(frames.Data(self.stream_id, chunk))
        if self.flow.blocked:
            self._pause_upload()
        delay = self._charge(self.up_buckets, len(data))
        if delay > 0:
            self._pause_upload()
            self._upload_hold = self._hold(self._upload_hold, delay, self._upload_released, "up")

    def _charge(self, buckets, size: int) -> float:
        if not buckets:
            return 0.0   # (unshaped: most streams)
        now = self.relay.clock.seconds()
        return max((bucket.take(size, now) for bucket in buckets), default=0.0)

    def _hold(self, call, delay: float, release, direction: str):
        """
        Schedule C{release} in C{delay} s, or push an earlier one out to then; the pause
        time added is counted (overlapping extensions count once).
        """
        until = self.relay.clock.seconds() + delay
        if call is not None and call.active():
            if call.getTime() < until:
                self.relay.stats.inc("throttled_seconds", direction, until - call.getTime())
                call.reset(delay)
            return call
        self.relay.stats.inc("throttled_seconds", direction, delay)
        return self.relay.clock.callLater(delay, release)

    def _upload_released(self) -> None:
        self._upload_hold = None
        if not self._done and not self.flow.blocked:
            self._resume_upload()

    def _download_released(self) -> None:
        self._download_hold = None
        if not self._paused:
            self._sink_resumed()

    def body_complete(self) -> None:
        self._body_done = True
        self._stop_pace()
        self._maybe_send_end()

    def _maybe_send_end(self) -> None:
        if (self._body_done and not self._end_sent and self.link is not None
                and not self._done and self.flow.send.queued == 0):
            self._end_sent = True
            self.link.send(frames.End(self.stream_id))

    def _pause_upload(self) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None and not self._body_done:
            transport.pauseProducing()
            if self._pace is not None:
                self._pace.pause()

    def _resume_upload(self) -> None:
        if self._upload_hold is not None:
            return  # shaped: _upload_released resumes it
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None and not self._body_done:
            transport.resumeProducing()
            pace = self._pace
            if pace is not None and pace.paused:
                pace.resume(self.relay.clock.seconds())
                if self._pace_call is None:
                    self._pace_call = self.relay.clock.callLater(pace.grace, self._check_pace)

    # -- frames from the connector
    def frame_received(self, frame: frames.Frame) -> None:
        if self._done:
            return
        if self.pipe is not None:
            if isinstance(frame, frames.Reset):
                self.fail(BAD_GATEWAY, frame.reason.decode("utf-8", "replace"))
                return
            self.pipe.frame_received(frame)
            return
        if isinstance(frame, frames.ResponseHead):
            self._response_head(frame)
        elif isinstance(frame, frames.Data):
            if not self._responding:
                raise frames.FrameError("DATA before RESPONSE_HEAD")
            size = len(frame.data)
            flow = self.flow
            flow.held(size)  # (raises FrameError before the write if the connector overran its credit)
            left = self._left
            if left is not None:
                if size > left:
                    self.fail(BAD_GATEWAY, "the answer went on past its Content-Length", notify=BAD_GATEWAY)
                    return
                self._left = left - size
            self.relay.stats.inc("bytes", "down", size)
            self._arm(self.relay.config.request_timeout, GATEWAY_TIMEOUT,
                      "the local app stalled")
            if self._reading is not None:
                self._given += size
            self.request.write(frame.data)  # (may pause us: then no credit goes back)
            delay = self._charge(self.down_buckets, size)
            if delay > 0:
                # Shaped: no credit goes back until the hold ends (_download_released).
                flow.sink_paused(self.relay.clock.seconds())
            # Credit goes back once half the window is due, not per DATA frame.
            credit = flow.handed_on(size)
            if delay > 0:
                flow.recv.shrink()  # a shaped response keeps the initial window
                self._download_hold = self._hold(self._download_hold, delay, self._download_released, "down")
            if credit:
                self.link.send(frames.Window(self.stream_id, credit))
        elif isinstance(frame, frames.End):
            if not self._responding:
                raise frames.FrameError("END before RESPONSE_HEAD")
            if self._left:
                self.fail(BAD_GATEWAY, "the answer ended before its Content-Length", notify=BAD_GATEWAY)
                return
            self._finish()
            self.request.unregisterProducer()
            self.request.finish()
        elif isinstance(frame, frames.Window):
            for chunk in self.flow.credited(frame.increment):
                self.link.send(frames.Data(self.stream_id, chunk))
            if not self.flow.blocked:
                self._resume_upload()
            self._maybe_send_end()
        elif isinstance(frame, frames.Reset):
            self.fail(frame.code if 400 <= frame.code <= 599 else BAD_GATEWAY,
                      frame.reason.decode("utf-8", "replace") or "connector reset the request")

    def _response_head(self, head: frames.ResponseHead) -> None:
        if self._responding:
            raise frames.FrameError("second RESPONSE_HEAD")
        if head.status < 200:
            return  # interim responses are not forwarded
        self.release_share()
        # Two regex calls for the whole head: no CR, LF or NUL in the reason or any value
        # (none in one iff none in them joined); every name a token (\n is not a token
        # character, so the joined names match iff each does).
        headers = head.headers
        if _UNSAFE_TEXT.search(b"".join([head.reason, *[value for _, value in headers]])) or (
                headers and not _HEADER_NAMES.fullmatch(b"\n".join([name for name, _ in headers]))):
            raise frames.FrameError("RESPONSE_HEAD with a header name or value that is not valid HTTP")
        self._responding = True
        request = self.request
        request.setResponseCode(head.status, head.reason or None)
        # Written by the first body write (RelayRequest.write), past twisted.web's Headers;
        # an untyped answer stays untyped (twisted.web would add text/html).
        pairs = filter_headers(headers)
        if self.prefix:  # reached by /<id>/: one origin for all tunnels (http/cookies.py)
            pairs = scope_cookies(pairs, self.prefix)
        lengths = [value for name, value in pairs if name.lower() == b"content-length"]
        if lengths and request.method != b"HEAD" and head.status not in (204, 304):
            # The caller (and any proxy in front that reuses its connection to the relay for
            # other callers) finds the end of this answer by its Content-Length: more or
            # fewer bytes would make the rest of the connection another answer.
            if len(set(lengths)) > 1 or not lengths[0].isdigit():
                raise frames.FrameError("RESPONSE_HEAD with an invalid Content-Length")
            self._left = int(lengths[0])
        if head.end and self._left:
            self._responding = False   # (nothing went out: the caller gets the 502)
            self.fail(BAD_GATEWAY, "the answer ended before its Content-Length", notify=BAD_GATEWAY)
            return
        request.proxied_head = pairs
        request.proxied_length = bool(lengths)
        if head.end:
            self._finish()
            request.finish()
            return
        request.registerProducer(self, True)
        self._arm(self.relay.config.request_timeout, GATEWAY_TIMEOUT, "the local app stalled")
        if self.relay.config.min_download_rate:
            # A caller taking a trickle would hold its slot for ever ("slow read"): the
            # head freed its share of the tunnel (core/pace.py ReadingPace).
            self._reading = ReadingPace(self.relay.config.min_download_rate, self.relay.config.download_grace)
            self._given = 0
            self._acked = bytes_acked(request.transport) if request.transport is not None else None

    # IPushProducer: the caller's connection pushes back on the response
    def pauseProducing(self) -> None:
        self._paused = True
        now = self.relay.clock.seconds()
        self.flow.sink_paused(now)
        reading = self._reading
        if reading is not None and not self._done:
            reading.stall(now)
            if self._reading_call is None:
                self._reading_call = self.relay.clock.callLater(
                    max(0.0, reading.deadline(self._taken()) - now), self._check_reading)

    def resumeProducing(self) -> None:
        self._paused = False
        if self._reading is not None:
            self._reading.unstall(self.relay.clock.seconds())
            self._stop_reading_check()
        if self._download_hold is not None:
            return  # shaped: _download_released grants the credit
        self._sink_resumed()

    def _sink_resumed(self) -> None:
        # Flow.sink_resumed shrinks the window when the sink stayed full SLOW_SINK or more
        # (the caller is not keeping up), then returns the credit due.
        credit = self.flow.sink_resumed(self.relay.clock.seconds())
        if credit and not self._done:
            self.link.send(frames.Window(self.stream_id, credit))

    def stopProducing(self) -> None:
        pass

    # -- passthrough
    def _hijack(self) -> None:
        """Hand the caller's connection to an L{UpgradePipe} (pipegate/http/upgrade.py)."""
        from pipegate.http.upgrade import UpgradePipe, take_over
        held, self._held = bytes(self._held), bytearray()
        self.pipe = UpgradePipe(self.link, self.stream_id, clock=self.relay.clock, method=self.request.method,
                                idle_timeout=self.relay.config.upgrade_idle_timeout, held=held,
                                min_rate=self.relay.config.min_download_rate,
                                on_answer=self._upgrade_answered, on_closed=self._upgrade_closed)
        take_over(self.request, self.pipe)

    def _upgrade_answered(self, status: int) -> None:
        """The local app's final answer head is in: no more 504; a refused upgrade frees its slot."""
        self._responding = True
        self._cancel_timer()
        self.relay.stats.inc("upgrades", "switched" if status == 101 else "refused")
        if status != 101:
            self.release_share()

    def _upgrade_closed(self, pipe: UpgradePipe) -> None:
        from pipegate.http.upgrade import HANDSHAKE
        if pipe.state == HANDSHAKE:  # no answer from the app: 502, 504, or the caller left
            self.relay.stats.inc("upgrades", "failed")
        self.relay.stats.inc("bytes", "up", pipe.bytes_up)
        self.relay.stats.inc("bytes", "down", pipe.bytes_down)
        site = getattr(self.request, "site", None)
        if site is not None and hasattr(site, "log_upgrade"):
            site.log_upgrade(self.request, pipe)
