"""
The connector's HTTP/1.1 client to the local app (pipegate/http/appclient.py): without
sockets (each connection's transport a L{StringTransport}, the app's answers played as
bytes, time on a L{MemoryReactorClock}), then against twisted.web on loopback sockets.
"""

from __future__ import annotations

import os
import weakref

from twisted.internet import defer, endpoints, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial import unittest
from twisted.web import resource, server

from pipegate.http.appclient import IDLE_TIMEOUT, MAX_HEADER_LINE, AppPool
from tests.support import collector_off, eventually
from tests.test_tls import make_ca_and_cert


class Owner:
    """Records what the client tells a request's owner."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def app_response(self, status, reason, headers, length):
        self.events.append(("head", status, reason, list(headers), length))

    def app_data(self, data):
        if self.events and self.events[-1][0] == "data":
            self.events[-1] = ("data", self.events[-1][1] + data)
        else:
            self.events.append(("data", data))

    def app_end(self):
        self.events.append(("end",))

    def app_failed(self, reason, answered):
        self.events.append(("failed", reason, answered))


class Body:
    """A request body producer: what the connection asked of it."""

    def __init__(self, chunks=(), end=True) -> None:
        self.chunks = list(chunks)
        self.ended = end
        self.state = "new"

    def attach(self, consumer):
        self.consumer = consumer
        for chunk in self.chunks:
            consumer.write_body(chunk)
        if self.ended:
            consumer.end_body()

    def pauseProducing(self):
        self.state = "paused"

    def resumeProducing(self):
        self.state = "producing"

    def stopProducing(self):
        self.state = "stopped"


class App:
    """The endpoint: each connection gets a StringTransport, or waits, or is refused."""

    def __init__(self) -> None:
        self.connections: list[tuple[object, StringTransport]] = []
        self.refuse: Exception | None = None

    def connect(self, factory):
        if self.refuse is not None:
            return defer.fail(self.refuse)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)


def lose(protocol, transport, why=ConnectionDone):
    transport.disconnecting = True
    protocol.connectionLost(Failure(why()))


class ClientTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.app = App()
        self.pool = AppPool(self.clock, self.app, max_idle=2)

    def get(self, method=b"GET", body=None, length=None):
        owner = Owner()
        head = method + b" /x HTTP/1.1\r\nHost: app\r\n\r\n"
        request = self.pool.request(owner, method, head, body, length)
        return owner, request

    def test_keep_alive_reuses_the_connection(self):
        first, _ = self.get()
        [(protocol, transport)] = self.app.connections
        self.assertEqual(transport.value(), b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n")
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nhi")
        self.assertEqual(first.events, [("head", 200, b"OK", [(b"X-A", b"1")], 2), ("data", b"hi"), ("end",)])
        self.assertEqual(self.pool.idle, [protocol])
        transport.clear()
        second, _ = self.get()
        self.assertEqual(len(self.app.connections), 1)
        self.assertEqual(transport.value(), b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n")
        protocol.dataReceived(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(second.events, [("head", 404, b"Not Found", [], None),
                                         ("data", b"abc"), ("end",)])
        self.assertFalse(transport.disconnecting)

    def test_only_end_to_end_headers_reach_the_owner(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n"
                              b"Content-Length: 1\r\nX-End: 2\r\n\r\nz")
        self.assertEqual(owner.events[0], ("head", 200, b"OK", [(b"X-End", b"2")], 1))

    def test_a_closed_connection_leaves_nothing_for_the_cycle_collector(self):
        # The httptools parser holds the connection's bound methods; once closed, the
        # connection is freed by reference counting alone.
        with collector_off():
            self.get()
            protocol, transport = self.app.connections.pop()
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            lose(protocol, transport)
            gone = weakref.ref(protocol)
            del protocol, transport
            self.assertIsNone(gone())

    def test_connection_close_is_not_reused(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.assertEqual(owner.events[-1], ("end",))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.idle, [])

    def test_chunked_request_body(self):
        owner, _ = self.get(b"POST", Body([b"hello", b"world!"]), None)
        protocol, transport = self.app.connections[0]
        self.assertTrue(transport.value().endswith(b"\r\n\r\n5\r\nhello\r\n6\r\nworld!\r\n0\r\n\r\n"))
        self.assertIsNone(transport.producer)  # the body is done: unregistered

    def test_sized_request_body_and_its_length_enforced(self):
        body = Body([b"hello"], end=False)
        owner, _ = self.get(b"PUT", body, 5)
        protocol, transport = self.app.connections[0]
        self.assertIs(transport.producer, body)
        body.consumer.end_body()
        self.assertTrue(transport.value().endswith(b"\r\n\r\nhello"))
        longer = Body([b"hello!"])
        owner, _ = self.get(b"PUT", longer, 5)
        self.assertEqual(owner.events, [("failed", "the request body is longer than its Content-Length", False)])
        self.assertTrue(self.app.connections[1][1].disconnecting)

    def test_answer_before_the_body_ends_stops_the_body_and_closes(self):
        body = Body([b"part"], end=False)
        owner, _ = self.get(b"POST", body, None)
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(owner.events[-1], ("end",))
        self.assertEqual(body.state, "stopped")
        self.assertTrue(transport.disconnecting)

    def test_response_split_at_every_byte(self):
        raw = (b"HTTP/1.1 100 Continue\r\n\r\n"
               b"HTTP/1.1 200 Fine\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n")
        expected = [("head", 200, b"Fine", [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")], None),
                    ("data", b"wikipedia"), ("end",)]
        for at in range(len(raw) + 1):
            self.app.connections.clear()
            self.pool = AppPool(self.clock, self.app, max_idle=2)
            owner, _ = self.get()
            protocol, transport = self.app.connections[0]
            for part in (raw[:at], raw[at:]):
                if part:
                    protocol.dataReceived(part)
            self.assertEqual(owner.events, expected, f"split at {at}")
            self.assertFalse(transport.disconnecting, f"split at {at}")
            self.assertEqual(self.pool.idle, [protocol], f"split at {at}")

    def test_head_204_and_304_have_no_body_and_keep_the_connection(self):
        for method, answer in [(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
                               (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
                               (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n")]:
            owner, _ = self.get(method)
            protocol, transport = self.app.connections[0]
            protocol.dataReceived(answer)
            head, end = owner.events
            self.assertEqual((head[0], head[4], end), ("head", None, ("end",)), answer)
            self.assertEqual(self.pool.idle, [protocol])
        self.assertEqual(len(self.app.connections), 1)
        # The HEAD answer's Content-Length passes as the app sent it.
        owner, _ = self.get(b"HEAD")
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
        self.assertEqual(owner.events[0][3], [(b"Content-Length", b"99")])
        # Then a GET on the same connection reads its own answer.
        owner, _ = self.get()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual(owner.events[1:], [("data", b"abc"), ("end",)])

    def test_bytes_after_a_head_answer_close_the_connection(self):
        owner, _ = self.get(b"HEAD")
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(owner.events[-1], ("end",))
        self.assertTrue(transport.disconnecting)
        lose(protocol, transport)
        self.assertEqual(self.pool.idle, [])

    def test_app_closing_mid_body_fails_the_request(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        lose(protocol, transport, ConnectionLost)
        self.assertEqual(owner.events[-1][0], "failed")
        self.assertTrue(owner.events[-1][2])  # after an answer began
        self.assertEqual(self.pool.idle, [])

    def test_body_until_close_ends_when_the_app_closes(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        lose(protocol, transport)
        self.assertEqual(owner.events[1:], [("data", b"all of it"), ("end",)])

    def test_malformed_status_line_is_a_clear_error(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTP/1.1 200 OK\r\n\r\n")
        [(event, reason, answered)] = owner.events
        self.assertEqual((event, answered), ("failed", True))
        self.assertIn("the local app's response is malformed", reason)
        self.assertTrue(transport.disconnecting)

    def test_header_line_and_head_are_bounded(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * MAX_HEADER_LINE + b"\r\n\r\n")
        self.assertEqual(owner.events, [("failed", "a header line of the local app's response is too long", True)])
        owner, _ = self.get()
        protocol, transport = self.app.connections[1]
        endless = b"X-Many: " + b"v" * 1000 + b"\r\n"
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        for _ in range(300):
            protocol.dataReceived(endless)
            if owner.events:
                break
        self.assertEqual(owner.events, [("failed", "the local app's response head is too large", True)])
        self.assertTrue(transport.disconnecting)

    def test_idle_connection_closed_by_the_app_is_not_reused(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.pool.idle, [protocol])
        lose(protocol, transport)
        self.assertEqual(self.pool.idle, [])
        self.get()
        self.assertEqual(len(self.app.connections), 2)

    def test_bytes_on_an_idle_connection_close_it(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.disconnecting)

    def test_a_second_answer_in_the_same_read_closes_the_connection(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\n")
        self.assertEqual(owner.events[1:], [("data", b"a"), ("end",)])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.idle, [])
        self.get()
        self.assertEqual(len(self.app.connections), 2)

    def test_reused_connection_dying_before_an_answer_retries_once(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        owner, _ = self.get()
        lose(protocol, transport)  # the app had closed it as it was reused
        self.assertEqual(len(self.app.connections), 2)
        retry, retry_transport = self.app.connections[1]
        self.assertEqual(retry_transport.value(), b"GET /x HTTP/1.1\r\nHost: app\r\n\r\n")
        retry.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual([e[0] for e in owner.events], ["head", "end"])

    def test_no_retry_with_a_body_or_on_a_fresh_connection(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        lose(protocol, transport)  # a fresh connection: no retry
        self.assertEqual(owner.events, [("failed", "Connection was closed cleanly.", False)])
        owner, _ = self.get()
        protocol, transport = self.app.connections[1]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        owner, _ = self.get(b"POST", Body([b"x"]), 1)
        lose(protocol, transport)
        self.assertEqual(owner.events[0][0], "failed")
        self.assertEqual(len(self.app.connections), 2)

    def test_unreachable_app(self):
        self.app.refuse = ConnectionRefusedError("connection refused")
        owner, _ = self.get()
        [(event, reason, answered)] = owner.events
        self.assertEqual((event, answered), ("failed", False))
        self.assertIn("connection refused", reason)

    def test_connections_that_finish_after_close_are_not_kept(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        self.pool.close()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(owner.events[-1], ("end",))
        self.assertTrue(transport.disconnecting)
        self.assertEqual((self.pool.idle, self.clock.getDelayedCalls()), ([], []))

    def test_idle_bound_and_idle_timeout(self):
        owners = [self.get()[0] for _ in range(3)]
        self.assertEqual(len(self.app.connections), 3)
        for protocol, transport in self.app.connections:
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual([e[-1] for e in (o.events for o in owners)], [("end",)] * 3)
        self.assertEqual(len(self.pool.idle), 2)  # max_idle
        self.assertTrue(self.app.connections[2][1].disconnecting)
        self.clock.advance(IDLE_TIMEOUT / 2)
        owner, _ = self.get()  # reuses the newest idle one
        protocol, transport = self.app.connections[1]
        self.assertIn(b"GET", transport.value())
        self.clock.advance(IDLE_TIMEOUT / 2)
        self.assertTrue(self.app.connections[0][1].disconnecting)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_while_connecting_and_while_waiting(self):
        waiting = defer.Deferred()
        self.app.connect = lambda factory: waiting
        owner, request = self.get()
        request.cancel()
        self.assertEqual(owner.events, [])
        self.assertIsNone(request.connecting)
        self.app = App()
        self.pool.endpoint = self.app
        owner, request = self.get()
        protocol, transport = self.app.connections[0]
        request.cancel()
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(owner.events, [])

    def test_pause_while_the_answer_ends_is_undone_when_idle(self):
        owner, _ = self.get()
        protocol, transport = self.app.connections[0]
        owner.app_data = lambda data: protocol.pauseProducing()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual(self.pool.idle, [protocol])
        self.assertEqual(transport.producerState, "producing")


class Page(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.channels: list = []

    def render(self, request):
        self.channels.append(request.channel)
        return b"page of " + request.path


class Waiting(Owner):
    def __init__(self) -> None:
        super().__init__()
        self.done = defer.Deferred()

    def app_end(self):
        super().app_end()
        self.done.callback(self.events)

    def app_failed(self, reason, answered):
        super().app_failed(reason, answered)
        self.done.callback(self.events)


class LoopbackTests(unittest.TestCase):
    """The pool against twisted.web on real loopback sockets, plain and TLS."""

    async def listen(self, tls: tuple[str, str] | None = None):
        self.page = Page()
        site = server.Site(self.page)
        description = ("tcp:0:interface=127.0.0.1" if tls is None
                       else f"ssl:0:interface=127.0.0.1:privateKey={tls[0]}:certKey={tls[1]}")
        port = await endpoints.serverFromString(reactor, description).listen(site)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def pool(self, scheme: bytes, host: bytes, port: int) -> AppPool:
        pool = AppPool.to(reactor, scheme, host, port, connect_timeout=5, max_idle=4)

        def close():
            for connection in pool.idle + list(pool.active):
                connection.transport.abortConnection()
            pool.close()
        self.addCleanup(close)
        return pool

    async def get(self, pool: AppPool, path: bytes) -> list:
        owner = Waiting()
        pool.request(owner, b"GET", b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return await owner.done

    async def test_keep_alive_on_a_real_socket_and_an_idle_close(self):
        port = await self.listen()
        pool = self.pool(b"http", b"127.0.0.1", port)
        first = await self.get(pool, b"/a")
        self.assertEqual(first[1:], [("data", b"page of /a"), ("end",)])
        second = await self.get(pool, b"/b")
        self.assertEqual(second[1:], [("data", b"page of /b"), ("end",)])
        self.assertIs(self.page.channels[0], self.page.channels[1])
        # The app closes the idle connection: it leaves the pool, the next request dials anew.
        self.page.channels[1].transport.loseConnection()
        await eventually(lambda: not pool.idle)
        third = await self.get(pool, b"/c")
        self.assertEqual(third[1:], [("data", b"page of /c"), ("end",)])
        self.assertIsNot(self.page.channels[2], self.page.channels[0])

    async def test_tls_app_is_verified(self):
        directory = FilePath(self.mktemp())
        directory.makedirs()
        key, cert, ca = make_ca_and_cert(directory)
        port = await self.listen((key, cert))
        [(event, reason, answered)] = await self.get(self.pool(b"https", b"localhost", port), b"/x")
        self.assertEqual((event, answered), ("failed", False))
        self.assertIn("certificate verify failed", reason)
        before = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = ca  # OpenSSL reads the process environment, as Agent's policy did
        self.addCleanup(lambda: os.environ.pop("SSL_CERT_FILE") if before is None
                        else os.environ.__setitem__("SSL_CERT_FILE", before))
        events = await self.get(self.pool(b"https", b"localhost", port), b"/x")
        self.assertEqual(events[1:], [("data", b"page of /x"), ("end",)])
