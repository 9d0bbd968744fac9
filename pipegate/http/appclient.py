"""
The connector's HTTP/1.1 client to the local app, in place of Twisted's C{Agent}:
L{AppConnection}, one kept-alive connection (the request head written as one join,
the response parsed by httptools, the C parser llhttp), and L{AppPool}, the idle
connections to the app with their bound and idle timeout.

A request's owner (L{pipegate.http.outbound.ConnectorStream}) gets the response as
calls: C{app_response(status, reason, headers, length)} (the end-to-end headers, the
body's length when known), C{app_data(bytes)},
C{app_end()}, or C{app_failed(reason, answered)}.  The request body, when there is one,
is a producer (L{pipegate.http.outbound.TunnelBody}) registered on the connection's
transport, so that the app pushing back pauses it.
"""

from __future__ import annotations

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import endpoints
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import BrowserLikePolicyForHTTPS

from pipegate.http import frames
from pipegate.http.pipe import HOP_BY_HOP, connection_names
from pipegate.sockets import connect_protocol, eager_writes, no_delay, plain_writes
from pipegate.timers import cancel

# Twisted's client parser (a LineReceiver) dropped the connection at a header line over
# 16 KiB; llhttp has no line bound of its own, so the same bound is kept here, and the
# whole head is bounded by what one RESPONSE_HEAD frame can carry.
MAX_HEADER_LINE = 16_384
MAX_HEAD = frames.MAX_FRAME_SIZE
# Twisted's HTTPConnectionPool.cachedConnectionTimeout: an idle connection is closed after it.
IDLE_TIMEOUT = 240.0
# Requests retried once on a fresh connection when a reused one dies before any answer
# (Twisted's HTTPConnectionPool retries the same ones, and only without a body).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})


class AppError(Exception):
    """The app's answer cannot be used: the reason, in words."""


class AppRequest:
    """One request: its owner, the head bytes, and the body producer (or None)."""

    __slots__ = ("owner", "method", "head", "body", "length", "connection", "connecting", "retried", "done")

    def __init__(self, owner, method: bytes, head: bytes, body, length: int | None) -> None:
        self.owner = owner
        self.method = method
        self.head = head
        self.body = body
        self.length = length  # the body's: None when it goes chunked
        self.connection: AppConnection | None = None
        self.connecting = None  # the connect Deferred while a new connection is dialled
        self.retried = False
        self.done = False

    def cancel(self) -> None:
        """The owner gave up: stop talking to the app about this request."""
        if self.done:
            return
        self.done = True
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        elif self.connection is not None:
            self.connection.abort()


class AppConnection(Protocol):
    """One HTTP/1.1 connection to the app, carrying one request at a time."""

    def __init__(self, pool: AppPool) -> None:
        self.pool = pool
        self.request: AppRequest | None = None
        self.parser = HttpResponseParser(self)
        self.reused = False
        self.paused = False   # the request's owner paused reading the answer
        self.idle_since = 0.0
        self._answered = False   # a response byte arrived for the current request
        self._in_head = True
        self._head_size = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._until_close = False  # a body that ends when the app closes
        self._body_left = -1       # request body bytes still due (-1: chunked)
        self._stale = False        # a HEAD answer's parser, still running in this read
        self._lost = False

    def connectionMade(self) -> None:
        # Each request head goes to the kernel as it is written (not at the reactor's next
        # turn, after two epoll_ctl calls), Nagle off for bodies written in pieces, as the
        # links to the relay do (pipegate/sockets.py).
        no_delay(self.transport)
        eager_writes(self.transport)

    # -- the request
    def send(self, request: AppRequest) -> None:
        """Write C{request}'s head and start its body."""
        self.request = request
        request.connection = self
        self._answered = False
        body = request.body
        transport = self.transport
        transport.write(request.head)
        if body is not None:
            self._body_left = -1 if request.length is None else request.length
            transport.registerProducer(body, True)
            body.attach(self)

    def write_body(self, data: bytes) -> None:
        if self.request is None:
            return
        left = self._body_left
        if left < 0:
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        elif len(data) > left:
            self._fail("the request body is longer than its Content-Length")
        else:
            self._body_left = left - len(data)
            self.transport.write(data)

    def end_body(self) -> None:
        if self.request is None:
            return
        if self._body_left < 0:
            self.transport.write(b"0\r\n\r\n")
        elif self._body_left:
            self._fail("the request body is shorter than its Content-Length")
            return
        self._body_left = 0
        request = self.request
        if request is not None and request.body is not None:
            request.body = None
            self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def abort(self) -> None:
        """The request's owner left: this connection's state is unknown, close it."""
        self.request = None
        self.transport.stopProducing()
        self.transport.loseConnection()

    # -- the response
    def dataReceived(self, data: bytes) -> None:
        if self.request is None:
            self.transport.loseConnection()  # bytes nobody asked for: not reusable
            return
        self._answered = True
        if self._in_head:
            self._head_size += len(data)
            if self._head_size > MAX_HEAD:
                self._fail("the local app's response head is too large")
                return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self._fail("the local app answered 101 to a request without Upgrade")
        except HttpParserError as e:
            cause = e.__context__
            self._fail(str(cause) if isinstance(cause, AppError)
                       else f"the local app's response is malformed ({e})")
        self._stale = False

    def on_message_begin(self) -> None:
        if self.request is None and not self._stale:
            # An answer nobody asked for, in the read that ended the last one: not reusable.
            self.pool.lost(self)
            self.transport.loseConnection()
        self._in_head = True
        self._reason = b""
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > MAX_HEADER_LINE:
            raise AppError("a header line of the local app's response is too long")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.request
        if request is None or self._stale:
            return
        status = self.parser.get_status_code()
        if status < 200:
            return  # 1xx: interim, ignored as Twisted's client does; llhttp ends it here
        self._in_head = False
        self._head_size = 0
        # One pass: the hop-by-hop headers stay here (framing is this connection's), and
        # Content-Length too, except for answers without a body (HEAD, 204, 304), where
        # it passes as the app sent it.
        no_body = request.method == b"HEAD" or status == 204 or status == 304
        headers = []
        named = None
        length = None
        chunked = False
        for name, value in self._headers:
            lower = name.lower()
            if lower not in HOP_BY_HOP:
                if lower != b"content-length" or no_body:
                    headers.append((name, value))
                else:
                    length = int(value)
            elif lower == b"connection":
                named = connection_names(value) | (named or set())
            elif lower == b"transfer-encoding":
                chunked = True
        if named:
            headers = [(n, v) for n, v in headers if n.lower() not in named]
        if no_body:
            length = None
            chunked = False
        self._until_close = not no_body and length is None and not chunked
        request.owner.app_response(status, self._reason, headers, None if chunked else length)
        if request.method == b"HEAD" and self.request is request:
            # llhttp cannot be told the answer was to HEAD: it would wait for the body the
            # head declares.  The answer ends here; a fresh parser reads the next one.
            keep = self.parser.should_keep_alive()
            self._stale = True
            self.parser = HttpResponseParser(self)
            self._in_head = True
            self._finished(request, keep)

    def on_body(self, data: bytes) -> None:
        request = self.request
        if self._stale:
            self.transport.loseConnection()  # a body after a HEAD answer: not reusable
        elif request is not None:
            request.owner.app_data(data)

    def on_message_complete(self) -> None:
        request = self.request
        if request is None or self._stale:
            return
        if self.parser.get_status_code() < 200:
            self._in_head = True
            return
        self._in_head = True
        self._finished(request, self.parser.should_keep_alive())

    def _finished(self, request: AppRequest, keep: bool) -> None:
        keep = keep and not self._until_close
        self.request = None
        request.done = True
        if request.body is not None:  # answered before the body was all sent
            request.body.stopProducing()
            request.body = None
            self.transport.unregisterProducer()
            keep = False
        if keep and not self._lost:
            self.pool.release(self)  # first: an owner may send its next request from app_end
        else:
            self.transport.loseConnection()
        request.owner.app_end()

    def _fail(self, reason: str) -> None:
        request, self.request = self.request, None
        self.transport.loseConnection()
        if request is not None and not request.done:
            request.done = True
            request.owner.app_failed(reason, self._answered)

    def connectionLost(self, reason=None) -> None:
        plain_writes(self.transport)
        # The parser's callbacks are this connection's bound methods: a reference cycle.
        self.parser = None
        self._lost = True
        self.pool.lost(self)
        request, self.request = self.request, None
        if request is None or request.done:
            return
        if self._until_close and not self._in_head:
            request.done = True
            request.owner.app_end()
            return
        if (not self._answered and self.reused and not request.retried
                and request.body is None and request.method in IDEMPOTENT):
            request.retried = True
            request.connection = None
            self.pool.dial(request)  # the app closed an idle connection as it was reused
            return
        request.done = True
        why = getattr(reason, "value", reason)
        request.owner.app_failed(str(why) or type(why).__name__, self._answered)


class AppPool:
    """
    The connections to the local app: idle ones kept (at most C{max_idle}, each closed
    after C{idle_timeout} seconds unused), new ones dialled through one endpoint made once.
    """

    log = Logger()

    def __init__(self, reactor, endpoint, *, max_idle: int, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: list[AppConnection] = []  # oldest first; the newest is reused first
        self.active: set[AppConnection] = set()
        self._sweep = None
        self.closed = False

    @classmethod
    def to(cls, reactor, scheme: bytes, host: bytes, port: int, *, connect_timeout: float | None,
           **kwargs) -> AppPool:
        """A pool to C{scheme://host:port}, trusted as Agent's default policy trusts it."""
        timeout = {} if connect_timeout is None else {"timeout": connect_timeout}
        endpoint = endpoints.HostnameEndpoint(reactor, host.decode("ascii"), port, **timeout)
        if scheme == b"https":
            endpoint = endpoints.wrapClientTLS(
                BrowserLikePolicyForHTTPS().creatorForNetloc(host, port), endpoint)
        return cls(reactor, endpoint, **kwargs)

    def request(self, owner, method: bytes, head: bytes, body=None, length: int | None = None) -> AppRequest:
        """Send a request (C{head}: its bytes up to the blank line) on an idle or a new connection."""
        request = AppRequest(owner, method, head, body, length)
        idle = self.idle
        if idle:
            connection = idle.pop()
            connection.reused = True
            self.active.add(connection)
            connection.send(request)
        else:
            self.dial(request)
        return request

    def dial(self, request: AppRequest) -> None:
        connection = AppConnection(self)
        d = request.connecting = connect_protocol(self.endpoint, connection)

        def connected(_):
            request.connecting = None
            if request.done:
                self.release(connection)
                return
            self.active.add(connection)
            connection.send(request)

        def failed(failure):
            request.connecting = None
            if not request.done:
                request.done = True
                request.owner.app_failed(failure.getErrorMessage(), False)

        d.addCallbacks(connected, failed)

    def release(self, connection: AppConnection) -> None:
        """C{connection} finished its request and may be reused."""
        self.active.discard(connection)
        if self.closed or len(self.idle) >= self.max_idle:
            connection.transport.loseConnection()
            return
        if connection.paused:  # the answer ended in the read that filled its stream's window
            connection.resumeProducing()
        connection.idle_since = self.reactor.seconds()
        self.idle.append(connection)
        if self._sweep is None:
            self._sweep = self.reactor.callLater(self.idle_timeout, self._expire)

    def lost(self, connection: AppConnection) -> None:
        self.active.discard(connection)
        try:
            self.idle.remove(connection)
        except ValueError:
            pass

    def _expire(self) -> None:
        self._sweep = None
        idle = self.idle
        limit = self.reactor.seconds() - self.idle_timeout
        while idle and idle[0].idle_since <= limit:
            idle.pop(0).transport.loseConnection()
        if idle:
            self._sweep = self.reactor.callLater(idle[0].idle_since - limit, self._expire)

    def close(self) -> None:
        """Close every idle connection and stop the sweep (the connector stops)."""
        self.closed = True  # connections that finish later close too
        self._sweep = cancel(self._sweep)
        idle, self.idle = self.idle, []
        for connection in idle:
            connection.transport.loseConnection()

