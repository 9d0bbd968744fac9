"""
The public HTTP relay (C{twistd pipegate-server}).

One twisted.web L{Site} serves C{/healthz}, connector logins (Autobahn WebSocket with
subprotocol C{pipegate.v1}) and public traffic for C{/<connection-id>/...}.  Public
requests are streamed: processing starts as soon as the headers are in, so request
bodies go to the connector chunk by chunk within the stream's credit window instead of
being buffered first.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import attrs
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http, resource, server

from pipegate import auth
from pipegate.core import window
from pipegate.http import frames, routing
from pipegate.http.forwarded import NOBODY, TrustedProxies
from pipegate.drain import Drainer
from pipegate.stats import Stats
from pipegate.policy import EMPTY, Policy, PolicyError, decide, normalize_ip
from pipegate.throttle import BucketPool
from pipegate.core.budget import LogThrottle, source_key
from pipegate.http.pipe import FrameLink, cancel_close_timer
from pipegate.http import visitors
from pipegate.http.ownership import Holder
from pipegate.http.tunnels import Tunnel, Tunnels
from pipegate.http.streams import RelayStream, plain
from pipegate.http.upgrade import UpgradePipe

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


@attrs.frozen
class RelayConfig:
    jwt: auth.JWTSettings
    domain: str | None = None
    max_body_bytes: int = 0
    max_in_flight: int = 100
    request_timeout: float = 300.0
    offline_grace: float = 0.0
    ping_interval: float = 20.0
    idle_timeout: float = 60.0
    access_log: bool = False
    policy: Policy = EMPTY              # ingress policy for public callers (deny -> 403)
    tunnel_rate: float = 0.0            # bytes/s per tunnel and direction; 0 = unlimited
    drain_timeout: float = 30.0         # seconds requests in flight may take to finish on stop
    max_window: int = frames.MAX_WINDOW        # credit a response's window may grow to
    window_budget: int = frames.WINDOW_BUDGET  # growth shared by all responses in flight
    trusted_proxies: TrustedProxies = NOBODY   # peers whose X-Forwarded-For/-Proto are believed
    upgrade_idle_timeout: float = 300.0 # seconds an upgraded (101) pipe may carry no byte; 0 = forever
    caller_share: int = 50              # % of max_in_flight one caller IP's waiting requests may hold

    @property
    def per_caller(self) -> int:
        """Slots of one tunnel that requests from one caller IP may hold while waiting."""
        return max(1, self.max_in_flight * self.caller_share // 100)


class Relay(service.Service, Drainer):
    """
    The relay's state: tunnels by id, and the policies applied to public requests.
    As a service, stopping it drains: connectors get GOAWAY, requests in flight have up
    to C{drain_timeout} seconds to finish, then the rest are cut and every link closes.
    """

    log = Logger()

    def __init__(self, config: RelayConfig, clock: IReactorTime) -> None:
        self.config = config
        self.clock = clock
        self.stopping = False
        self.pool = BucketPool()
        self.window_budget = window.GrowthBudget(config.window_budget)
        self.stats = Stats()
        self.tunnels = Tunnels(config.jwt, config.per_caller, clock, self.stats)
        self.share_log = LogThrottle(10.0)

    def _buckets(self, request, tunnel_id: str) -> tuple[list, list, list] | None:
        """
        (upload buckets, download buckets, keys to release) for a public request, or None
        when the ingress policy refuses the caller.
        """
        config = self.config
        now = self.clock.seconds()
        wanted = []
        if not config.policy.empty:
            ip = getattr(request.getClientAddress(), "host", "")
            try:
                port = getattr(request.getHost(), "port", 0)  # 0 on a unix: listener
                decision = decide([config.policy], ip, port, "tcp", now * 1000)
            except PolicyError:
                return None
            if not decision.allow:
                return None
            limit = decision.limit
            if limit is not None:
                ip = str(normalize_ip(ip))
                if limit.shapes_upload:
                    wanted.append(("up", (ip, "up", limit.rate, limit.burst), limit.rate, limit.burst))
                if limit.shapes_download:
                    wanted.append(("down", (ip, "down", limit.rate, limit.burst), limit.rate, limit.burst))
        if config.tunnel_rate:
            for direction in ("up", "down"):
                wanted.append((direction, ("tunnel", tunnel_id, direction), config.tunnel_rate,
                               config.tunnel_rate))
        up, down, keys = [], [], []
        for direction, key, rate, burst in wanted:
            bucket = self.pool.acquire(key, rate, burst, now)
            (up if direction == "up" else down).append(bucket)
            keys.append(key)
        return up, down, keys

    # -- public requests
    def public_request(self, request: RelayRequest) -> None:
        routed = routing.route(request.uri, request.getHeader(b"host"), request.method,
                               bool(request.requestHeaders.getRawHeaders(b"upgrade")), self.config.domain)
        if isinstance(routed, routing.Redirect):
            request.body_sink = None
            request.setHeader(b"location", routed.location)
            plain(request, http.MOVED_PERMANENTLY, "moved to " + routed.location.decode("latin-1"))
            return
        if isinstance(routed, str):
            request.body_sink = None
            plain(request, http.NOT_FOUND if routed == "unknown tunnel" else http.BAD_REQUEST,
                   routed)
            return
        tunnel_id, target, prefix = routed.tunnel_id, routed.target, routed.prefix
        if self.stopping:
            plain(request, http.SERVICE_UNAVAILABLE, "relay shutting down")
            return
        length = request.declared_length
        if self.config.max_body_bytes and length is not None and length > self.config.max_body_bytes:
            plain(request, http.REQUEST_ENTITY_TOO_LARGE,
                   f"request body exceeds {self.config.max_body_bytes} bytes")
            return
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or not tunnel.links:
            if self.config.offline_grace <= 0:
                plain(request, http.NOT_FOUND, "tunnel offline")
                return
            tunnel = self.tunnels.tunnel(tunnel_id)
        if tunnel.in_flight >= self.config.max_in_flight:
            plain(request, http.SERVICE_UNAVAILABLE, "too many requests in flight for this tunnel")
            return
        caller = source_key(getattr(request.getClientAddress(), "host", "") or "")   # IPv6 by its /64
        tunnel.callers.per_source = self.config.per_caller
        if tunnel.callers.acquire(caller) is not None:
            self._share_refused(request, tunnel)
            return
        shaping = self._buckets(request, tunnel_id)
        if shaping is None:
            tunnel.callers.release(caller)
            self.stats.inc("policy_denials")
            self.tunnels.count_caller(request, tunnel, "ingress_denied")
            plain(request, http.FORBIDDEN, "forbidden by ingress policy")
            self.tunnels.forget_if_idle(tunnel)
            return
        refusal = self.tunnels.visitor_refusal(tunnel, request)
        if refusal is not None:
            for key in shaping[2]:
                self.pool.release(key)
            tunnel.callers.release(caller)
            request.body_sink = None
            plain(request, *refusal)
            self.tunnels.forget_if_idle(tunnel)
            return
        # An Upgrade with a body is carried as a plain request (the Upgrade header is dropped
        # as hop-by-hop, which RFC 9110 7.8 allows): its body is streamed and bounded like any.
        upgrade = bool(request.requestHeaders.getRawHeaders(b"upgrade")) and request.declared_length == 0
        stream = RelayStream(self, tunnel, request, target, prefix, upgrade)
        stream.caller = caller
        stream.up_buckets, stream.down_buckets, stream.bucket_keys = shaping
        tunnel.in_flight += 1
        request.body_sink = stream
        if tunnel.links:
            stream.assign(tunnel.pick())
        else:
            stream.wait_for_connector()

    def _share_refused(self, request: RelayRequest, tunnel: Tunnel) -> None:
        self.stats.inc("caller_share_refusals")
        held_back = self.share_log.allow(self.clock.seconds())
        if held_back is not None:
            self.log.warn("a caller holds {share} waiting requests of tunnel {tunnel_id} (--caller-share "
                          "{percent}% of --max-in-flight); refusing more with 503 ({more} more refused since "
                          "the last line)", share=self.config.per_caller, tunnel_id=tunnel.id,
                          percent=self.config.caller_share, more=held_back)
        plain(request, http.SERVICE_UNAVAILABLE, "too many waiting requests from your address for this tunnel")
        self.tunnels.forget_if_idle(tunnel)

    def stream_done(self, stream: RelayStream) -> None:
        stream.release_share()
        for key in stream.bucket_keys:
            self.pool.release(key)
        stream.tunnel.in_flight -= 1
        if stream in stream.tunnel.waiting:
            stream.tunnel.waiting.remove(stream)
        self.tunnels.forget_if_idle(stream.tunnel)

    def stopService(self):
        super().stopService()
        self.stopping = True
        for tunnel in list(self.tunnels.values()):
            for stream in list(tunnel.waiting):
                stream.fail(http.SERVICE_UNAVAILABLE, "relay shutting down")
            for link in list(tunnel.links):
                link.announce_going_away("relay shutting down")
        in_flight = sum(t.in_flight for t in self.tunnels.values())
        if in_flight:
            self.log.info("draining: {count} request(s) in flight, up to {timeout:g} s",
                          count=in_flight, timeout=self.config.drain_timeout)
        return self.start_drain(self.clock, self.config.drain_timeout,
                                lambda: not any(t.in_flight for t in self.tunnels.values()),
                                self._drained)

    def _drained(self, in_time: bool) -> None:
        cut = 0
        for link in list(self.tunnels.leaving) + [link for t in self.tunnels.values() for link in t.links]:
            cut += len(link.streams)
            link.go_away("relay shutting down: drain timeout")
        if cut:
            self.stats.inc("drain_cut", amount=cut)
            self.log.warn("drain timeout: {count} request(s) cut (503, or the connection closed "
                          "when the response had begun)", count=cut)
        elif in_time:
            self.log.info("drained")


class RelayRequest(server.Request):
    """
    A request whose processing starts when its headers are complete (see
    L{RelayChannel}); body chunks then go to C{body_sink} as they arrive.
    """

    body_sink: RelayStream | None = None
    declared_length: int | None = 0
    decision: str | None = None   # an ingress or visitor policy outcome, for the access log
    caller_gone = False
    _started_early = False
    _body_done = True
    _parsePOSTFormSubmission = False
    _caller: Any = None

    def _trusted(self) -> TrustedProxies:
        site = getattr(self.channel, "site", None)
        return getattr(site, "trusted_proxies", NOBODY)

    def getClientAddress(self):
        """
        The public caller: the TCP peer (C{self.client}), or, when that peer is a proxy
        named by C{--trusted-proxy}, the caller its C{X-Forwarded-For} names (port 0).
        The ingress policy, per-IP shaping and the access log go by this address.
        """
        if self._caller is None:
            peer = self.client
            self._caller = peer
            if isinstance(peer, (IPv4Address, IPv6Address)):
                ip = self._trusted().caller(
                    peer.host, self.requestHeaders.getRawHeaders(b"x-forwarded-for", []))
                if ip != peer.host:
                    kind = IPv6Address if ":" in ip else IPv4Address
                    self._caller = kind("TCP", ip, 0)
        return self._caller

    def caller_scheme(self) -> bytes:
        """C{https} or C{http}: as the caller reached the relay, or its trusted proxy."""
        seen = b"https" if self.isSecure() else b"http"
        return self._trusted().scheme(getattr(self.client, "host", ""), seen,
                                      self.requestHeaders.getRawHeaders(b"x-forwarded-proto", []))

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
        super().connectionLost(reason)

    def finish(self):
        if self.channel is not None and not self._body_done:
            # Answering before the whole body arrived: the connection cannot be reused.
            self.channel.persistent = False
        return super().finish()

    def abort(self) -> None:
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.abortConnection()



class RelayChannel(http.HTTPChannel):
    """
    An HTTP channel that starts processing public requests at the end of the headers.

    A request head must be complete within the idle timeout of its first byte: the idle
    timer alone restarts on every byte, so a caller trickling header lines (slowloris)
    would hold the connection forever.
    """

    _pg_early: RelayRequest | None = None
    _pg_in_head = True
    _pg_head_timer = None
    #: Where bytes past an upgrade request's head go (its stream, then its L{UpgradePipe}),
    #: instead of waiting in the channel for a next request that is never parsed.
    raw_sink = None

    def rawDataReceived(self, data):
        if self.raw_sink is not None:
            self.raw_sink(data)
        else:
            super().rawDataReceived(data)

    def lineReceived(self, line):
        # Private names of HTTPChannel (__first_line, _path; Twisted 26.10.0), as in
        # allContentReceived below; test_http_e2e's raw UTF-8 test fails if they change.
        raw = raw_request_line(line) if self._HTTPChannel__first_line and line else None
        if raw is None:
            return super().lineReceived(line)
        encoded, target = raw
        super().lineReceived(encoded)
        if getattr(self, "_path", None) == encoded.split(b" ")[1]:
            self._path = target  # the app's bytes go on as the caller sent them

    def dataReceived(self, data):
        if self._pg_in_head and self._pg_head_timer is None and data and self.timeOut:
            self._pg_head_timer = self.callLater(self.timeOut, self._pg_head_late)
        super().dataReceived(data)

    def _pg_head_late(self):
        self._pg_head_timer = None
        self._log.info("request head from {peer} not complete within {seconds:g} s; closing",
                       peer=str(self.transport.getPeer()), seconds=self.timeOut)
        self.timeoutConnection()

    def timeoutConnection(self):
        # The head timer and the idle timer fire together when a caller sent its bytes at
        # once and stalled (a TLS ClientHello to this plain port); a second timeout would
        # replace, and so leak, the first one's pending forced abort.  (_abortingCall is
        # HTTPChannel's, Twisted 26.10.0; test_http_e2e LoginFailures.test_wss_to_a_plain_port
        # leaves the reactor dirty if it changes.)
        if self._abortingCall is None:
            super().timeoutConnection()

    def _pg_cancel_head_timer(self):
        timer, self._pg_head_timer = self._pg_head_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason):
        self._pg_cancel_head_timer()
        super().connectionLost(reason)

    def allHeadersReceived(self):
        self._pg_in_head = False
        self._pg_cancel_head_timer()
        req = self.requests[-1]
        limit = self.site.relay_resource.relay.config.max_body_bytes
        if limit and self.length is not None and self.length > limit:
            # The 413 goes out at once (public_request); Twisted would send
            # "100 Continue" first and invite the body it is about to refuse.
            req.requestHeaders.removeHeader(b"expect")
        early = self.site.relay_resource.wants_early_start(req, self._command, self._path, self.length)
        if early:
            req._started_early = True
            req._body_done = self.length == 0
            self._pg_early = req
        super().allHeadersReceived()
        if early:
            req.requestReceived(self._command, self._path, self._version)

    def allContentReceived(self):
        self._pg_in_head = True   # the next bytes start the next request's head
        req, self._pg_early = self._pg_early, None
        if req is None:
            return super().allContentReceived()
        # The same resets as HTTPChannel.allContentReceived, without processing again.
        self.length = 0
        self._receivedHeaderCount = 0
        self._receivedHeaderSize = 0
        self._HTTPChannel__first_line = 1
        self._transferDecoder = None
        del self._command, self._path, self._version
        req._body_done = True
        if req.finished or req not in self.requests:
            # Already answered: requestDone has moved the channel on (next request or close).
            return
        if self.timeOut:
            self._savedTimeOut = self.setTimeout(None)
        self._handlingRequest = True
        self.setRawMode()
        if not req.caller_gone:
            req.body_complete()


class ConnectorLink(FrameLink, WebSocketServerProtocol):
    """The relay's end of one connector's WebSocket."""

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.tunnel_id = ""
        self.holder = Holder(None, False, visitors.EMPTY)
        self.streams: dict[int, RelayStream] = {}
        self._next_stream = 1
        self._open = False
        self._going_away = ""

    def connectionMade(self):
        super().connectionMade()
        # The transport came from twisted.web, whose HTTPChannel is still registered as
        # its producer; left there, a full write buffer would pause reading for good.
        if self.transport is not None and getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()

    def onConnect(self, request):
        relay: Relay = self.factory.relay
        if frames.SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(400, f"subprotocol {frames.SUBPROTOCOL} required")
        # The id is the last path segment, so a proxy may mount the relay under a prefix.
        path_id = request.path.rstrip("/").rsplit("/", 1)[-1] or None
        token = None
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            token = header[7:].strip()
        elif request.params.get("token"):
            token = request.params["token"][0]
        try:
            claims = relay.tunnels.authenticate_claims(path_id, token)
            try:
                policy = visitors.VisitorPolicy.decode(request.headers.get(visitors.HEADER.lower()))
            except visitors.VisitorPolicyError as e:
                relay.stats.inc("admission_failures", "bad_policy")
                raise ConnectionDeny(400, f"bad {visitors.HEADER}: {e}")
            holder = Holder(claims.jti, claims.shared, policy)
            relay.tunnels.admit(claims.sub, holder)
        except ConnectionDeny as e:
            self._log.info("connector login refused ({code}): {reason}", code=e.code, reason=e.reason)
            raise
        self.tunnel_id, self.holder = claims.sub, holder
        # The answer tells a connector that declared a policy that this relay enforces it.
        return frames.SUBPROTOCOL, {visitors.HEADER: visitors.ACCEPTED}

    def onOpen(self):
        self._open = True
        self.link_opened()
        self.factory.relay.tunnels.attach(self)
        if self.factory.relay.stopping:
            self.announce_going_away("relay shutting down")

    def send(self, frame: frames.Frame) -> None:
        if self._open:
            self.send_message(frame)

    def add_stream(self, stream: RelayStream) -> int:
        stream_id = self._next_stream
        self._next_stream += 1
        self.streams[stream_id] = stream
        return stream_id

    def remove_stream(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if self._going_away and not self.streams and self._open:
            self.go_away(self._going_away)

    def stream_closed(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream._finish()

    def onMessage(self, payload, isBinary):
        try:
            if not isBinary:
                raise frames.FrameError("text message")
            frame = frames.decode(payload)
            if isinstance(frame, frames.RequestHead):
                raise frames.FrameError("REQUEST_HEAD sent to the relay")
            if isinstance(frame, frames.GoAway):
                self._log.info("connector for {tunnel_id} going away: {reason}",
                               tunnel_id=self.tunnel_id, reason=frame.reason)
                self.factory.relay.tunnels.detach(self)
                # Still within reach of --revoked and of the relay's own drain cut while it
                # finishes its streams (_drop discards it); it said GOAWAY itself, so the relay
                # sends none back when it cuts it (go_away).
                self._going_away = self._going_away or "connector going away"
                self.factory.relay.tunnels.leaving.add(self)
                return
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream.frame_received(frame)
        except Exception as e:
            if not isinstance(e, frames.FrameError):
                self._log.failure("error handling a frame from {tunnel_id}", tunnel_id=self.tunnel_id)
            self._log.warn("protocol error from connector of {tunnel_id}: {reason}; closing link",
                           tunnel_id=self.tunnel_id, reason=str(e))
            self._drop(http.BAD_GATEWAY, "connector protocol error")
            self.sendClose(frames.PROTOCOL_ERROR, str(e)[:100])

    def announce_going_away(self, reason: str) -> None:
        """GOAWAY: no new requests here; the link closes once its last request is done."""
        if self._going_away or not self._open:
            return
        self._going_away = reason
        self.send(frames.GoAway(reason.encode()))
        self.factory.relay.tunnels.detach(self)  # no new streams are assigned to it
        self.factory.relay.tunnels.leaving.add(self)
        if not self.streams:
            self.go_away(reason)

    def go_away(self, reason: str) -> None:
        if not self._going_away:
            self.send(frames.GoAway(reason.encode()))
        self._going_away = self._going_away or reason
        self._drop(http.SERVICE_UNAVAILABLE, reason)
        self.sendClose(1000, reason)

    def _drop(self, code: int, reason: str) -> None:
        was_open, self._open = self._open, False
        self.factory.relay.tunnels.leaving.discard(self)
        if was_open:
            self.factory.relay.tunnels.detach(self)
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.fail(code, reason)

    def onClose(self, wasClean, code, reason):
        cancel_close_timer(self)
        self._drop(http.BAD_GATEWAY, "connector disconnected")


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

    def wants_early_start(self, request: server.Request, method: bytes, uri: bytes,
                          length: int | None = 0) -> bool:
        """
        Every request starts at the end of its head, so that no body is read (let alone
        spooled to a file) before it is routed; only a connector login without a body goes
        the usual twisted.web way, for Autobahn.
        """
        return not (length == 0 and request.requestHeaders.getRawHeaders(b"upgrade")
                    and self.is_login(request))

    def render(self, request: server.Request):
        if routing.is_health(request.uri, request.getHeader(b"host"), self.relay.config.domain) and not request.requestHeaders.hasHeader(b"upgrade"):
            if request.method not in (b"GET", b"HEAD"):
                request.setResponseCode(http.NOT_ALLOWED)
                request.setHeader(b"allow", b"GET, HEAD")
                return b""
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"status": "ok"}).encode()
        if request.requestHeaders.getRawHeaders(b"upgrade") and self.is_login(request):
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

    def __init__(self, relay: Relay) -> None:
        self.relay_resource = RelayResource(relay)
        self.trusted_proxies = relay.config.trusted_proxies
        super().__init__(self.relay_resource, timeout=relay.config.idle_timeout or None,
                         logFormatter=redacting_formatter, reactor=relay.clock)
        self._access_log = relay.config.access_log

    def log(self, request):
        if request.code != 101:  # connector logins are counted as links
            self.relay_resource.relay.stats.inc("requests", str(request.code))
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


