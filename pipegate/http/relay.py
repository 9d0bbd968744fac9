"""
The public HTTP relay (C{twistd pipegate-server}): its configuration (L{RelayConfig}),
the L{Relay} service that admits public requests to tunnels and drains on stop, and
L{ConnectorLink}, the relay's end of one connector's WebSocket.

The pieces it is made of: pipegate/http/public.py (the public HTTP protocol: site,
channel, request, resource), routing.py (which tunnel a request names), tunnels.py (the
tunnel registry and connector logins), streams.py (one request carried over a link).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import attrs
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http

from pipegate import auth
from pipegate.core import window
from pipegate.http import frames, routing
from pipegate.drain import Drainer, drain
from pipegate.stats import Stats
from pipegate.core.budget import LogThrottle, source_key
from pipegate._compat import cancel_close_timer
from pipegate.http.pipe import FrameLink
from pipegate.http.ownership import Holder
from pipegate.http.tunnels import Tunnel, Tunnels
from pipegate.http.streams import RelayStream, plain
from pipegate.sockets import UnreadAbort
from pipegate.timers import cancel

if TYPE_CHECKING:   # loaded only by a relay given --ingress-policy, --trusted-proxy or --tunnel-rate
    from pipegate.core.bucket import BucketPool
    from pipegate.core.policy import Policy
    from pipegate.http.forwarded import TrustedProxies


# A caller's key is parsed once, not on every request of its connections.
_source_key = lru_cache(maxsize=4096)(source_key)

# visitors.HEADER and visitors.ACCEPTED written out (tests/test_lean_startup.py checks that they
# agree): the relay loads pipegate/http/visitors.py only for a login that declares a policy.
VISITOR_HEADER, VISITOR_ACCEPTED = "PipeGate-Visitor-Policy", "enforced"


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
    policy: Policy | None = None        # ingress policy for public callers (deny -> 403); None: none
    tunnel_rate: float = 0.0            # bytes/s per tunnel and direction; 0 = unlimited
    drain_timeout: float = 30.0         # seconds requests in flight may take to finish on stop
    max_window: int = frames.MAX_WINDOW        # credit a response's window may grow to
    window_budget: int = frames.WINDOW_BUDGET  # growth shared by all responses in flight
    trusted_proxies: TrustedProxies | None = None   # peers whose X-Forwarded-For/-Proto are believed
    upgrade_idle_timeout: float = 300.0 # seconds an upgraded (101) pipe may carry no byte; 0 = forever
    caller_share: int = 50              # % of max_in_flight one caller IP's waiting requests may hold
    min_body_rate: float = 500.0        # bytes/s a request body must average after body_grace; 0 = off
    body_grace: float = 20.0
    min_download_rate: float = 500.0    # bytes/s a caller must take an answer at while it pushes back; 0 = off
    download_grace: float = 20.0

    @property
    def per_caller(self) -> int:
        """Slots of one tunnel that requests from one caller IP may hold while waiting."""
        return max(1, self.max_in_flight * self.caller_share // 100)


#: Seconds a stopping relay waits, after its drain, for its connectors to answer the close
#: of their links (within a round trip, normally).  twistd drops every connection in the
#: turn the last stopService Deferred fires, before what is queued on them is written, so
#: without this wait an idle relay's GOAWAY and close frame never left it.
CLOSE_WAIT = 2.0


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
        self._pool: BucketPool | None = None
        if config.tunnel_rate or (config.policy is not None and not config.policy.empty):
            self._make_pool()   # shaping configured: its code loads at startup, not at a request
        self.window_budget = window.GrowthBudget(config.window_budget)
        self.stats = Stats()
        self.tunnels = Tunnels(config.jwt, config.per_caller, clock, self.stats)
        self.share_log = LogThrottle(10.0)
        self.open_links: set[ConnectorLink] = set()   # logged in, TCP connection not yet lost

    @property
    def pool(self) -> BucketPool:
        """The token buckets that shape public requests (policy limits, --tunnel-rate)."""
        return self._pool if self._pool is not None else self._make_pool()

    def _make_pool(self) -> BucketPool:
        from pipegate.core.bucket import BucketPool

        self._pool = BucketPool()
        return self._pool

    def _buckets(self, request, tunnel_id: str) -> tuple[list, list, list] | None:
        """
        (upload buckets, download buckets, keys to release) for a public request, or None
        when the ingress policy refuses the caller.
        """
        config = self.config
        policy = config.policy
        if (policy is None or policy.empty) and not config.tunnel_rate:
            return [], [], []   # (unshaped and unfiltered: most relays)
        now = self.clock.seconds()
        wanted = []
        if policy is not None and not policy.empty:
            # (loaded at startup with the policy: pipegate/tap/server.py)
            from pipegate.core.policy import PolicyError, decide, normalize_ip

            ip = getattr(request.getClientAddress(), "host", "")
            try:
                port = getattr(request.getHost(), "port", 0)  # 0 on a unix: listener
                decision = decide([policy], ip, port, "tcp", now * 1000)
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
    def public_request(self, request) -> None:
        """A public request for a tunnel (a RelayRequest, pipegate/http/public.py), its head just in."""
        asks_upgrade = request.asks_upgrade()
        refused = routing.host_refusal(request.uri, request.requestHeaders.getRawHeaders(b"host", []),
                                       self.config.domain)
        if refused is not None:
            request.body_sink = None
            plain(request, http.BAD_REQUEST, refused)
            return
        routed = routing.route(request.uri, request.host_header(), request.method,
                               asks_upgrade, self.config.domain)
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
            self.stats.inc("in_flight_refusals", tunnel.id if tunnel.links else "(offline)")
            plain(request, http.SERVICE_UNAVAILABLE, "too many requests in flight for this tunnel")
            return
        caller = _source_key(getattr(request.getClientAddress(), "host", "") or "")   # IPv6 by its /64
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
        upgrade = asks_upgrade and request.declared_length == 0
        stream = RelayStream(self, tunnel, request, target, prefix, upgrade)
        stream.caller = caller
        stream.up_buckets, stream.down_buckets, stream.bucket_keys = shaping
        tunnel.in_flight += 1
        request.body_sink = stream
        if tunnel.links:
            stream.assign(tunnel.pick())
        else:
            stream.wait_for_connector()

    def _share_refused(self, request, tunnel: Tunnel) -> None:
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
            self.log.info("draining: {count} request(s) in flight, up to {timeout:g} s (Ctrl-C again to stop now)",
                          count=in_flight, timeout=self.config.drain_timeout)
        d = self.start_drain(self.clock, self.config.drain_timeout,
                             lambda: not any(t.in_flight for t in self.tunnels.values()),
                             self._drained)
        d.addCallback(lambda _: drain(self.clock, CLOSE_WAIT, lambda: not self.open_links))
        return d

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


#: At most one pong a second to a connector's pings (ConnectorLink.onPing).
PONG_INTERVAL = 1.0


class ConnectorLink(FrameLink, WebSocketServerProtocol):
    """The relay's end of one connector's WebSocket."""

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.tunnel_id = ""
        self.holder = Holder(None, False, None)
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
            holder = Holder(claims.jti, claims.shared, self._visitor_policy(request, relay))
            relay.tunnels.admit(claims.sub, holder)
        except ConnectionDeny as e:
            self._log.info("connector login refused ({code}): {reason}", code=e.code, reason=e.reason)
            raise
        self.tunnel_id, self.holder = claims.sub, holder
        # The answer tells a connector that declared a policy that this relay enforces it.
        return frames.SUBPROTOCOL, {VISITOR_HEADER: VISITOR_ACCEPTED}

    @staticmethod
    def _visitor_policy(request, relay: Relay):
        """The visitor policy a login declares (None: none); 400 when it is malformed."""
        text = request.headers.get(VISITOR_HEADER.lower())
        if text is None or not text.strip():
            return None
        from pipegate.http import visitors

        try:
            return visitors.VisitorPolicy.decode(text)
        except visitors.VisitorPolicyError as e:
            relay.stats.inc("admission_failures", "bad_policy")
            raise ConnectionDeny(400, f"bad {VISITOR_HEADER}: {e}")

    _unread = None   # after a refused login: aborts a caller that never reads the refusal
    _pong_at = float("-inf")   # when the last pong went out
    _pong_call = None          # the pending pong for the most recent ping, if it had to wait
    _pong_payload = b""

    def onPing(self, payload):
        # Autobahn answers every ping, and a connector that pings and never reads made the
        # relay queue every pong: memory as fast as it could send.  RFC 6455 5.5.3 lets an
        # endpoint answer only the most recent ping: at most one pong a second goes out.
        self._pong_payload = payload
        if self._pong_call is not None:
            return
        clock = self.factory.relay.clock
        wait = self._pong_at + PONG_INTERVAL - clock.seconds()
        if wait <= 0:
            self._pong()
        else:
            self._pong_call = clock.callLater(wait, self._pong)

    def _pong(self) -> None:
        self._pong_call = None
        self._pong_at = self.factory.relay.clock.seconds()
        super().onPing(self._pong_payload)   # (Autobahn's: a pong while the link is open)

    def failHandshake(self, reason, code=400, responseHeaders=None):
        super().failHandshake(reason, code, responseHeaders)
        # Autobahn closes with loseConnection, which waits until the caller has read what is
        # queued: an answer pipelined ahead of this login, which a caller that never reads
        # would hold, with the connection, for ever.  It is aborted an idle timeout later.
        relay = self.factory.relay
        if relay.config.idle_timeout and self.transport is not None and self._unread is None:
            self._unread = UnreadAbort(relay.clock, relay.config.idle_timeout, self.transport, self._unread_log,
                                       relay.config.min_download_rate)

    def _unread_log(self) -> None:
        self._log.info("refused login: the caller did not read the refusal within {seconds:g} s; closing",
                       seconds=self.factory.relay.config.idle_timeout)

    def connectionLost(self, reason):
        self.factory.relay.open_links.discard(self)
        self._unread = cancel(self._unread)
        call, self._pong_call = self._pong_call, None
        if call is not None and call.active():
            call.cancel()
        super().connectionLost(reason)

    def onOpen(self):
        self._open = True
        self.factory.relay.open_links.add(self)
        self.link_opened()
        self.factory.relay.tunnels.attach(self)
        if self.factory.relay.stopping:
            self.announce_going_away("relay shutting down")

    def send(self, frame: frames.Frame) -> None:
        if self._open:
            # The frames this link sends while the reactor handles one batch of ready
            # sockets (request heads from many callers) leave in one write after it.
            self.send_in_turn(frame, self.factory.relay.clock)

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


