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
import uuid
from typing import Any

import attrs
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web import http, resource, server
from zope.interface import implementer

from pipegate import auth
from pipegate.core import window
from pipegate.http import frames, routing
from pipegate.http.forwarded import NOBODY, TrustedProxies
from pipegate.drain import Drainer
from pipegate.stats import Stats
from pipegate.policy import EMPTY, Policy, PolicyError, decide, normalize_ip
from pipegate.throttle import BucketPool
from pipegate.core.budget import LogThrottle, source_key
from pipegate.http.pipe import FrameLink, StreamPipe, cancel_close_timer, filter_headers
from pipegate.http import visitors
from pipegate.http.ownership import Holder
from pipegate.http.tunnels import Tunnel, Tunnels
from pipegate.http.upgrade import HANDSHAKE, MAX_HELD, UpgradePipe, take_over

_TOKEN_IN_QUERY = re.compile(rb"(?i)(token=)[^&\s]*")
# What a connector may put in a response head (RFC 9110 token names; no CR, LF or NUL in
# values or the reason): anything else would split the caller's response.
_HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSAFE_TEXT = re.compile(rb"[\r\n\x00]")
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


def _plain(request: server.Request, code: int, message: str) -> None:
    """Answer with a short text/plain body and finish."""
    body = message.encode() + b"\n"
    request.setResponseCode(code, b"Too Many Requests" if code == 429 else None)  # not in twisted's table
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    request.write(body)
    request.finish()


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
            _plain(request, http.MOVED_PERMANENTLY, "moved to " + routed.location.decode("latin-1"))
            return
        if isinstance(routed, str):
            request.body_sink = None
            _plain(request, http.NOT_FOUND if routed == "unknown tunnel" else http.BAD_REQUEST,
                   routed)
            return
        tunnel_id, target, prefix = routed.tunnel_id, routed.target, routed.prefix
        if self.stopping:
            _plain(request, http.SERVICE_UNAVAILABLE, "relay shutting down")
            return
        length = request.declared_length
        if self.config.max_body_bytes and length is not None and length > self.config.max_body_bytes:
            _plain(request, http.REQUEST_ENTITY_TOO_LARGE,
                   f"request body exceeds {self.config.max_body_bytes} bytes")
            return
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or not tunnel.links:
            if self.config.offline_grace <= 0:
                _plain(request, http.NOT_FOUND, "tunnel offline")
                return
            tunnel = self.tunnels.tunnel(tunnel_id)
        if tunnel.in_flight >= self.config.max_in_flight:
            _plain(request, http.SERVICE_UNAVAILABLE, "too many requests in flight for this tunnel")
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
            _plain(request, http.FORBIDDEN, "forbidden by ingress policy")
            self.tunnels.forget_if_idle(tunnel)
            return
        refusal = self.tunnels.visitor_refusal(tunnel, request)
        if refusal is not None:
            for key in shaping[2]:
                self.pool.release(key)
            tunnel.callers.release(caller)
            request.body_sink = None
            _plain(request, *refusal)
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
        _plain(request, http.SERVICE_UNAVAILABLE, "too many waiting requests from your address for this tunnel")
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

    def __init__(self, relay: Relay, tunnel: Tunnel, request: RelayRequest, target: bytes,
                 prefix: bytes, upgrade: bool) -> None:
        self.relay = relay
        self.tunnel = tunnel
        self.request = request
        self.target = target
        self.prefix = prefix
        self.upgrade = upgrade
        self.link: ConnectorLink | None = None
        self.stream_id = 0
        self.upload = window.SendWindow()
        # The response's window grows while the caller keeps up (docs/protocol.md 1.5).
        self.download = window.ReceiveWindow(max_window=relay.config.max_window, budget=relay.window_budget)
        self._paused_since = 0.0
        self._early: list[bytes] = []
        self._body_bytes = 0
        self._has_body = request.declared_length != 0
        self._body_done = not self._has_body
        self._end_sent = False
        self._responding = False
        self._paused = False
        self._done = False
        self._timer: IDelayedCall | None = None
        self.pipe: StreamPipe | None = None
        self._share_held = True
        self._held = bytearray()  # an upgrade's caller bytes past its head, until the pipe takes them
        if upgrade and request.channel is not None:
            # Whatever happens to the upgrade, the connection carries no further HTTP request.
            request.channel.persistent = False
            request.channel.raw_sink = self._hold_raw
        request.notifyFinish().addErrback(self._caller_gone)

    def release_share(self) -> None:
        """Give back the caller's slot (its answer head is in, or the stream is over)."""
        if self._share_held:
            self._share_held = False
            self.tunnel.callers.release(self.caller)

    def _hold_raw(self, data: bytes) -> None:
        self._held += data
        transport = self.request.channel.transport if self.request.channel else None
        if len(self._held) > MAX_HELD and transport is not None:
            transport.pauseProducing()

    # -- lifecycle
    def wait_for_connector(self) -> None:
        self.tunnel.waiting.append(self)
        self._pause_upload()
        self._arm(self.relay.config.offline_grace, http.NOT_FOUND, "tunnel offline")

    def assign(self, link: ConnectorLink) -> None:
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
            host=req.getHeader(b"host") or b"",
            prefix=self.prefix,
            correlation=uuid.uuid4().hex.encode(),
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
        self._arm(self.relay.config.request_timeout, http.GATEWAY_TIMEOUT,
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
        if not self.upload.blocked:
            self._resume_upload()
        self._maybe_send_end()

    def _arm(self, seconds: float, code: int, reason: str) -> None:
        if seconds <= 0:
            return
        timer = self._timer
        if timer is not None and timer.active() and timer.args == (code, reason):
            timer.reset(seconds)
        else:
            self._cancel_timer()
            self._timer = self.relay.clock.callLater(seconds, self._expired, code, reason)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self, code: int, reason: str) -> None:
        self._timer = None
        self.fail(code, reason, notify=http.GATEWAY_TIMEOUT)

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self.download.release()
        self._cancel_timer()
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
                self.pipe.transport.loseConnection()
            else:
                self.pipe.abort()
            return
        if self.request.caller_gone:
            return
        if self._responding:
            self.relay.stats.inc("requests", "aborted")
            self.request.unregisterProducer()
            self.request.abort()
        else:
            self.request.body_sink = None
            _plain(self.request, code, reason)

    def _caller_gone(self, failure: Any) -> None:
        if not self._done and self.link is not None:
            self.link.send(frames.Reset(self.stream_id, 499, b"caller went away"))
        self._finish()

    # -- request body (caller -> connector)
    def body_chunk(self, data: bytes) -> None:
        if self._done:
            return
        self._body_bytes += len(data)
        limit = self.relay.config.max_body_bytes
        if limit and self._body_bytes > limit:
            self.fail(http.REQUEST_ENTITY_TOO_LARGE, f"request body exceeds {limit} bytes", notify=413)
            return
        if self.link is None:
            self._early.append(data)
            self._pause_upload()
            return
        # A body still arriving is progress: the timeout is for silence, not for size.
        self._arm(self.relay.config.request_timeout, http.GATEWAY_TIMEOUT,
                  "the local app did not answer in time")
        self._send_body(data)

    def _send_body(self, data: bytes) -> None:
        self.relay.stats.inc("bytes", "up", len(data))
        for chunk in self.upload.write(data):
            self.link.send(frames.Data(self.stream_id, chunk))
        if self.upload.blocked:
            self._pause_upload()
        delay = self._charge(self.up_buckets, len(data))
        if delay > 0:
            self._pause_upload()
            self._upload_hold = self._hold(self._upload_hold, delay, self._upload_released, "up")

    def _charge(self, buckets, size: int) -> float:
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
        if not self._done and not self.upload.blocked:
            self._resume_upload()

    def _download_released(self) -> None:
        self._download_hold = None
        if not self._paused:
            self.resumeProducing()

    def body_complete(self) -> None:
        self._body_done = True
        self._maybe_send_end()

    def _maybe_send_end(self) -> None:
        if (self._body_done and not self._end_sent and self.link is not None
                and not self._done and self.upload.queued == 0):
            self._end_sent = True
            self.link.send(frames.End(self.stream_id))

    def _pause_upload(self) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None and not self._body_done:
            transport.pauseProducing()

    def _resume_upload(self) -> None:
        if self._upload_hold is not None:
            return  # shaped: _upload_released resumes it
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None and not self._body_done:
            transport.resumeProducing()

    # -- frames from the connector
    def frame_received(self, frame: frames.Frame) -> None:
        if self._done:
            return
        if self.pipe is not None:
            if isinstance(frame, frames.Reset):
                self.fail(http.BAD_GATEWAY, frame.reason.decode("utf-8", "replace"))
                return
            self.pipe.frame_received(frame)
            return
        if isinstance(frame, frames.ResponseHead):
            self._response_head(frame)
        elif isinstance(frame, frames.Data):
            if not self._responding:
                raise frames.FrameError("DATA before RESPONSE_HEAD")
            self.download.received(len(frame.data))
            self.relay.stats.inc("bytes", "down", len(frame.data))
            self._arm(self.relay.config.request_timeout, http.GATEWAY_TIMEOUT,
                      "the local app stalled")
            self.request.write(frame.data)
            self.download.consumed(len(frame.data))
            delay = self._charge(self.down_buckets, len(frame.data))
            if delay > 0:
                self.download.shrink()  # a shaped response keeps the initial window
                self._download_hold = self._hold(self._download_hold, delay, self._download_released, "down")
            if not self._paused and self._download_hold is None:
                # Credit goes back once half the window is due, not per DATA frame.
                credit = self.download.grant(max(1, self.download.window // 2))
                if credit:
                    self.link.send(frames.Window(self.stream_id, credit))
        elif isinstance(frame, frames.End):
            if not self._responding:
                raise frames.FrameError("END before RESPONSE_HEAD")
            self._finish()
            self.request.unregisterProducer()
            self.request.finish()
        elif isinstance(frame, frames.Window):
            for chunk in self.upload.credit(frame.increment):
                self.link.send(frames.Data(self.stream_id, chunk))
            if not self.upload.blocked:
                self._resume_upload()
            self._maybe_send_end()
        elif isinstance(frame, frames.Reset):
            self.fail(frame.code if 400 <= frame.code <= 599 else http.BAD_GATEWAY,
                      frame.reason.decode("utf-8", "replace") or "connector reset the request")

    def _response_head(self, head: frames.ResponseHead) -> None:
        if self._responding:
            raise frames.FrameError("second RESPONSE_HEAD")
        if head.status < 200:
            return  # interim responses are not forwarded
        self.release_share()
        if _UNSAFE_TEXT.search(head.reason) or any(
                not _HEADER_NAME.fullmatch(name) or _UNSAFE_TEXT.search(value) for name, value in head.headers):
            raise frames.FrameError("RESPONSE_HEAD with a header name or value that is not valid HTTP")
        self._responding = True
        request = self.request
        request.setResponseCode(head.status, head.reason or None)
        grouped: dict[bytes, list[bytes]] = {}
        for name, value in filter_headers(head.headers):
            grouped.setdefault(name.lower(), []).append(value)
        for name in (b"date", b"server", b"content-type"):
            request.responseHeaders.removeHeader(name)
        for name, values in grouped.items():
            request.responseHeaders.setRawHeaders(name, values)
        if head.end:
            self._finish()
            request.finish()
            return
        request.registerProducer(self, True)
        self._arm(self.relay.config.request_timeout, http.GATEWAY_TIMEOUT, "the local app stalled")

    # IPushProducer: the caller's connection pushes back on the response
    def pauseProducing(self) -> None:
        self._paused = True
        self._paused_since = self.relay.clock.seconds()

    def resumeProducing(self) -> None:
        self._paused = False
        if self.relay.clock.seconds() - self._paused_since >= window.SLOW_SINK:
            self.download.shrink()  # the caller is not keeping up
        if self._download_hold is not None:
            return  # shaped: _download_released grants the credit
        credit = self.download.grant()
        if credit and not self._done:
            self.link.send(frames.Window(self.stream_id, credit))

    def stopProducing(self) -> None:
        pass

    # -- passthrough
    def _hijack(self) -> None:
        """Hand the caller's connection to an L{UpgradePipe} (pipegate/http/upgrade.py)."""
        held, self._held = bytes(self._held), bytearray()
        self.pipe = UpgradePipe(self.link, self.stream_id, clock=self.relay.clock, method=self.request.method,
                                idle_timeout=self.relay.config.upgrade_idle_timeout, held=held,
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
        if pipe.state == HANDSHAKE:  # no answer from the app: 502, 504, or the caller left
            self.relay.stats.inc("upgrades", "failed")
        self.relay.stats.inc("bytes", "up", pipe.bytes_up)
        self.relay.stats.inc("bytes", "down", pipe.bytes_down)
        site = getattr(self.request, "site", None)
        if site is not None and hasattr(site, "log_upgrade"):
            site.log_upgrade(self.request, pipe)


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
                _plain(request, http.BAD_REQUEST, "a connector login carries no body")
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


