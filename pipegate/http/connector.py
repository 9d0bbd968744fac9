"""
The connector (C{twistd pipegate-client TARGET_URL SERVER_URL}).

It keeps one WebSocket to the relay (L{pipegate.dialer.Redialer}) and forwards every
request stream to the local app over a pool of kept-alive connections
(L{pipegate.http.appclient.AppPool}), streaming bodies both ways within the streams'
credit windows.
"""

from __future__ import annotations

from typing import Callable
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application import service
from twisted.internet import defer, endpoints, ssl
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client, http

from pipegate.core import window
from pipegate.http import frames, visitors
from pipegate.http.appclient import AppPool
from pipegate.http.outbound import AppEndpoints, ConnectorStream
from pipegate._compat import cancel_close_timer, handshake_status_line, quiet_pool
from pipegate.http.pipe import FrameLink
from pipegate.http.target import ConnectorConfig
from pipegate.core.redial import Redial
from pipegate.dialer import Redialer, ReportingEndpoint, describe_connect_error
from pipegate.drain import drain
from pipegate.stats import Stats


CA_HINT = ("give the CA that signed it with --ca-file (PIPEGATE_CA_FILE), or point SSL_CERT_FILE "
           "at a CA bundle that holds it")


def explain_login_failure(lost: Failure | None, status_line: str, handshake_error: str | None,
                          secure: bool) -> str:
    """
    Why a connection to the relay ended before the WebSocket login completed, in one
    phrase: the HTTP status, the TLS error (with what to do about it), or the mismatch.
    """
    parts = status_line.split(" ", 2)
    if len(parts) >= 2 and parts[1].isdigit():
        status = " ".join(parts[1:]).strip()
        if parts[1] == "101":
            return f"protocol mismatch: {handshake_error or 'the WebSocket handshake failed'}"
        hint = ""
        if parts[1] in ("400", "404", "405", "426"):
            hint = " (is SERVER_URL a PipeGate relay, ws(s)://host[:port]/<connection-id>?)"
        return f"the server answered HTTP {status} to the login{hint}"
    if lost is not None:
        from OpenSSL import SSL

        if lost.check(SSL.Error):
            text = "; ".join(str(reason[-1]) for reason in (lost.value.args[0] if lost.value.args else [])
                             if isinstance(reason, tuple)) or str(lost.value)
            if "certificate verify failed" in text:
                return f"TLS: the relay's certificate is not trusted ({text}); {CA_HINT}"
            if "wrong version number" in text or "packet length too long" in text or "record layer" in text:
                return f"TLS handshake failed ({text}): the port does not speak TLS (a plain port needs ws://, not wss://)"
            return f"TLS handshake failed ({text})"
        if type(lost.value).__name__ == "VerificationError":  # service_identity: wrong host name
            return f"TLS: the relay's certificate does not match its host name ({lost.getErrorMessage()})"
    if handshake_error:
        return f"the WebSocket login failed: {handshake_error}"
    if secure:
        return ("the connection closed before the TLS handshake and the login finished "
                "(a plain port needs ws://, not wss://)")
    return ("the connection closed before the WebSocket login finished "
            "(a TLS port needs wss://, not ws://)")


class ConnectorSession:
    """The connector's side of one WebSocket: its streams and the pool of app connections they use."""

    log = Logger()

    def __init__(self, link: ConnectorProtocol, config: ConnectorConfig, app: AppPool, reactor,
                 window_budget: window.GrowthBudget | None = None, observer=None) -> None:
        self.link = link
        self.observer = observer  # pipegate.http.inspect.recorder.Recorder, or None
        self.config = config
        self.app = app
        self.host_line = b"Host: " + config.target.authority  # of every request to the app
        self.reactor = reactor
        self.window_budget = window_budget
        self.streams: dict[int, ConnectorStream] = {}

    def send(self, frame: frames.Frame) -> None:
        self.link.send(frame)

    def frame_received(self, frame: frames.Frame) -> None:
        if isinstance(frame, frames.RequestHead):
            if frame.stream in self.streams or frame.stream == 0:
                raise frames.FrameError(f"REQUEST_HEAD for stream {frame.stream} already in use")
            stream = ConnectorStream(self, frame)
            if len(self.streams) >= self.config.max_streams:
                self.send(frames.Reset(frame.stream, http.SERVICE_UNAVAILABLE, b"connector busy"))
                return
            self.streams[frame.stream] = stream
            stream.start()
        elif isinstance(frame, frames.GoAway):
            self.log.info("relay is going away: {reason}", reason=frame.reason.decode("utf-8", "replace"))
            self.link.factory.connector.relay_going_away(self.link)
        elif isinstance(frame, frames.ResponseHead):
            raise frames.FrameError("RESPONSE_HEAD sent to a connector")
        else:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream.frame_received(frame)

    def lost(self) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._closed = True
            if stream.record is not None:
                stream.record.closed("the link to the relay was lost")
            stream.flow.release()
            if stream.pipe is not None:
                stream.pipe.abort()
            else:
                stream.abandon()


class ConnectorProtocol(FrameLink, WebSocketClientProtocol):
    """The connector's end of its WebSocket to the relay."""

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.session: ConnectorSession | None = None
        self._opened = False
        self._lost_reason: Failure | None = None
        self._handshake_error: str | None = None

    def connectionMade(self):
        super().connectionMade()
        self.factory.connector.pending.add(self)   # until logged in or gone

    def connectionLost(self, reason):
        self.factory.connector.pending.discard(self)
        self._lost_reason = reason  # onClose, called from here, says why a login failed
        super().connectionLost(reason)

    unprotected = False

    def onConnect(self, response):
        connector: Connector = self.factory.connector
        self.session = ConnectorSession(self, connector.config, connector.app, connector.reactor,
                                        connector.window_budget, observer=connector.observer)
        # A relay that predates visitor policies ignores the header: it must not serve the tunnel.
        self.unprotected = (not connector.visitors.empty
                            and response.headers.get(visitors.HEADER.lower()) != visitors.ACCEPTED)

    def onOpen(self):
        if self.unprotected:
            self._opened = True  # not a failure to retry: the connector stops
            self.factory.connector.refused("it does not enforce visitor policies (--basic-auth, --allow, "
                                           "--deny); upgrade the relay")
            self.dropConnection(abort=True)
            return
        self._opened = True
        self.factory.connector.pending.discard(self)
        self.link_opened()
        self.factory.connector.link_up(self)

    def send(self, frame: frames.Frame) -> None:
        if self.state == self.STATE_OPEN:
            # The answers of the apps read in one reactor turn leave in one write after it.
            self.send_in_turn(frame, self.factory.connector.reactor)

    def onMessage(self, payload, isBinary):
        try:
            if not isBinary:
                raise frames.FrameError("text message")
            self.session.frame_received(frames.decode(payload))
        except Exception as e:
            if not isinstance(e, frames.FrameError):
                self._log.failure("error handling a frame from the relay")
            self._log.warn("protocol error from the relay: {reason}; closing link", reason=str(e))
            self.sendClose(frames.PROTOCOL_ERROR, str(e)[:100])

    def failHandshake(self, reason):
        status_line = handshake_status_line(self)
        parts = status_line.split(" ", 2)
        self._handshake_error = str(reason)
        if len(parts) >= 2 and parts[1] == "409":
            self.factory.connector.conflict(parts[2] if len(parts) > 2 else "")
        elif len(parts) >= 2 and parts[1] in ("401", "403"):
            self._opened = True  # not a failure to retry: the connector stops
            self.factory.connector.refused(f"{parts[1]} {parts[2] if len(parts) > 2 else ''}".strip())
        return super().failHandshake(reason)

    def onClose(self, wasClean, code, reason):
        cancel_close_timer(self)
        if self.session is not None:
            self.session.lost()
        if not self._opened:
            self.factory.connector.login_failed(explain_login_failure(
                self._lost_reason, handshake_status_line(self), self._handshake_error,
                bool(self.factory.isSecure)))
        self.factory.connector.link_down(self, code, reason)


class Connector(service.MultiService):
    """
    The connector service: dials the relay through a L{pipegate.dialer.Redialer} and serves the
    requests it is sent.  C{on_fatal(message)} runs when the relay refuses the token.
    """

    log = Logger()

    def __init__(self, reactor, config: ConnectorConfig, server_url: str, token: str,
                 tunnel_id: str, *, ca_file: str | None = None, retry_policy=None,
                 on_fatal: Callable[[str], None] | None = None, observer=None,
                 visitor_policy: visitors.VisitorPolicy = visitors.EMPTY) -> None:
        super().__init__()
        self.observer = observer  # the request inspector (--inspect), None when off
        self.reactor = reactor
        self.visitors = visitor_policy
        self.config = config
        self.tunnel_id = tunnel_id
        self.on_fatal = on_fatal
        self.links: list[ConnectorProtocol] = []
        self.pending: set[ConnectorProtocol] = set()   # connected, not logged in yet
        self.window_budget = window.GrowthBudget(config.window_budget)
        self.stats = Stats()
        self._ever_online = False
        self._conflict: str | None = None
        self.stopping = False
        self.online: defer.Deferred | None = defer.Deferred()
        # Requests go to the app over kept-alive connections (pipegate/http/appclient.py): as
        # many kept idle as there can be streams (with fewer, every request above the bound
        # dials the app anew).  What one read of the app's answer produces (and every other
        # answer read in the same reactor turn) leaves in one send: a link corks each turn
        # in which it sends (ConnectorProtocol.send, FrameLink.send_in_turn), so the pool
        # needs no cork of its own around each read.
        target = config.target
        self.app = AppPool.to(reactor, target.scheme, target.host, target.port,
                              connect_timeout=config.connect_timeout, max_idle=config.max_streams)
        # Twisted's Agent, for the request inspector's replays only (pipegate/http/inspect/).
        self.pool = client.HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        quiet_pool(self.pool)  # no log lines per local connection
        self.agent = client.Agent.usingEndpointFactory(
            reactor, AppEndpoints(reactor, config.connect_timeout), pool=self.pool)
        parts = urlsplit(server_url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        base = parts.path.rstrip("/")
        # The login path is /<id> under any path prefix of SERVER_URL; the token travels
        # in the Authorization header, never in the URL.
        known = base.rsplit("/", 1)[-1] if base else ""
        path = base if known.lower() == tunnel_id.lower() else f"{base}/{tunnel_id}"
        url = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1].split('?')[0]}{path}"
        self.public_url = f"{'https' if secure else 'http'}://{parts.netloc}{path}/"
        self.display_url = url
        headers = {"Authorization": f"Bearer {token}"}
        if not self.visitors.empty:
            headers[visitors.HEADER] = self.visitors.encode()
        factory = WebSocketClientFactory(url, protocols=[frames.SUBPROTOCOL], headers=headers)
        factory.protocol = ConnectorProtocol
        factory.connector = self
        factory.noisy = False
        factory.setProtocolOptions(
            maxFramePayloadSize=frames.MAX_FRAME_SIZE,
            maxMessagePayloadSize=frames.MAX_FRAME_SIZE,
            autoPingInterval=config.ping_interval or None,
            autoPingTimeout=config.ping_interval or None,
            openHandshakeTimeout=30, closeHandshakeTimeout=5,
        )
        endpoint = endpoints.HostnameEndpoint(reactor, parts.hostname, port, timeout=30)
        if secure:
            trust = None
            if ca_file:
                with open(ca_file, "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
            endpoint = endpoints.wrapClientTLS(
                ssl.optionsForClientTLS(parts.hostname, trustRoot=trust), endpoint)
        # A policy that grows over failed logins, not only failed TCP connects (core/redial.py).
        self.redial = retry_policy or Redial()
        self._why: str | None = None  # why the last attempt failed, logged with the next delay
        self._endpoint, self._factory = ReportingEndpoint(endpoint, self.connect_failed), factory
        # The one redial/GOAWAY object of every dialled link (pipegate/dialer.py).
        self.dialer = Redialer(self._endpoint, factory, reactor, retry_policy=self._next_attempt,
                               backoff=self.redial if isinstance(self.redial, Redial) else None)
        self.dialer.setServiceParent(self)

    # -- links

    def link_up(self, link: ConnectorProtocol) -> None:
        self.dialer.succeeded()  # the next failure starts the backoff afresh
        if self.stopping:
            link.send(frames.GoAway(b"connector stopping"))  # redialled while draining
        self.links.append(link)
        if self._ever_online:
            self.stats.inc("reconnects")
        self._ever_online = True
        self.log.info("tunnel {tunnel_id} online at {url}", tunnel_id=self.tunnel_id, url=self.public_url)
        online, self.online = self.online, None
        if online is not None:
            online.callback(link)

    def link_down(self, link: ConnectorProtocol, code, reason) -> None:
        retiring = self.dialer.link_closed(link)
        if link in self.links:
            self.links.remove(link)
            if not self.links and self.online is None:
                self.online = defer.Deferred()
            if self.running and not self.stopping:
                self.log.info("link to the relay lost ({code} {reason}){what}", code=code, reason=reason or "",
                              what=" after the relay's GOAWAY; a new link is being dialled" if retiring
                              else "; reconnecting")

    # -- redial: why an attempt failed, logged with the next delay (self.dialer, a
    # pipegate.dialer.Redialer, dials; self.redial is its backoff).

    def connect_failed(self, failure: Failure) -> None:
        """TCP (or the name lookup) failed: say so in the user's words."""
        self._why = f"cannot connect: {describe_connect_error(failure.value)}"
        self.stats.inc("admission_failures", "connect")

    def login_failed(self, why: str) -> None:
        """The connection ended before the WebSocket login completed."""
        conflict, self._conflict = self._conflict, None
        if conflict is not None:
            self._why = conflict   # counted when the 409 arrived
            return
        self._why = why
        self.stats.inc("admission_failures", "tls" if why.startswith("TLS") else "login")

    def conflict(self, reason: str) -> None:
        """
        409: another connector holds the tunnel (possibly a stale link of our own last run the
        relay has not timed out yet), or declared another visitor policy.  Not fatal: retry.
        """
        # One line per attempt: L{login_failed} follows (the link closes) and the retry policy
        # logs this reason with the next delay, which grows like any other failed login.
        self.stats.inc("admission_failures", "conflict")
        self._conflict = f"the relay refused the login for tunnel {self.tunnel_id} (409 {reason}); retrying"

    def _next_attempt(self, attempt: int) -> float:
        # ClientService's retry policy: our own count, and one line saying why.
        delay = self.redial(attempt)
        why, self._why = self._why, None
        if why is not None:
            self.log.warn("relay {url}: {why}; next attempt in {delay:.1f} s",
                          url=self.display_url, why=why, delay=delay)
        return delay

    def relay_going_away(self, link: ConnectorProtocol) -> None:
        """
        GOAWAY from the relay: dial a fresh link at once (behind a balancer it reaches a relay
        that is not stopping) while this one finishes its requests; the old dialler is retired
        when its link closes.
        """
        if not self.stopping:
            self.dialer.going_away(link)

    # -- refusal, drain

    def refused(self, reason: str) -> None:
        message = f"the relay refused the login: {reason}"
        if "revoked" in reason:
            message += " (this token was revoked on the relay; ask its operator for a new one)"
        elif "signature" in reason:
            message += (" (the token was minted with another secret than the relay's PIPEGATE_JWT_SECRET: "
                        f"mint it where that secret is, with `pipegate token -c {self.tunnel_id}`)")
        elif "expired" in reason:
            message += f" (mint a new one with `pipegate token -c {self.tunnel_id}`, `--ttl` for a longer life)"
        self.log.critical("{message}", message=message)
        self.dialer.stop_dialing()
        if self.on_fatal is not None:
            self.on_fatal(message)

    def in_flight(self) -> int:
        return sum(len(link.session.streams) for link in self.links if link.session is not None)

    def stopService(self):
        """
        Drain (SIGTERM): GOAWAY tells the relay to send this connector no new requests
        (it uses other connectors, or holds them within its --offline-grace); requests in
        flight have up to C{drain_timeout} seconds to finish; then the links close.
        """
        self.stopping = True
        for link in list(self.links):
            link.send(frames.GoAway(b"connector stopping"))
        count = self.in_flight()
        if count:
            self.log.info("draining: {count} request(s) in flight, up to {timeout:g} s (Ctrl-C again to stop now)",
                          count=count, timeout=self.config.drain_timeout)
        d = drain(self.reactor, self.config.drain_timeout, lambda: self.in_flight() == 0)
        d.addCallback(self._drained)
        return d

    def _drained(self, in_time: bool):
        cut = self.in_flight()
        if not in_time and cut:
            self.log.warn("drain timeout: {count} request(s) cut", count=cut)
        # A login still pending is cut: closing a TLS connection whose handshake never
        # completes (wss:// to a plain port, a stuck proxy) would wait for the 30 s
        # handshake timeout, and Ctrl-C with it.
        for attempt in list(self.pending):
            attempt.transport.abortConnection()
        d = super().stopService()
        for link in list(self.links):
            link.sendClose(1000, "connector stopping")
        d.addBoth(self._close_app_connections)
        return d

    def _close_app_connections(self, result):
        self.app.close()
        return self.pool.closeCachedConnections()
