"""
The connector's outbound side: each request stream the relay sends becomes a request
to the local app (L{ConnectorStream}, over L{pipegate.http.appclient.AppPool}'s
kept-alive connections), its body streamed in from DATA frames
(L{TunnelBody}) and the app's response streamed back out (L{ResponseForwarder}), all
within the stream's credit windows.  A WebSocket passthrough stream is a raw
L{StreamPipe} to the app instead.
"""

from __future__ import annotations

import re
from typing import Protocol as TypingProtocol

from twisted.internet import endpoints, ssl
from twisted.logger import Logger
from twisted.web import client, http
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from pipegate.core import window
from pipegate.http import frames
from pipegate.http.location import public_location
from pipegate.http.appclient import AppPool
from pipegate.http.pipe import HOP_BY_HOP, connection_names, StreamPipe, filter_headers
from pipegate.http.target import ConnectorConfig
from pipegate.sockets import connect_protocol

_DROP_ALWAYS = HOP_BY_HOP | {b"host", b"content-length", b"x-pipegate-correlation-id", b"x-forwarded-proto"}
_DROP_HOST = frozenset({b"x-forwarded-host"})
_DROP_PREFIX = frozenset({b"x-forwarded-prefix"})
_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"})
_TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # an HTTP method (RFC 9110 token)
_LINEBREAK = re.compile(rb"\r\n|\r|\n")


class StreamSession(TypingProtocol):
    """What a stream needs from its session (L{pipegate.http.connector.ConnectorSession})."""

    config: ConnectorConfig
    app: AppPool
    reactor: object  # IReactorTime and IReactorTCP: the clock and the passthrough dialer
    window_budget: window.GrowthBudget | None
    observer: object  # pipegate.http.inspect.recorder.Recorder, or None
    streams: dict[int, ConnectorStream]

    def send(self, frame: frames.Frame) -> None: ...


class TunnelBody:
    """
    The request body as it arrives in DATA frames, written to the app's connection
    (L{pipegate.http.appclient.AppConnection}), which registers it as its transport's
    producer.  Its flow control is the stream's L{window.Flow}: the body reports what
    reached the app and when the app pushes back, and sends the credit the flow returns.
    """

    def __init__(self, stream: ConnectorStream) -> None:
        self.stream = stream
        self.consumer = None
        self._early: list[bytes] = []
        self._ended = False
        self._stopped = False

    def attach(self, consumer) -> None:
        """The request's head is written: what came early goes on, then the rest as it comes."""
        self.consumer = consumer
        early, self._early = self._early, []
        for chunk in early:
            self._hand_on(chunk)
        if self._ended and not self._stopped:
            consumer.end_body()

    def data(self, chunk: bytes) -> None:
        # (Flow.held raises FrameError if the relay overran its credit.)
        self.stream.flow.held(len(chunk))
        if self.consumer is None:
            self._early.append(chunk)
        else:
            self._hand_on(chunk)

    def _hand_on(self, chunk: bytes) -> None:
        if self._stopped:
            return  # (its credit never goes back: the request is over)
        self.consumer.write_body(chunk)
        # After the write: a consumer that pushed back from inside it holds the credit.
        self.stream.grant(self.stream.flow.handed_on(len(chunk)))

    def end(self) -> None:
        self._ended = True
        if self.consumer is not None and not self._stopped:
            self.consumer.end_body()

    def pauseProducing(self):
        self.stream.flow.sink_paused(self.stream.session.reactor.seconds())

    def resumeProducing(self):
        # A local app that stayed full SLOW_SINK or more is not keeping up: the flow
        # shrinks the window back to the initial credit.
        self.stream.grant(self.stream.flow.sink_resumed(self.stream.session.reactor.seconds()))

    def stopProducing(self):
        # The connection to the app is gone or the app answered early: nothing more goes.
        self._stopped = True


class ResponseForwarder:
    """
    Sends the local app's response body as DATA within the credit of the stream's
    L{window.Flow}; the app's connection (C{transport}) is paused while the flow is blocked.
    """

    def __init__(self, stream: ConnectorStream, transport) -> None:
        self.stream = stream
        self.transport = transport
        self._ended = False

    def dataReceived(self, data: bytes) -> None:
        flow = self.stream.flow
        self.stream.send_data(flow.write(data))
        if flow.blocked:
            self.transport.pauseProducing()

    def credit(self, increment: int) -> None:
        flow = self.stream.flow
        self.stream.send_data(flow.credited(increment))
        if not flow.blocked and self.transport is not None:
            self.transport.resumeProducing()
        self._maybe_end()

    def ended(self) -> None:
        self._ended = True
        self.transport = None  # the connection may carry another request now
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self._ended and self.stream.flow.send.queued == 0:
            self.stream.send(frames.End(self.stream.stream_id))
            self.stream.close()


class ConnectorStream:
    """One request from the relay, forwarded to the local app."""

    log = Logger()

    def __init__(self, session: StreamSession, head: frames.RequestHead) -> None:
        self.session = session
        self.stream_id = head.stream
        self.head = head
        config = session.config
        # Both directions' credit: the response goes out within the relay's grants; the
        # request body's window grows while the local app keeps up (docs/protocol.md 1.5).
        self.flow = window.Flow.of(max_window=config.max_window, budget=session.window_budget)
        self.body: TunnelBody | None = None
        self.forwarder: ResponseForwarder | None = None
        self.pipe: StreamPipe | None = None
        self._request = None  # the pipegate.http.appclient.AppRequest until the app answered
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
            self.flow.release()
            self.session.streams.pop(self.stream_id, None)
            # (forwarder -> stream -> forwarder: without this the two, with the stream's
            # head and windows, wait for the cycle collector instead of going now)
            self.forwarder = None

    def grant(self, credit: int) -> None:
        """Send the credit the flow returned (0: none due)."""
        if credit:
            self.send(frames.Window(self.stream_id, credit))

    def send_data(self, chunks: list[bytes | memoryview]) -> None:
        """Send the payloads the flow released."""
        for chunk in chunks:
            self.send(frames.Data(self.stream_id, chunk))

    def reset(self, code: int, reason: str) -> None:
        if not self._closed:
            hint = ""
            if reason.startswith("local app unreachable"):   # the caller's 502 does not name it
                hint = f" (is the app at {self.session.config.target.url(b'').decode()} running?)"
            self.log.info("request {correlation} failed: {code} {reason}{hint}",
                          correlation=self.head.correlation.decode(), code=code, reason=reason, hint=hint)
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

    def request_head(self, length: int | None) -> bytes:
        """
        The head of the request to the app, as bytes: the same lines L{request_headers}
        holds, C{Host} last, and C{Content-Length} or chunked framing for a body
        (C{length}: the body's, None for chunked, -1 without a body).
        """
        head = self.head
        target = self.session.config.target
        method = head.method
        lines = [method + b" " + target.path(head.target) + b" HTTP/1.1"]
        if length is None:
            lines.append(b"Transfer-Encoding: chunked")
        elif length >= 0:
            lines.append(b"Content-Length: %d" % length)
        elif method == b"POST" or method == b"PUT":
            lines.append(b"Content-Length: 0")  # as Agent: a body the method expects, empty
        drop = _DROP_ALWAYS
        if head.host:
            drop = drop | _DROP_HOST
        if head.prefix:
            drop = drop | _DROP_PREFIX
        # filter_headers' rules in one pass: hop-by-hop headers and those Connection names go.
        forwarded_for = []
        named = None
        kept = len(lines)
        for name, value in head.headers:
            lower = name.lower()
            if lower in drop:
                if lower == b"connection":
                    named = connection_names(value) | (named or set())
            elif lower == b"x-forwarded-for":
                forwarded_for.append(value)
            else:
                lines.append(name + b": " + value)
        if named:
            lines[kept:] = [line for line in lines[kept:]
                            if line.partition(b":")[0].lower() not in named]
            forwarded_for = [] if b"x-forwarded-for" in named else forwarded_for
        if head.client:
            forwarded_for.append(head.client)
        if forwarded_for:
            lines.append(b"X-Forwarded-For: " + b", ".join(forwarded_for))
        lines.append(b"X-Forwarded-Proto: " + head.scheme)
        if head.host:
            lines.append(b"X-Forwarded-Host: " + head.host)
        if head.prefix:
            lines.append(b"X-Forwarded-Prefix: " + head.prefix)
        lines.append(b"X-Pipegate-Correlation-Id: " + head.correlation)
        lines.append(self.session.host_line)
        out = b"\r\n".join(lines) + b"\r\n\r\n"
        breaks = len(lines) + 1
        if out.count(b"\n") != breaks or out.count(b"\r") != breaks:
            # A CR or LF inside a name or value: made a space, as Twisted's Headers did.
            lines = [_LINEBREAK.sub(b" ", line) for line in lines]
            out = b"\r\n".join(lines) + b"\r\n\r\n"
        return out

    def start(self) -> None:
        observer = self.session.observer
        if observer is not None:
            self.record = observer.begin(
                self.head, self.session.config.target.path(self.head.target), self.request_headers())
        if self.head.upgrade:
            self._start_passthrough()
            return
        head = self.head
        body = None
        length: int | None = -1
        if not head.end:
            length = None
            declared = [v for n, v in head.headers if n.lower() == b"content-length"]
            if declared:
                try:
                    length = int(declared[0])
                    if length < 0:
                        raise ValueError(length)
                except ValueError:
                    self.reset(http.BAD_REQUEST, "invalid Content-Length")
                    return
            body = self.body = TunnelBody(self)
        if head.method not in _METHODS and not _TOKEN.match(head.method):
            self.reset(http.BAD_REQUEST, f"cannot send the request to the local app: "
                                         f"Invalid method {head.method!r}")
            return
        self._request = self.session.app.request(self, head.method, self.request_head(length), body,
                                                 None if length is None else max(length, 0))

    # -- the app's answer (pipegate.http.appclient.AppConnection calls these)
    def app_response(self, status: int, reason: bytes, headers: list, length: int | None) -> None:
        if self._closed:
            return
        # (The connection kept the hop-by-hop headers.)  The length is restored after the other headers (not for HEAD, 204 and 304,
        # whose Content-Length header, if any, passes as the app sent it), as with Agent.
        if length is not None:
            headers += ((b"Content-Length", b"%d" % length),)
        if 300 <= status < 400:  # a Location naming the app itself: the public URL (http/location.py)
            head = self.head
            headers = public_location(headers, self.session.config.target, head.scheme, head.host, head.prefix)
        # The head, and the body and END when the app's answer is already in (one read),
        # leave in one socket write: the link sends what a reactor turn produced at its end.
        try:
            self.send(frames.ResponseHead(self.stream_id, status, reason[:255], headers))
        except frames.FrameError:
            self.reset(http.BAD_GATEWAY, "the local app's response head is too large")
            self.abandon()
            return
        self.forwarder = ResponseForwarder(self, self._request.connection)

    def app_data(self, data: bytes) -> None:
        if self.forwarder is not None and not self._closed:
            self.forwarder.dataReceived(data)

    def app_end(self) -> None:
        self._request = None
        if self.forwarder is not None and not self._closed:
            self.forwarder.ended()

    def app_failed(self, reason: str, answered: bool) -> None:
        self._request = None
        if self.forwarder is not None:
            self.forwarder.transport = None
            self.reset(http.BAD_GATEWAY, "the local app failed mid-response")
        elif answered:
            self.reset(http.BAD_GATEWAY, reason)
        else:
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
        request, self._request = self._request, None
        if request is not None:
            request.cancel()

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
        # The head goes first, then any DATA that came before the app connection was up.
        self.pipe = StreamPipe(self, self.stream_id, preamble=request_head)

        def failed(failure):
            self.reset(http.BAD_GATEWAY, f"local app unreachable: {failure.getErrorMessage()}")

        connect_protocol(endpoint, self.pipe).addErrback(failed)

    def stream_closed(self, stream_id: int) -> None:
        self.close()


@implementer(IAgentEndpointFactory)
class AppEndpoints:
    """
    The endpoints of the inspector's Agent (its replays) to the local app, made once per
    (scheme, host, port): Agent's own factory built a C{HostnameEndpoint} (host name
    through IDNA), and for https a TLS policy, for every request.
    """

    MAX_CACHED = 16  # the target is one origin; anything else still works, uncached

    def __init__(self, reactor, connect_timeout: float | None = None) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self._policy = client.BrowserLikePolicyForHTTPS()
        self._cache: dict[tuple[bytes, bytes, int], object] = {}

    def endpointForURI(self, uri):
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            try:
                host = uri.host.decode("ascii")
            except UnicodeDecodeError:
                raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII") from None
            kwargs = {} if self.connect_timeout is None else {"timeout": self.connect_timeout}
            endpoint = endpoints.HostnameEndpoint(self.reactor, host, uri.port, **kwargs)
            if uri.scheme == b"https":
                endpoint = endpoints.wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
            elif uri.scheme != b"http":
                raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
            if len(self._cache) < self.MAX_CACHED:
                self._cache[key] = endpoint
        return endpoint
