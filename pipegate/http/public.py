"""
The relay's public HTTP protocol: one twisted.web L{RelaySite} serves C{/healthz},
connector logins (Autobahn WebSocket with subprotocol C{pipegate.v1}, handed to
L{ConnectorLink}) and public traffic for C{/<connection-id>/...} (handed to
L{Relay.public_request}).  Public requests are streamed: processing starts as soon as
the headers are in (L{RelayChannel}), so request bodies go to the connector chunk by
chunk within the stream's credit window instead of being buffered first.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.logger import Logger
from twisted.python import failure
from twisted.web import http, resource, server
from twisted.web.http import NO_BODY_CODES  # (bound once: twisted.web.http is a deprecation proxy)
from twisted.web.http_headers import Headers

from pipegate import _compat
from pipegate.http import frames, routing
from pipegate.http.channeltimers import ChannelTimers
from pipegate.http.relay import ConnectorLink, Relay
from pipegate.http.streams import RelayStream, own_headers, plain
from pipegate.sockets import UnreadAbort, eager_writes, plain_writes
from pipegate.timers import cancel

if TYPE_CHECKING:
    from pipegate.http.forwarded import TrustedProxies   # loaded only with --trusted-proxy (tap/server.py)
    from pipegate.http.upgrade import UpgradePipe        # loaded by the first upgrade request (streams.py)

_TOKEN_IN_QUERY = re.compile(rb"(?i)(token=)[^&\s]*")
_NON_ASCII = re.compile(rb"[\x80-\xff]")


def raw_request_line(line: bytes) -> tuple[bytes, bytes] | None:
    """
    A request line whose target holds raw bytes >= 0x80 (unencoded UTF-8, as curl and
    several HTTP libraries send it): (the line with those bytes percent-encoded, the raw
    target), so that Twisted's request-line check, which allows printable ASCII only,
    accepts it; None for any other line.  Control characters stay refused.
    """
    parts = line.split(b" ")
    if len(parts) != 3 or not _NON_ASCII.search(parts[1]) or _NON_ASCII.search(parts[0] + parts[2]):
        return None
    encoded = _NON_ASCII.sub(lambda m: b"%%%02X" % m.group()[0], parts[1])
    return b" ".join((parts[0], encoded, parts[2])), parts[1]


_UNREAD = object()
_APP_ONLY = frozenset({b"server", b"date", b"content-type"})


def _no_body(data: bytes) -> None:
    """The body write of an answer that has none (HEAD, 204, 304)."""


class RelayRequest(server.Request):
    """
    A request whose processing starts when its headers are complete (see
    L{RelayChannel}); body chunks then go to C{body_sink} as they arrive.
    """

    body_sink: RelayStream | None = None
    declared_length: int | None = 0
    decision: str | None = None   # an ingress or visitor policy outcome, for the access log
    caller_gone = False
    cut = False                   # the connection ended after the answer began, before its end
    #: Called with the reason when the caller leaves before the answer is finished (as a
    #: notifyFinish errback would be, without a Deferred per request).
    on_caller_gone: Any = None
    _started_early = False
    _body_done = True
    _caller: Any = None
    #: A proxied answer's headers, (name, value) pairs as the app sent them, checked and
    #: filtered by its stream (L{RelayStream._response_head}); written with the answer's
    #: first body bytes (L{write}) or at its end.  They never go through C{responseHeaders}:
    #: twisted.web's C{Headers} would lower, re-encode and re-check every name and value
    #: the stream has just checked, and its C{write} would look two of them up again.
    proxied_head: Sequence[tuple[bytes, bytes]] | None = None
    proxied_length = False  # whether proxied_head carries Content-Length
    _host: Any = _UNREAD
    _upgrade: bool | None = None

    def host_header(self) -> bytes | None:
        """The C{Host} header, as C{getHeader} gives it, looked up once per request."""
        if self._host is _UNREAD:
            self._host = self.getHeader(b"host")
        return self._host

    def asks_upgrade(self) -> bool:
        """Whether the head carries C{Upgrade}, looked up once per request."""
        if self._upgrade is None:
            self._upgrade = self.requestHeaders.hasHeader(b"upgrade")
        return self._upgrade

    def _trusted(self) -> TrustedProxies | None:
        site = getattr(self.channel, "site", None)
        return getattr(site, "trusted_proxies", None)

    def getClientAddress(self):
        """
        The public caller: the TCP peer (C{self.client}), or, when that peer is a proxy
        named by C{--trusted-proxy}, the caller its C{X-Forwarded-For} names (port 0).
        The ingress policy, per-IP shaping and the access log go by this address.
        """
        if self._caller is None:
            peer = self.client
            self._caller = peer
            trusted = self._trusted()
            if trusted and isinstance(peer, (IPv4Address, IPv6Address)):
                ip = trusted.caller(peer.host, self.requestHeaders.getRawHeaders(b"x-forwarded-for", []))
                if ip != peer.host:
                    kind = IPv6Address if ":" in ip else IPv4Address
                    self._caller = kind("TCP", ip, 0)
        return self._caller

    def caller_scheme(self) -> bytes:
        """C{https} or C{http}: as the caller reached the relay, or its trusted proxy."""
        seen = b"https" if self.isSecure() else b"http"
        trusted = self._trusted()
        if not trusted:
            return seen
        return trusted.scheme(getattr(self.client, "host", ""), seen,
                              self.requestHeaders.getRawHeaders(b"x-forwarded-proto", []))

    def process(self):
        """
        A request started early (all but connector logins, L{RelayResource.wants_early_start})
        goes straight to the relay's one resource, a leaf: no resource traversal, and no
        C{Server} and C{Date} set for a proxied response to remove again (the relay's own
        answers add them: L{own_headers}).  Logins and C{*} go the usual way.
        """
        if not self._started_early or self.path == b"*":
            return super().process()
        self.site = site = self.channel.site
        self.prepath, self.postpath = [], []
        try:
            self.render(site.relay_resource)
        except BaseException:
            own_headers(self)
            self.processingFailed(failure.Failure())

    def gotLength(self, length):
        self.declared_length = length
        if self._started_early:
            self.content = io.BytesIO()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data):
        if not self._started_early:
            return super().handleContentChunk(data)
        if self.body_sink is not None:
            self.body_sink.body_chunk(data)

    def body_complete(self) -> None:
        sink, self.body_sink = self.body_sink, None
        if sink is not None:
            sink.body_complete()

    def connectionLost(self, reason):
        self.caller_gone = True
        told, self.on_caller_gone = self.on_caller_gone, None
        super().connectionLost(reason)
        if told is not None and not self.finished:
            told(reason)
            # Twisted logs a request when it finishes, which this one never will: its line
            # says 499 (nginx's "client closed request") unless a status went out already or
            # the relay cut the answer (RelayStream.fail), and the metric counts an answer cut
            # after it began as "aborted".
            if self.startedWriting:
                self.cut = True
            elif not self.cut:
                self.code = 499
            self.site.log(self)

    def write(self, data):
        head = self.proxied_head
        if head is not None:
            self.proxied_head = None
            if not self._write_proxied_head(head):
                return
        super().write(data)

    def _write_proxied_head(self, head: Sequence[tuple[bytes, bytes]]) -> bool:
        """
        The first write of a proxied answer: its status line and C{head} go to the channel
        (which holds them for the first body bytes), choosing chunked framing as
        C{twisted.web.http.Request.write} does; False when no body may follow.
        """
        if self.startedWriting or self.finished or self.caller_gone:
            return True  # (twisted.web's write says what is wrong, or drops the bytes)
        self.startedWriting = 1
        own = [(name, value) for name, values in self.responseHeaders.getAllRawHeaders() for value in values]
        if own:
            # The relay's own (C{Connection: close} ...), unless the app set the same name;
            # never a Server, Date or Content-Type of twisted.web's over the app's.
            names = {name.lower() for name, _ in head} | _APP_ONLY
            head = [pair for pair in own if pair[0].lower() not in names] + list(head)
        code = self.code
        bodiless = self.method == b"HEAD" or code in NO_BODY_CODES
        if self.clientproto == b"HTTP/1.1" and not self.proxied_length and not bodiless:
            head = [*head, (b"Transfer-Encoding", b"chunked")]
            self.chunked = 1
        self.channel.writeHeaders(self.clientproto, b"%d" % code, self.code_message, head)
        if bodiless:
            self.write = _no_body  # (as twisted.web's write does)
            return False
        return True

    def finish(self):
        if self.channel is not None and not self._body_done:
            # Answering before the whole body arrived: the connection cannot be reused.
            self.channel.persistent = False
        return super().finish()

    def abort(self) -> None:
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abortConnection()



class RelayChannel(ChannelTimers, http.HTTPChannel):
    """
    An HTTP channel that starts processing public requests at the end of the headers.

    A request head must be complete within the idle timeout of its first byte: the idle
    timer alone restarts on every byte, so a caller trickling header lines (slowloris)
    would hold the connection forever.
    """

    log = Logger()  # (not HTTPChannel's private _log)
    _pg_early: RelayRequest | None = None
    _pg_in_head = True
    #: Where bytes past an upgrade request's head go (its stream, then its L{UpgradePipe}),
    #: instead of waiting in the channel for a next request that is never parsed.
    raw_sink = None

    _pg_host = None
    _pg_secure = None
    _pg_refused = False   # a line over MAX_LENGTH was answered: what follows is dropped

    def getHost(self):
        # Read once per connection: tcp.Server.getHost calls getsockname() every time, and
        # twisted.web's Request asks for every request.
        if self._pg_host is None:
            self._pg_host = super().getHost()
        return self._pg_host

    _pg_peer = None

    def getPeer(self):
        # Once per connection too: twisted.web's Request asks for every request, and each
        # answer is a new address object made through the transport (and the connection
        # gate's wrapper).  The first request's head has been read by then, so a PROXY
        # header (a haproxy: listener) has already named the caller.
        if self._pg_peer is None:
            self._pg_peer = super().getPeer()
        return self._pg_peer

    def isSecure(self):
        # As HTTPChannel's (an ISSLTransport adaptation per call), once per connection.
        if self._pg_secure is None and self.transport is not None:
            self._pg_secure = super().isSecure()
        return bool(self._pg_secure)

    _pg_head: bytes | None = None   # a response head not yet written (writeHeaders)

    def connectionMade(self):
        super().connectionMade()
        # A response goes to the kernel when it is written, in one send with its head
        # (writeHeaders below), instead of being queued for the reactor's next turn: no
        # epoll_ctl pair and write-event round per response (pipegate/sockets.py).
        eager_writes(self.transport)

    def writeHeaders(self, version, code, reason, headers):
        # Kept until the first body write (or the request's end, requestDone), so that the
        # head and the body's first chunk are one write (twisted.web writes them as two).
        # C{headers}: twisted.web's C{Headers}, or a proxied answer's (name, value) pairs
        # (RelayRequest.proxied_head).
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        if isinstance(headers, Headers):
            for name, values in headers.getAllRawHeaders():
                for value in values:
                    parts += (name, b": ", value, b"\r\n")
        else:
            for name, value in headers:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self._pg_flush_head()
        self._pg_head = b"".join(parts)

    def _pg_flush_head(self):
        head, self._pg_head = self._pg_head, None
        if head is not None and self.transport is not None:
            self.transport.write(head)

    def write(self, data):
        head = self._pg_head
        if head is not None:
            self._pg_head = None
            data = head + data
        self.transport.write(data)

    def writeSequence(self, iovec):
        # (A chunk of a chunked body: one write, so that it too goes out eagerly; Twisted's
        # own writeSequence queues it, to be joined with what is queued at the next turn.)
        self.write(b"".join(iovec))

    def requestDone(self, request):
        self._pg_flush_head()  # a head without a body (HEAD, 204, 304, an empty answer)
        period, self._pg_idle_period = self._pg_idle_period, None
        if period and self.persistent:
            # (before twisted.web reads a pipelined next request, which suspends it again)
            self.setTimeout(period)
        elif not self.persistent and self.transport is not None and self.site.timeOut:
            # The connection closes after this answer; twisted.web's loseConnection waits until
            # the caller has read all of it, and one that never reads would hold it (its fd, its
            # cap units) for ever.  The idle timeout (suspended for the request) stays off.
            self._pg_unread = UnreadAbort(self.site.reactor, self.site.timeOut, self.transport, self._pg_unread_log,
                                          self.site.relay_resource.relay.config.min_download_rate)
        super().requestDone(request)

    def rawDataReceived(self, data):
        if self.raw_sink is not None:
            self.raw_sink(data)
        else:
            super().rawDataReceived(data)

    def lineReceived(self, line):
        # Private names of HTTPChannel (__first_line, _path; Twisted 26.10.0), as in
        # allContentReceived below; test_http_e2e's raw UTF-8 test fails if they change.
        raw = raw_request_line(line) if _compat.first_line_pending(self) and line else None
        if raw is None:
            return super().lineReceived(line)
        encoded, target = raw
        super().lineReceived(encoded)
        if _compat.request_path(self) == encoded.split(b" ")[1]:
            _compat.set_request_path(self, target)  # the app's bytes go on as the caller sent them

    def lineLengthExceeded(self, line):
        """
        A request or header line over C{MAX_LENGTH} (16 KiB): 414 or 431, and the end of the
        connection (twisted.web closes it without a word).  On plain TCP a FIN follows and the
        caller's further bytes are dropped until it closes, within the idle timeout (a close
        with bytes unread sends a RST, which can destroy the answer before it is read).
        """
        self._pg_refused = True
        self._pg_cancel_head_timer()
        status = b"414 URI Too Long" if _compat.first_line_pending(self) else b"431 Request Header Fields Too Large"
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        if IHalfCloseableDescriptor.providedBy(self.transport) and not self.isSecure():   # (TLS: no half-close)
            self.transport.loseWriteConnection()
        else:
            self.loseConnection()

    def dataReceived(self, data):
        if self._pg_refused:
            return
        if self._pg_in_head and not self._pg_head_armed and data and self.timeOut:
            # One timer per connection, moved on at each head's first byte (a reset to a
            # later time is an attribute write; a new DelayedCall and a cancel per request
            # are not) and left to fire harmlessly between heads.
            self._pg_head_armed = True
            timer = self._pg_head_timer
            if timer is not None and timer.active():
                timer.reset(self.timeOut)
            else:
                self._pg_head_timer = self.callLater(self.timeOut, self._pg_head_late)
        super().dataReceived(data)

    def connectionLost(self, reason):
        plain_writes(self.transport)
        self._pg_head = None
        self._pg_cancel_head_timer()
        super().connectionLost(reason)
        self._pg_idle = cancel(self._pg_idle)
        self._pg_unread = cancel(self._pg_unread)

    def allHeadersReceived(self):
        self._pg_in_head = False
        self._pg_head_armed = False  # (the timer stays, for the next head: dataReceived)
        req = self.requests[-1]
        limit = self.site.relay_resource.relay.config.max_body_bytes
        if limit and self.length is not None and self.length > limit:
            # The 413 goes out at once (public_request); Twisted would send
            # "100 Continue" first and invite the body it is about to refuse.
            req.requestHeaders.removeHeader(b"expect")
        command, path, version = _compat.parsed_request_line(self)
        early = self.site.relay_resource.wants_early_start(req, command, path, self.length)
        if not early or req.asks_upgrade():
            # A login or an upgrade may take the connection over: this channel then never
            # hears of its end (connectionLost goes to the new protocol).
            self._pg_cancel_head_timer()
            if self.length == 0:
                # Nor its idle timer's, which is suspended (setTimeout(None)) at once for this
                # bodiless head (TimeoutMixin's would be cancelled then): it goes now, and its
                # period is kept, so that a head answered without a takeover (404, 403, 429, 503
                # at once) gets it back in requestDone: the connection is still timed out.
                if self.timeOut:
                    self._pg_idle_period = self.setTimeout(None)
                self._pg_idle = cancel(self._pg_idle)
        if early:
            req._started_early = True
            req._body_done = self.length == 0
            self._pg_early = req
        super().allHeadersReceived()
        if early:
            req.requestReceived(command, path, version)

    def allContentReceived(self):
        self._pg_in_head = True   # the next bytes start the next request's head
        req, self._pg_early = self._pg_early, None
        if req is None:
            return super().allContentReceived()
        # The same resets as HTTPChannel.allContentReceived, without processing again.
        _compat.reset_request_parser(self)
        req._body_done = True
        if req.finished or req not in self.requests:
            # Already answered: requestDone has moved the channel on (next request or close).
            return
        _compat.hold_for_request(self)
        self.setRawMode()
        if not req.caller_gone:
            req.body_complete()


class RelayResource(resource.Resource):
    """Dispatches every request: health, connector logins, public traffic."""

    isLeaf = True

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay
        factory = WebSocketServerFactory()
        factory.protocol = ConnectorLink
        factory.relay = relay
        factory.noisy = False
        interval = relay.config.ping_interval
        factory.setProtocolOptions(
            maxFramePayloadSize=frames.MAX_FRAME_SIZE,
            maxMessagePayloadSize=frames.MAX_FRAME_SIZE,
            autoPingInterval=interval or None, autoPingTimeout=interval or None,
            openHandshakeTimeout=30, closeHandshakeTimeout=5,
        )
        self.websocket = WebSocketResource(factory)

    def is_login(self, request: server.Request) -> bool:
        offered = b",".join(request.requestHeaders.getRawHeaders(b"sec-websocket-protocol", []))
        return frames.SUBPROTOCOL.encode() in [p.strip() for p in offered.split(b",")]

    def wants_early_start(self, request: RelayRequest, method: bytes, uri: bytes,
                          length: int | None = 0) -> bool:
        """
        Every request starts at the end of its head, so that no body is read (let alone
        spooled to a file) before it is routed; only a connector login without a body goes
        the usual twisted.web way, for Autobahn.
        """
        return not (length == 0 and request.asks_upgrade() and self.is_login(request))

    def render(self, request: RelayRequest):
        if routing.is_health(request.uri, request.host_header(), self.relay.config.domain) and not request.asks_upgrade():
            own_headers(request)
            if request.method not in (b"GET", b"HEAD"):
                request.setResponseCode(http.NOT_ALLOWED)
                request.setHeader(b"allow", b"GET, HEAD")
                return b""
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"status": "ok"}).encode()
        if request.asks_upgrade() and self.is_login(request):
            if getattr(request, "_started_early", False):
                request.body_sink = None
                plain(request, http.BAD_REQUEST, "a connector login carries no body")
                return server.NOT_DONE_YET
            return self.websocket.render(request)
        self.relay.public_request(request)
        return server.NOT_DONE_YET


class RelaySite(server.Site):
    requestFactory = RelayRequest
    protocol = RelayChannel
    noisy = False   # no "Starting factory <...RelaySite object at 0x...>": the startup line names the listener

    def __init__(self, relay: Relay) -> None:
        self.relay_resource = RelayResource(relay)
        self.trusted_proxies = relay.config.trusted_proxies
        super().__init__(self.relay_resource, timeout=relay.config.idle_timeout or None,
                         logFormatter=redacting_formatter, reactor=relay.clock)
        self._access_log = relay.config.access_log

    def log(self, request):
        if request.code != 101:  # connector logins are counted as links
            self.relay_resource.relay.stats.inc("requests", "aborted" if request.cut else str(request.code))
        if self._access_log:
            super().log(request)

    def log_upgrade(self, request: RelayRequest, pipe: UpgradePipe) -> None:
        """
        One access line for a passthrough connection, written when it closes: the handshake
        and the app's answer in combined log format (bytes = all bytes sent to the caller),
        then how long it lasted and the bytes each way.
        """
        if pipe.status != 101:
            self.relay_resource.relay.stats.inc("requests", str(pipe.status or 499))
        if not self._access_log:
            return
        request.code = pipe.status or 499
        request.sentLength = pipe.bytes_down
        request.upgrade_summary = (f" upgrade duration={pipe.clock.seconds() - pipe.started:.3f}s "
                                   f"up={pipe.bytes_up} down={pipe.bytes_down}")
        super().log(request)


def redacting_formatter(timestamp: str, request: server.Request) -> str:
    """Combined log format with any C{token=} value in the URI replaced."""
    original = request.uri
    request.uri = _TOKEN_IN_QUERY.sub(rb"\1<redacted>", original)
    try:
        line = http.combinedLogFormatter(timestamp, request) + getattr(request, "upgrade_summary", "")
    finally:
        request.uri = original
    decision = getattr(request, "decision", None)
    return line if decision is None else f'{line} "{decision}"'
