"""
Loopback helpers for integration tests: real listeners on 127.0.0.1, real clients,
and a cleanup that closes every connection so trial's reactor stays clean.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import os
import random
import secrets
import shutil
import socket
import sys
from contextlib import contextmanager

import attrs
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketClientFactory, WebSocketClientProtocol, WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.protocols.policies import WrappingFactory
from twisted.web import resource, server
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from pipegate import auth
from pipegate.http.connector import Connector
from pipegate.http.target import ConnectorConfig, Target
from pipegate.http.public import RelaySite
from pipegate.http.relay import Relay, RelayConfig

SECRET = "integration-test-secret-0123456789-abcdefghijklmn"
SETTINGS = auth.JWTSettings(secret=SECRET)


def token_for(tunnel_id: str, settings: auth.JWTSettings = SETTINGS, now: float | None = None,
              shared: bool = False) -> str:
    """A fresh token (its own jti); several connectors of one tunnel need C{shared} or one token."""
    return auth.mint(settings, tunnel_id, reactor.seconds() if now is None else now, shared=shared)


async def eventually(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll C{predicate} until true; fail after C{timeout} seconds (a bound, not a goal)."""
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError(f"condition not reached within {timeout} s")
        await task.deferLater(reactor, interval, lambda: None)
        waited += interval


def pattern(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


_ports = random.Random(os.urandom(16))   # (its own generator: a test seeding `random` changes nothing)


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel draws the source ports of outgoing connections and C{bind(0)} from."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        return 32768, 60999   # Linux's default (and no /proc elsewhere)
    return low, high


def free_ports(count: int, kind: int = socket.SOCK_STREAM) -> list[int]:
    """
    C{count} distinct ports of 127.0.0.1, free when picked, for a process the test starts to
    bind.  They are picked below the ephemeral range: a port from C{bind(0)} is one the
    kernel may hand the very next outgoing connection (of this test, of another process) as
    its source port, which then holds it when the service tries to listen.
    """
    low = min(ephemeral_ports()[0], 65536)
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            s = socket.socket(socket.AF_INET, kind)
            try:
                s.bind(("127.0.0.1", _ports.randrange(10000, max(low, 10001))))
            except OSError:   # in use (or in TIME_WAIT): pick another
                s.close()
                continue
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port of 127.0.0.1 that was free a moment ago (see L{free_ports})."""
    return free_ports(1, kind)[0]


def limited_twistd(nofile: int) -> list[str]:
    """twistd with soft and hard RLIMIT_NOFILE lowered to C{nofile} (so raising cannot help)."""
    return [sys.executable, "-c",
            "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d)); "
            "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()" % (nofile, nofile)]


class NullNode:
    """A mux link's node (pipegate.mux.session.Node) that ignores every event: for driving
    a MuxLink alone, in memory."""

    def link_admitted(self, link) -> None:
        pass

    def link_lost(self, link) -> None:
        pass

    def link_frame(self, link, frame) -> None:
        pass


@attrs.frozen
class BehindProxyListener:
    """What an application behind Twisted's own PROXY protocol listener saw of one connection."""

    peer: object    # transport.getPeer(): the header's source, or the real peer without one
    host: object    # transport.getHost(): the header's destination, or the real address
    data: bytes     # what reached the application after the header
    closed: bool    # the listener dropped the connection (an invalid header)


def behind_proxy_listener(*chunks: bytes, peer=IPv4Address("TCP", "127.0.0.1", 40000),
                          host=IPv4Address("TCP", "127.0.0.1", 8000)) -> BehindProxyListener:
    """
    Feed C{chunks}, one read each, to a connection accepted by the stock C{haproxy:} server
    endpoint (twisted.protocols.haproxy, Twisted's PROXY protocol v1/v2 reader), in memory
    on a MemoryReactor and a StringTransport from C{peer} to C{host}, and return what
    the application behind it saw.  Stock Twisted drops a connection whose first read is
    shorter than 8 bytes (v1) or 16 (v2), so the first chunk must be at least that long.
    """
    memory = MemoryReactor()
    apps: list[Protocol] = []
    received: list[bytes] = []

    class App(Protocol):
        def connectionMade(self) -> None:
            apps.append(self)

        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    endpoints.serverFromString(memory, "haproxy:tcp:0:interface=127.0.0.1").listen(Factory.forProtocol(App))
    [(_, listener, _, _)] = memory.tcpServers
    transport = StringTransport(hostAddress=host, peerAddress=peer)
    connection = listener.buildProtocol(peer)
    connection.makeConnection(transport)
    for chunk in chunks:
        connection.dataReceived(chunk)
    [app] = apps
    return BehindProxyListener(app.transport.getPeer(), app.transport.getHost(), b"".join(received),
                               transport.disconnecting)


class Loopback:
    """Owns listeners and connections of one test and tears them all down."""

    def __init__(self, testcase) -> None:
        self.testcase = testcase
        self.wrappers: list[WrappingFactory] = []
        self.ports = []
        self.services = []
        self.pools: list[HTTPConnectionPool] = []
        testcase.addCleanup(self.close)

    async def listen(self, factory, port: int = 0, description: str | None = None):
        """Listen on 127.0.0.1:C{port}, or on the server endpoint C{description}."""
        wrapper = WrappingFactory(factory)
        self.wrappers.append(wrapper)
        if description is None:
            endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
        else:
            endpoint = endpoints.serverFromString(reactor, description)
        listening = await endpoint.listen(wrapper)
        self.ports.append(listening)
        return listening

    async def drop_connections(self, wrapper: WrappingFactory | None = None) -> None:
        for w in ([wrapper] if wrapper else self.wrappers):
            for proto in list(w.protocols):
                if proto.transport is not None:
                    proto.transport.abortConnection()
        await eventually(lambda: all(not w.protocols for w in ([wrapper] if wrapper else self.wrappers)))

    async def relay(self, port: int = 0, listen: str | None = None, **config):
        relay = Relay(RelayConfig(jwt=config.pop("jwt", SETTINGS), **config), reactor)
        relay.startService()
        self.services.append(relay)
        listening = await self.listen(RelaySite(relay), port, listen)
        return relay, listening

    async def app(self, root: resource.Resource | None = None):
        listening = await self.listen(server.Site(root or TestApp()))
        return listening

    async def connector(self, relay_port, app_port_or_url, tunnel_id: str = "t1", *,
                        token: str | None = None, wait: bool = True, **kwargs):
        target = app_port_or_url if isinstance(app_port_or_url, str) else (
            f"http://127.0.0.1:{app_port_or_url.getHost().port}")
        # A short drain: a test that leaves a request hanging in the app would wait out
        # the 30 s default when the connector stops at cleanup.
        config = ConnectorConfig(Target.parse(target), **{"drain_timeout": 0.5, **kwargs.pop("config", {})})
        connector = Connector(
            reactor, config, f"ws://127.0.0.1:{port_number(relay_port)}",
            token or token_for(tunnel_id), tunnel_id,
            retry_policy=kwargs.pop("retry_policy", lambda attempt: 0.1), **kwargs)
        connector.startService()
        self.services.append(connector)
        if wait:
            await connector.online
        return connector

    def agent(self) -> Agent:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.pools.append(pool)
        return Agent(reactor, pool=pool)

    async def close(self) -> None:
        for pool in self.pools:
            await pool.closeCachedConnections()
        for service in reversed(self.services):
            if service.running:
                await defer.maybeDeferred(service.stopService)
        for port in self.ports:
            await port.stopListening()
        await self.drop_connections()
        # Let aborted connections deliver connectionLost and cancel their timers.
        await task.deferLater(reactor, 0.05, lambda: None)


async def request(agent: Agent, method: bytes, url: str, headers: dict | None = None,
                  body: bytes | None = None):
    """Send a request; returns (response, body)."""
    from twisted.web.client import FileBodyProducer
    import io

    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    hdrs = Headers({k: v if isinstance(v, list) else [v] for k, v in (headers or {}).items()})
    response = await agent.request(method, url.encode(), hdrs, producer)
    data = await readBody(response)
    return response, data


@attrs.define(eq=False)
class RawApp(Factory):
    """
    Answers by path: /ws -> 101 then echo; /no -> 200 with a 5-byte body, connection kept;
    /chunked -> 200 chunked; /silent -> nothing; anything else -> 200 "ok", closed.
    C{heads} are the request heads it parsed, C{after} what came after a non-101 answer.
    """

    heads: list = attrs.field(factory=list)
    after: list = attrs.field(factory=list)
    conns: list = attrs.field(factory=list)

    def buildProtocol(self, addr):
        proto = RawAppProtocol()
        proto.factory = self
        return proto


class RawAppProtocol(Protocol):
    state = "head"
    buffer = b""

    def connectionMade(self):
        self.factory.conns.append(self)

    def dataReceived(self, data):
        if self.state == "echo":
            self.transport.write(data)
            return
        if self.state == "done":
            self.factory.after.append(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        self.factory.heads.append(head)
        path = head.split(b" ")[1]
        if path.startswith(b"/ws"):
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n")
            self.state = "echo"
            if rest:
                self.transport.write(rest)
            return
        self.state = "done"
        if rest:
            self.factory.after.append(rest)
        if path.startswith(b"/no"):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        elif path.startswith(b"/chunked"):
            self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"3\r\nabc\r\n0\r\n\r\n")
        elif not path.startswith(b"/silent"):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.transport.loseConnection()


class RawHTTP(Protocol):
    """Sends bytes as they are and collects everything the server sends back."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = bytearray()
        self.done = defer.Deferred()

    def connectionMade(self):
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(bytes(self.received))


def port_number(port) -> int:
    """A port number, or the number of a listening port."""
    return port if isinstance(port, int) else port.getHost().port


async def connect_raw(port, payload: bytes, source: str | None = None) -> RawHTTP:
    """Connect to C{port} (a listening port or its number) on 127.0.0.1, from C{source} if given."""
    proto = RawHTTP(payload)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port_number(port),
                                            bindAddress=(source, 0) if source else None)
    await endpoints.connectProtocol(endpoint, proto)
    return proto


async def read_steadily(sock, chunk: int, every: float, timeout: float) -> tuple[str, bytes]:
    """
    Read up to C{chunk} bytes from the non-blocking socket C{sock} every C{every} seconds until
    it ends: ("eof" or "reset", what was read).  A slow but steady reader.
    """
    from twisted.internet import task

    got, ended = bytearray(), []

    def read():
        try:
            data = sock.recv(chunk)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = None
        if not data:
            ended.append("eof" if data is not None else "reset")
            reading.stop()
        else:
            got.extend(data)
    reading = task.LoopingCall(read)
    reading.start(every)
    await eventually(lambda: ended, timeout=timeout)
    return ended[0], bytes(got)


async def raw_request(port, payload: bytes, source: str | None = None) -> bytes:
    """Send raw bytes (ending with a Connection: close request) and read until close."""
    proto = await connect_raw(port, payload, source)
    return await proto.done


def split_response(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return lines[0], headers, body


def dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return bytes(out)


# -- the local app used behind the connector -----------------------------------------


@implementer(IPushProducer)
class PatternProducer:
    """Writes C{size} bytes of L{pattern} to a request, honouring backpressure."""

    def __init__(self, request, size: int, app: TestApp) -> None:
        self.request = request
        self.data = pattern(size)
        self.offset = 0
        self.paused = False
        self.app = app

    def start(self):
        self.request.registerProducer(self, True)
        self._pump()

    def _pump(self):
        while not self.paused and self.offset < len(self.data):
            chunk = self.data[self.offset:self.offset + 65536]
            self.offset += len(chunk)
            self.app.produced += len(chunk)
            self.request.write(chunk)
        if self.offset >= len(self.data) and not self.paused:
            self.request.unregisterProducer()
            self.request.finish()
            self.offset += 1  # finished

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        if self.offset > len(self.data):
            return
        self.paused = False
        self._pump()

    def stopProducing(self):
        self.paused = True
        self.offset = len(self.data) + 1


class TestApp(resource.Resource):
    """
    The local web app: /echo, /headers, /cookies, /gzip, /status/N, /big/N, /sha,
    /hang, /slow/SECONDS, /chunks (second chunk waits for release_chunks()), /ws.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []
        self.hanging: list = []
        self.produced = 0
        self.chunk_gate: defer.Deferred | None = None
        ws = WebSocketServerFactory()
        ws.protocol = EchoServer
        self.ws = WebSocketResource(ws)

    def release_chunks(self):
        gate, self.chunk_gate = self.chunk_gate, None
        if gate is not None:
            gate.callback(None)

    def render(self, request):
        body = request.content.read()
        info = {
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                        for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_len": len(body),
        }
        self.seen.append(info)
        path = request.path.decode("latin-1")
        if path.startswith("/ws"):
            return self.ws.render(request)
        if path == "/echo":
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"x-body-sha256", info["body_sha256"].encode())
            return body
        if path == "/cookies":
            request.responseHeaders.setRawHeaders(
                b"set-cookie", [b"a=1; Path=/", b"b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/"])
            return b"cookies"
        if path == "/gzip":
            request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-type", b"text/plain")
            return gzip.compress(b"hello compressed world\n" * 100, mtime=0)
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            request.setResponseCode(code)
            if code == 302:
                request.setHeader(b"location", b"/elsewhere")
            return b"" if code in (204, 304) else f"status {code}".encode()
        if path.startswith("/big/"):
            PatternProducer(request, int(path.rsplit("/", 1)[1]), self).start()
            return server.NOT_DONE_YET
        if path == "/hang":
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda f: None)
            return server.NOT_DONE_YET
        if path.startswith("/slow/"):
            seconds = float(path.rsplit("/", 1)[1])
            call = reactor.callLater(seconds, self._late, request)
            request.notifyFinish().addErrback(lambda f: call.cancel() if call.active() else None)
            return server.NOT_DONE_YET
        if path == "/chunks":
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"first chunk\n")
            self.chunk_gate = defer.Deferred()
            self.chunk_gate.addCallback(lambda _: (request.write(b"last chunk\n"), request.finish()))
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(info).encode()

    def _late(self, request):
        request.write(b"late answer")
        request.finish()


class EchoServer(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(b"echo:" + payload, isBinary)


class WSClient(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.messages.append(payload)
        waiter, self.factory.waiter = self.factory.waiter, None
        if waiter is not None:
            waiter.callback(payload)

    def onClose(self, wasClean, code, reason):
        self.factory.closed.append((code, reason))
        if not self.factory.opened.called:
            self.factory.opened.errback(Exception(f"closed {code} {reason}"))
        waiter, self.factory.waiter = self.factory.waiter, None
        if waiter is not None:
            waiter.errback(Exception(f"closed {code} {reason}"))


async def ws_connect(loop: Loopback, port, path: str, protocols=None, headers=None):
    url = f"ws://127.0.0.1:{port.getHost().port}{path}"
    factory = WebSocketClientFactory(url, protocols=protocols or [], headers=headers or {})
    factory.protocol = WSClient
    factory.opened = defer.Deferred()
    factory.messages = []
    factory.closed = []
    factory.waiter = None
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    proto = await endpoint.connect(factory)

    async def close():
        if proto.transport is not None and proto.transport.connected:
            proto.transport.abortConnection()
        await task.deferLater(reactor, 0, lambda: None)
    loop.testcase.addCleanup(close)
    return factory, proto


def new_secret() -> str:
    return secrets.token_hex(16)


def debian_tool(testcase, name: str, path: str | None = None) -> str:
    """
    The path of a Debian tool a test uses as a real peer (C{path} if executable, else
    found on C{PATH}).  Missing: the test skips, except under C{CI=true}, where
    C{.ci/run} installs it and its absence fails the test.
    """
    found = path if path and os.access(path, os.X_OK) else shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            testcase.fail(f"{name} is required when CI=true but is not installed")
        where = f" ({path})" if path else ""
        raise unittest.SkipTest(f"{name} is not installed{where}")
    return found


def accepts(port: int) -> bool:
    """True once something accepts TCP connections on 127.0.0.1:C{port}."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class PeerProcess(ProcessProtocol):
    """A real peer (HAProxy, nginx, redis-server) run by a test: its output, and its end."""

    def __init__(self) -> None:
        self.output = b""
        self.ended = defer.Deferred()
        self.done = False

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.done = True
        self.ended.callback(None)


async def start_peer(case: unittest.TestCase, argv: list[str], ports) -> PeerProcess:
    """
    Run C{argv} in the foreground until C{case} ends (TERM, then KILL after 5 s); return once
    it accepts on every port of C{ports} on 127.0.0.1, or fail the test with its output.
    """
    process = PeerProcess()
    name = os.path.basename(argv[0])
    reactor.spawnProcess(process, argv[0], argv, env=dict(os.environ))
    case.addCleanup(stop_peer, process)
    waited = 0.0
    while not all(accepts(port) for port in ports):
        if process.done:
            case.fail(f"{name} exited: {process.output.decode(errors='replace')}")
        if waited > 10:
            case.fail(f"{name} did not listen within 10 s: {process.output.decode(errors='replace')}")
        await task.deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
    return process


async def stop_peer(process: PeerProcess) -> None:
    if not process.done:
        process.transport.signalProcess("TERM")
        killer = reactor.callLater(5, lambda: process.done or process.transport.signalProcess("KILL"))
        await process.ended
        if killer.active():
            killer.cancel()


def shuttle(client, client_transport, server, server_transport, clock=None) -> None:
    """
    Move bytes between two protocols on StringTransports until neither has more to say
    (each side's writes delivered to the other's dataReceived); with C{clock}, run its
    due calls (advance(0)) before each round.
    """
    moved = True
    while moved:
        moved = False
        if clock is not None:
            clock.advance(0)
        for source, sink in ((client_transport, server), (server_transport, client)):
            data = source.value()
            if data:
                source.clear()
                sink.dataReceived(data)
                moved = True



@contextmanager
def collector_off():
    """
    Inside the block only reference counting frees objects: the cycle collector is off
    (and restored after).  With weak references to them, a test sees what a piece of
    code leaves in reference cycles, which only the collector would free.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
