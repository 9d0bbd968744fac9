"""
Tests for L{pipegate.tcpclient}: connecting a protocol to a service, on real loopback sockets;
failures say what Twisted's own connector says.
"""

from __future__ import annotations

import socket

from twisted.internet import address, defer, error, reactor, task
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from pipegate import tcpclient
from pipegate.sockets import close_write
from pipegate.tcpclient import StreamClient, connect_stream
from tests.support import eventually
from tests.test_sockets import plain_listener


class _Client(Protocol):
    def __init__(self) -> None:
        self.made = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


class _ClockedReactor:
    """The global reactor, with its delayed calls on a C{task.Clock}: a timeout without waiting for one."""

    def __init__(self) -> None:
        self.clock = task.Clock()

    def callLater(self, *args, **kw):
        return self.clock.callLater(*args, **kw)

    def __getattr__(self, name):
        return getattr(reactor, name)


def _twisted_says(host: str, port: int) -> defer.Deferred:
    """The failure Twisted's own connector reports for C{host}:C{port}."""
    said = defer.Deferred()

    class Factory(ClientFactory):
        noisy = False
        protocol = Protocol

        def clientConnectionFailed(self, connector, reason):
            said.callback([reason])   # (a Failure would errback)
    reactor.connectTCP(host, port, Factory(), timeout=3.0)
    return said


def _closed_port(testcase) -> int:
    listener = plain_listener(testcase)
    port = listener.getsockname()[1]
    listener.close()
    return port


def _full_listener(testcase) -> socket.socket:
    """A listener whose accept queue is full: a connect to it stays pending (its SYN is dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    testcase.addCleanup(listener.close)
    filler = socket.create_connection(listener.getsockname())
    testcase.addCleanup(filler.close)
    return listener


async def _received(peer: socket.socket, size: int) -> bytes:
    """What C{peer} receives, up to C{size} bytes or the end of the stream, letting the reactor run meanwhile."""
    peer.setblocking(False)
    data = []

    def read() -> bool:
        try:
            chunk = peer.recv(size - len(b"".join(data)))
        except BlockingIOError:
            return False
        data.append(chunk)
        return not chunk or len(b"".join(data)) == size
    await eventually(read)
    return b"".join(data)


class _RecordingSocket(socket.socket):
    """A socket that records the C{shutdown} calls made on it."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.shutdowns: list[int] = []

    def shutdown(self, how: int) -> None:
        self.shutdowns.append(how)
        super().shutdown(how)


class ConnectStreamTests(unittest.TestCase):

    def connect(self, host: str, port: int, timeout: float = 3.0, on=reactor):
        client, failed = _Client(), []
        if on is reactor:
            connect_stream(on, host, port, timeout, client, failed.append)
        else:   # (what connect_stream does on a real reactor)
            StreamClient(socket.socket(), client, on, (host, port)).connect(timeout, failed.append)
        return client, failed

    def step_by_reactor(self) -> None:
        """Connects that the kernel has finished take the path of one it has not (reactor events)."""
        self.patch(StreamClient, "ask_at_once", False)

    async def check_connected(self, client, listener) -> None:
        self.assertIs(await client.made, client)
        transport = client.transport
        self.assertIsInstance(transport, StreamClient)
        self.assertIs(transport.protocol, client)   # no protocol wrapper in between
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        self.assertEqual(transport.getHost(), address.IPv4Address("TCP", *peer.getpeername()))
        self.assertEqual(transport.getPeer(), address.IPv4Address("TCP", *listener.getsockname()))
        self.assertIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())
        transport.write(b"ping")   # (sent on the reactor's next turn)
        self.assertEqual(await _received(peer, 4), b"ping")
        peer.sendall(b"pong")
        received = []
        client.dataReceived = received.append
        await eventually(lambda: received)
        self.assertEqual(b"".join(received), b"pong")
        transport.loseConnection()
        await client.lost
        client.reason.trap(error.ConnectionDone)
        self.assertEqual(await _received(peer, 1), b"")

    async def test_an_address_literal_connects_the_protocol_itself(self):
        listener = plain_listener(self)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        client, failed = self.connect("127.0.0.1", listener.getsockname()[1])
        await self.check_connected(client, listener)
        await task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(failed, [])
        self.assertEqual([e.get("log_format") for e in events], [])

    async def test_a_loopback_connection_is_made_in_the_same_turn(self):
        # The kernel finishes a loopback handshake inside connect(2): no reactor turn, no
        # registration for writing.  (Three tries: a kernel may defer its network work.)
        listener = plain_listener(self)
        at_once = []
        for _ in range(3):
            client, failed = self.connect("127.0.0.1", listener.getsockname()[1])
            at_once.append(client.made.called)
            await client.made
            listener.accept()[0].close()
            client.transport.abortConnection()
            await client.lost
        self.assertIn(True, at_once)

    async def test_a_connect_finished_by_the_reactor_connects(self):
        self.step_by_reactor()
        listener = plain_listener(self)
        writers = set(reactor.getWriters())
        client, failed = self.connect("127.0.0.1", listener.getsockname()[1])
        self.assertFalse(client.made.called)
        [connecting] = set(reactor.getWriters()) - writers   # registered for writing only
        self.assertNotIn(connecting, reactor.getReaders())
        await self.check_connected(client, listener)
        self.assertEqual(failed, [])

    async def test_refused_says_what_twisted_says(self):
        port = _closed_port(self)
        [twisted_reason] = await _twisted_says("127.0.0.1", port)
        client, failed = self.connect("127.0.0.1", port)
        await eventually(lambda: failed)
        self.assertFalse(client.made.called)
        self.assertEqual(len(failed), 1)
        self.assertTrue(failed[0].check(error.ConnectionRefusedError))
        self.assertEqual(failed[0].getErrorMessage(), twisted_reason.getErrorMessage())

    async def test_refused_seen_by_the_reactor_says_what_twisted_says(self):
        self.step_by_reactor()
        port = _closed_port(self)
        [twisted_reason] = await _twisted_says("127.0.0.1", port)
        writers = set(reactor.getWriters())
        client, failed = self.connect("127.0.0.1", port)
        self.assertEqual(failed, [])   # (pending, for the reactor to find out)
        await eventually(lambda: failed)
        self.assertFalse(client.made.called)
        self.assertEqual(failed[0].getErrorMessage(), twisted_reason.getErrorMessage())
        self.assertEqual(set(reactor.getWriters()), writers)   # unregistered

    async def test_timeout_says_what_twisted_says(self):
        listener = _full_listener(self)
        clocked = _ClockedReactor()
        writers = set(reactor.getWriters())
        client, failed = self.connect("127.0.0.1", listener.getsockname()[1], timeout=5.0, on=clocked)
        [connecting] = set(reactor.getWriters()) - writers
        sock = connecting.socket
        clocked.clock.advance(4.9)
        self.assertEqual(failed, [])
        clocked.clock.advance(0.1)
        self.assertEqual(len(failed), 1)
        self.assertTrue(failed[0].check(error.TimeoutError))
        self.assertEqual(failed[0].getErrorMessage(), error.TimeoutError().__str__())
        self.assertEqual(set(reactor.getWriters()), writers)
        self.assertEqual(sock.fileno(), -1)   # closed
        self.assertFalse(client.made.called)
        self.assertEqual(clocked.clock.getDelayedCalls(), [])

    async def test_connected_cancels_the_timeout(self):
        self.step_by_reactor()
        listener = plain_listener(self)
        clocked = _ClockedReactor()
        client, failed = self.connect("127.0.0.1", listener.getsockname()[1], on=clocked)
        self.assertEqual(len(clocked.clock.getDelayedCalls()), 1)
        await client.made
        self.assertEqual(clocked.clock.getDelayedCalls(), [])
        client.transport.abortConnection()
        clocked.clock.advance(0)   # (the abort's connectionLost is a delayed call)
        await client.lost

    async def test_an_error_in_connection_made_closes_as_the_reactor_would(self):
        listener = plain_listener(self)
        client, failed = _Client(), []

        def broken():
            raise RuntimeError("broken")
        client.connectionMade = broken
        connect_stream(reactor, "127.0.0.1", listener.getsockname()[1], 3.0, client, failed.append)
        await client.lost
        self.assertTrue(client.reason.check(RuntimeError))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        self.assertEqual(await _received(peer, 1), b"")
        self.assertEqual(failed, [])

    async def test_an_ipv6_literal(self):
        if not socket.has_ipv6:
            raise unittest.SkipTest("no IPv6")
        listener = socket.socket(socket.AF_INET6)
        try:
            listener.bind(("::1", 0))
        except OSError:
            raise unittest.SkipTest("no ::1")
        listener.listen(2)
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        client, failed = self.connect("::1", port)
        await client.made
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        self.assertEqual(client.transport.getPeer(), address.IPv6Address("TCP", "::1", port))
        self.assertEqual(client.transport.getHost().port, peer.getpeername()[1])
        client.transport.abortConnection()
        await client.lost

    async def test_closes_without_a_shutdown_first(self):
        # After a half-close from both ends (a tunnelled connection's usual end), the shutdown(2)
        # Twisted makes before the close fails (ENOTCONN); the close alone sends the FIN.
        listener = plain_listener(self)
        sock, client, failed = _RecordingSocket(), _Client(), []
        StreamClient(sock, client, reactor, listener.getsockname()).connect(3.0, failed.append)
        await client.made
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        client.transport.write(b"x")
        client.transport.loseConnection()
        await client.lost
        client.reason.trap(error.ConnectionDone)
        self.assertEqual(sock.shutdowns, [])
        self.assertEqual(await _received(peer, 2), b"x")   # and the end of the stream

    async def test_a_close_after_the_write_side_makes_no_failure(self):
        # Twisted's loseConnection makes a new ConnectionDone failure for every close of a socket
        # shut for writing (and connectionLost works out its type's parents): one made once serves.
        listener = plain_listener(self)
        client, failed = self.connect("127.0.0.1", listener.getsockname()[1])
        await client.made
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        close_write(client.transport)
        made = []
        init = Failure.__init__
        self.patch(Failure, "__init__", lambda failure, *a, **kw: made.append(a) or init(failure, *a, **kw))
        client.transport.loseConnection()
        self.assertTrue(client.lost.called)   # (at once)
        self.assertEqual(made, [])
        client.reason.trap(error.ConnectionDone)
        self.assertEqual(await _received(peer, 1), b"")

    async def test_a_host_name_goes_through_an_endpoint(self):
        listener = plain_listener(self)
        client, failed = self.connect("localhost", listener.getsockname()[1])
        self.assertIs(await client.made, client)
        self.assertNotIsInstance(client.transport, StreamClient)
        self.assertIsNot(client.transport.protocol, client)   # the endpoint's wrapper
        client.transport.abortConnection()

    def test_literals_are_resolved_as_twisted_does(self):
        self.assertEqual(tcpclient._literal("127.0.0.1", 80), (socket.AF_INET, ("127.0.0.1", 80)))
        self.assertEqual(tcpclient._literal("::1", 80), (socket.AF_INET6, ("::1", 80, 0, 0)))
        self.assertIsNone(tcpclient._literal("localhost", 80))
        self.assertIsNone(tcpclient._literal("1.2.3", 80))

    def test_other_reactors_connect_with_their_connect_tcp(self):
        memory = MemoryReactorClock()
        client, failed = _Client(), []
        connect_stream(memory, "127.0.0.1", 22, 4.0, client, failed.append)
        [(host, port, factory, timeout, _)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 22, 4.0))
        self.assertIs(factory.buildProtocol(None), client)
