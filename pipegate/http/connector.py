"""
The connector (C{twistd pipegate-client TARGET_URL SERVER_URL}).

It keeps one WebSocket to the relay inside a L{ClientService} and forwards every
request stream to the local app with L{Agent} over a persistent pool, streaming
bodies both ways within the streams' credit windows.
"""

from __future__ import annotations

import re
from typing import Callable
from urllib.parse import urlsplit

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application import internet, service
from twisted.internet import defer, endpoints, ssl
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client, http
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from pipegate.core import window
from pipegate.http import frames, visitors
from pipegate.http.pipe import FrameLink, StreamPipe, cancel_close_timer, filter_headers
from pipegate.core.redial import Redial
from pipegate.dialer import ReportingEndpoint, describe_connect_error
from pipegate.drain import drain
from pipegate.stats import Stats
from pipegate.sockets import connect_protocol


class ConnectorError(ValueError):
    """A connector setting is unusable; one line naming it."""


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


@attrs.frozen
class Target:
    """Where the local app lives: C{http://127.0.0.1:3000/base}."""

    scheme: bytes
    host: bytes
    port: int
    base: bytes

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectorError(f"TARGET_URL: expected http(s)://host[:port][/path], got {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = parts.hostname.encode("idna")
        except (ValueError, UnicodeError) as e:
            raise ConnectorError(f"TARGET_URL: {e}") from None
        return cls(parts.scheme.encode(), host, port, parts.path.rstrip("/").encode())

    @property
    def authority(self) -> bytes:
        host = b"[" + self.host + b"]" if b":" in self.host else self.host
        default = 443 if self.scheme == b"https" else 80
        return host if self.port == default else host + b":%d" % self.port

    def url(self, target: bytes) -> bytes:
        return self.scheme + b"://" + self.authority + self.path(target)

    def path(self, target: bytes) -> bytes:
        """
        The base path joined with the tunnel target, dot segments kept inside the tunnel.
        Bytes an HTTP/1.1 request target may not hold (raw UTF-8 a caller sent unencoded)
        are percent-encoded: the app gets C{/caf%C3%A9} for C{/café}.
        """
        path, sep, query = target.partition(b"?")
        return _OUTSIDE_TARGET.sub(_percent, self.base + safe_path(path) + sep + query)


_OUTSIDE_TARGET = re.compile(rb"[^\x21-\x7e]")


def _percent(match: re.Match) -> bytes:
    return b"%%%02X" % match.group()[0]


def _is_dot(segment: bytes, dots: bytes) -> bool:
    return segment.lower().replace(b"%2e", b".") == dots


def safe_path(path: bytes) -> bytes:
    """
    Resolve C{.} and C{..} segments (also percent-encoded ones) without ever rising
    above the root, leaving every other byte, percent-escapes included, as it is.
    """
    out: list[bytes] = []
    segments = path.split(b"/")[1:] if path.startswith(b"/") else path.split(b"/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if _is_dot(segment, b"."):
            if last:
                out.append(b"")
        elif _is_dot(segment, b".."):
            if out:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)


@attrs.frozen
class ConnectorConfig:
    target: Target
    max_streams: int = 256
    connect_timeout: float = 10.0
    ping_interval: float = 20.0
    max_window: int = frames.MAX_WINDOW        # credit a request body's window may grow to
    window_budget: int = frames.WINDOW_BUDGET  # growth shared by all request bodies in flight
    drain_timeout: float = 30.0                # seconds requests in flight may take on stop


@implementer(IBodyProducer)
class TunnelBody:
    """The request body as it arrives in DATA frames, written to the Agent's consumer."""

    def __init__(self, stream: ConnectorStream, length: int | object) -> None:
        self.stream = stream
        self.length = length
        self.consumer = None
        self.finished: defer.Deferred[None] = defer.Deferred()
        self._early: list[bytes] = []
        self._ended = False
        self._paused = False
        self._paused_since = 0.0
        self._stopped = False

    def startProducing(self, consumer):
        self.consumer = consumer
        early, self._early = self._early, []
        for chunk in early:
            self._write(chunk)
        if self._ended and not self._stopped:
            self.finished.callback(None)
        return self.finished

    def data(self, chunk: bytes) -> None:
        if self.consumer is None:
            self._early.append(chunk)
        else:
            self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        if self._stopped:
            return
        self.consumer.write(chunk)
        upload = self.stream.upload
        upload.consumed(len(chunk))
        if not self._paused:
            # Credit goes back once half the window is due, not per DATA frame.
            credit = upload.grant(max(1, upload.window // 2))
            if credit:
                self.stream.send(frames.Window(self.stream.stream_id, credit))

    def end(self) -> None:
        self._ended = True
        if self.consumer is not None and not self.finished.called and not self._stopped:
            self.finished.callback(None)

    def pauseProducing(self):
        self._paused = True
        self._paused_since = self.stream.session.reactor.seconds()

    def resumeProducing(self):
        self._paused = False
        if self.stream.session.reactor.seconds() - self._paused_since >= window.SLOW_SINK:
            self.stream.upload.shrink()  # the local app is not keeping up
        credit = self.stream.upload.grant()
        if credit:
            self.stream.send(frames.Window(self.stream.stream_id, credit))

    def stopProducing(self):
        # The Agent gave up on the request; its Deferred reports why.  Per IBodyProducer,
        # `finished` must never fire now.
        self._stopped = True


class ResponseForwarder(Protocol):
    """Receives the local app's response body and sends it as DATA within the window."""

    def __init__(self, stream: ConnectorStream) -> None:
        self.stream = stream
        self.window = window.SendWindow()
        self._ended = False

    def dataReceived(self, data: bytes) -> None:
        with self.stream.session.link.corked():
            for chunk in self.window.write(data):
                self.stream.send(frames.Data(self.stream.stream_id, chunk))
        if self.window.blocked:
            self.transport.pauseProducing()

    def credit(self, increment: int) -> None:
        for chunk in self.window.credit(increment):
            self.stream.send(frames.Data(self.stream.stream_id, chunk))
        if not self.window.blocked and self.transport is not None:
            self.transport.resumeProducing()
        self._maybe_end()

    def connectionLost(self, reason: Failure) -> None:
        if reason.check(client.ResponseDone, http.PotentialDataLoss):
            self._ended = True
            self._maybe_end()
        else:
            self.stream.reset(http.BAD_GATEWAY, "the local app failed mid-response")

    def _maybe_end(self) -> None:
        if self._ended and self.window.queued == 0:
            self.stream.send(frames.End(self.stream.stream_id))
            self.stream.close()


class ConnectorStream:
    """One request from the relay, forwarded to the local app."""

    log = Logger()

    def __init__(self, session: ConnectorSession, head: frames.RequestHead) -> None:
        self.session = session
        self.stream_id = head.stream
        self.head = head
        config = session.config
        # The request body's window grows while the local app keeps up (docs/protocol.md 1.5).
        self.upload = window.ReceiveWindow(max_window=config.max_window, budget=session.window_budget)
        self.body: TunnelBody | None = None
        self.forwarder: ResponseForwarder | None = None
        self.pipe: StreamPipe | None = None
        self._request: defer.Deferred | None = None
        self._closed = False
        self.record = None  # the inspector's StreamRecording, when --inspect is on

    def send(self, frame: frames.Frame) -> None:
        if not self._closed:
            if self.record is not None:
                self.record.sent(frame)
            self.session.send(frame)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.record is not None:
                self.record.closed()
            self.upload.release()
            self.session.streams.pop(self.stream_id, None)

    def reset(self, code: int, reason: str) -> None:
        if not self._closed:
            self.log.info("request {correlation} failed: {code} {reason}",
                          correlation=self.head.correlation.decode(), code=code, reason=reason)
            self.send(frames.Reset(self.stream_id, code, reason.encode()))
            self.close()

    def request_headers(self) -> Headers:
        head = self.head
        target = self.session.config.target
        drop = frozenset({b"host", b"content-length", b"x-pipegate-correlation-id"})
        headers = Headers()
        forwarded_for = []
        for name, value in filter_headers(head.headers, keep_upgrade=head.upgrade, drop=drop):
            if name.lower() == b"x-forwarded-for":
                forwarded_for.append(value)
            else:
                headers.addRawHeader(name, value)
        if head.client:
            forwarded_for.append(head.client)
        if forwarded_for:
            headers.setRawHeaders(b"x-forwarded-for", [b", ".join(forwarded_for)])
        headers.setRawHeaders(b"x-forwarded-proto", [head.scheme])
        if head.host:
            headers.setRawHeaders(b"x-forwarded-host", [head.host])
        if head.prefix:
            headers.setRawHeaders(b"x-forwarded-prefix", [head.prefix])
        headers.setRawHeaders(b"x-pipegate-correlation-id", [head.correlation])
        if head.upgrade:
            headers.setRawHeaders(b"host", [target.authority])
        return headers

    def start(self) -> None:
        observer = self.session.observer
        if observer is not None:
            self.record = observer.begin(
                self.head, self.session.config.target.path(self.head.target), self.request_headers())
        if self.head.upgrade:
            self._start_passthrough()
            return
        headers = self.request_headers()
        body = None
        if not self.head.end:
            length: int | object = UNKNOWN_LENGTH
            declared = [v for n, v in self.head.headers if n.lower() == b"content-length"]
            if declared:
                try:
                    length = int(declared[0])
                except ValueError:
                    self.reset(http.BAD_REQUEST, "invalid Content-Length")
                    return
            body = self.body = TunnelBody(self, length)
        url = self.session.config.target.url(self.head.target)
        try:
            d = self._request = self.session.agent.request(self.head.method, url, headers, body)
        except Exception as e:
            self.reset(http.BAD_REQUEST, f"cannot send the request to the local app: {e}")
            return
        d.addCallbacks(self._response, self._failed)

    def _response(self, response) -> None:
        self._request = None
        if self._closed:
            response.deliverBody(_Drop())
            return
        headers = filter_headers(list(response.headers.getAllRawHeaders()))
        # Agent keeps Content-Length out of response.headers; restore it from the length
        # it parsed (not for HEAD, 204 and 304, whose length Agent reports as 0).
        if (isinstance(response.length, int) and self.head.method != b"HEAD"
                and response.code not in (204, 304)):
            headers += ((b"Content-Length", str(response.length).encode()),)
        # The head, and the body and END when the app's answer is already in (the Agent
        # delivers what it buffered from within deliverBody), leave in one socket write.
        with self.session.link.corked():
            try:
                self.send(frames.ResponseHead(self.stream_id, response.code, response.phrase[:255], headers))
            except frames.FrameError:
                self.reset(http.BAD_GATEWAY, "the local app's response head is too large")
                response.deliverBody(_Drop())
                return
            self.forwarder = ResponseForwarder(self)
            response.deliverBody(self.forwarder)

    def _failed(self, failure: Failure) -> None:
        self._request = None
        if failure.check(defer.CancelledError):
            return
        reason = failure.getErrorMessage()
        if failure.check(client.ResponseNeverReceived, client.RequestTransmissionFailed):
            inner = failure.value.reasons[0] if failure.value.reasons else None
            if inner is not None and inner.check(defer.CancelledError):
                return
            reason = inner.getErrorMessage() if inner is not None else reason
        self.reset(http.BAD_GATEWAY, f"local app unreachable: {reason}")

    def frame_received(self, frame: frames.Frame) -> None:
        if self.record is not None:
            self.record.received(frame)
        if self.pipe is not None:
            self.pipe.frame_received(frame)
            if isinstance(frame, frames.Reset):
                self.close()
            return
        if isinstance(frame, frames.Data):
            self.upload.received(len(frame.data))
            if self.body is None:
                raise frames.FrameError("DATA for a request without a body")
            self.body.data(frame.data)
        elif isinstance(frame, frames.End):
            if self.body is not None:
                self.body.end()
        elif isinstance(frame, frames.Window):
            if self.forwarder is not None:
                self.forwarder.credit(frame.increment)
        elif isinstance(frame, frames.Reset):
            self.abandon()

    def abandon(self) -> None:
        """The relay gave up on this request: stop talking to the local app."""
        self.close()
        if self._request is not None:
            self._request.cancel()
        if self.forwarder is not None and self.forwarder.transport is not None:
            self.forwarder.transport.stopProducing()

    # -- passthrough
    def _start_passthrough(self) -> None:
        target = self.session.config.target
        session = self.session
        reactor = session.reactor
        endpoint = endpoints.HostnameEndpoint(reactor, target.host, target.port,
                                              timeout=session.config.connect_timeout)
        if target.scheme == b"https":
            endpoint = endpoints.wrapClientTLS(
                ssl.optionsForClientTLS(target.host.decode("idna")), endpoint)
        head = self.head
        lines = [head.method + b" " + target.path(head.target) + b" HTTP/1.1"]
        lines += [n + b": " + v for n, v in self.request_headers().getAllRawHeaders()
                  for v in ([v] if isinstance(v, bytes) else v)]
        request_head = b"\r\n".join(lines) + b"\r\n\r\n"
        self.pipe = StreamPipe(self, self.stream_id)
        pipe = self.pipe

        def connected(protocol):
            protocol.transport.write(request_head)

        def failed(failure):
            self.reset(http.BAD_GATEWAY, f"local app unreachable: {failure.getErrorMessage()}")

        d = connect_protocol(endpoint, pipe)
        d.addCallbacks(connected, failed)

    def stream_closed(self, stream_id: int) -> None:
        self.close()


class _Drop(Protocol):
    def dataReceived(self, data):
        pass

    def connectionMade(self):
        self.transport.stopProducing()


class _QuietHTTPClientFactory(client._HTTP11ClientFactory):
    noisy = False


class ConnectorSession:
    """The connector's side of one WebSocket: its streams and the Agent they use."""

    log = Logger()

    def __init__(self, link: ConnectorProtocol, config: ConnectorConfig, agent, reactor,
                 window_budget: window.GrowthBudget | None = None, observer=None) -> None:
        self.link = link
        self.observer = observer  # pipegate.http.inspect.recorder.Recorder, or None
        self.config = config
        self.agent = agent
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
            stream.upload.release()
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

    def connectionLost(self, reason):
        self._lost_reason = reason  # onClose, called from here, says why a login failed
        super().connectionLost(reason)

    unprotected = False

    def onConnect(self, response):
        connector: Connector = self.factory.connector
        self.session = ConnectorSession(self, connector.config, connector.agent, connector.reactor,
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
        self.link_opened()
        self.factory.connector.link_up(self)

    def send(self, frame: frames.Frame) -> None:
        if self.state == self.STATE_OPEN:
            self.send_message(frame)

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
        status_line = getattr(self, "http_status_line", "") or ""
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
                self._lost_reason, getattr(self, "http_status_line", "") or "", self._handshake_error,
                bool(self.factory.isSecure)))
        self.factory.connector.link_down(self, code, reason)


class Connector(service.MultiService):
    """
    The connector service: dials the relay through a L{ClientService} and serves the
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
        self.window_budget = window.GrowthBudget(config.window_budget)
        self.stats = Stats()
        self._ever_online = False
        self._conflict: str | None = None
        self.stopping = False
        self.online: defer.Deferred | None = defer.Deferred()
        self.pool = client.HTTPConnectionPool(reactor, persistent=True)
        # Keep as many idle connections as there can be streams: with fewer, every request
        # above the pool size dials the app anew (and resolves its name in a thread).
        self.pool.maxPersistentPerHost = config.max_streams
        self.pool._factory = _QuietHTTPClientFactory  # no log lines per local connection
        self.agent = client.Agent(reactor, pool=self.pool, connectTimeout=config.connect_timeout)
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
        self.client_service = internet.ClientService(
            self._endpoint, factory, retryPolicy=self._next_attempt, clock=reactor)
        self.client_service.setServiceParent(self)

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
        if not self.running or self.stopping or getattr(link, "retiring", None) is not None:
            return
        link.retiring = self.client_service
        self.client_service = internet.ClientService(
            self._endpoint, self._factory, retryPolicy=self._next_attempt, clock=self.reactor)
        self.client_service.setServiceParent(self)

    def link_up(self, link: ConnectorProtocol) -> None:
        if isinstance(self.redial, Redial):
            self.redial.succeeded()
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
        retiring = getattr(link, "retiring", None)
        if retiring is not None:
            # Not from inside its own connectionLost: stop the old dialler on the next turn.
            link.retiring = None
            self.reactor.callLater(0, lambda: retiring.disownServiceParent() if retiring.parent else None)
        if link in self.links:
            self.links.remove(link)
            if not self.links and self.online is None:
                self.online = defer.Deferred()
            if self.running and not self.stopping:
                self.log.info("link to the relay lost ({code} {reason}); {what}", code=code,
                              reason=reason or "", what="replaced" if retiring else "reconnecting")

    def conflict(self, reason: str) -> None:
        """
        409: another connector holds the tunnel (possibly a stale link of our own last run the
        relay has not timed out yet), or declared another visitor policy.  Not fatal: retry.
        """
        # One line per attempt: L{login_failed} follows (the link closes) and the retry policy
        # logs this reason with the next delay, which grows like any other failed login.
        self.stats.inc("admission_failures", "conflict")
        self._conflict = f"the relay refused the login for tunnel {self.tunnel_id} (409 {reason}); retrying"

    def refused(self, reason: str) -> None:
        message = f"the relay refused the login: {reason}"
        if "revoked" in reason:
            message += " (this token was revoked on the relay; ask its operator for a new one)"
        self.log.critical("{message}", message=message)
        self.client_service.stopService()
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
            self.log.info("draining: {count} request(s) in flight, up to {timeout:g} s",
                          count=count, timeout=self.config.drain_timeout)
        d = drain(self.reactor, self.config.drain_timeout, lambda: self.in_flight() == 0)
        d.addCallback(self._drained)
        return d

    def _drained(self, in_time: bool):
        cut = self.in_flight()
        if not in_time and cut:
            self.log.warn("drain timeout: {count} request(s) cut", count=cut)
        d = super().stopService()
        for link in list(self.links):
            link.sendClose(1000, "connector stopping")
        d.addBoth(lambda r: self.pool.closeCachedConnections())
        return d
