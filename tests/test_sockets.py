"""
Tests for L{pipegate.sockets}: what a link's writes do to its socket, observed from a
plain socket at the other end of a real loopback connection.  (The guards on the private
Twisted state these read, L{pipegate._compat}, are in tests/test_compat.py.)
"""

from __future__ import annotations

import socket
import struct

from twisted.internet import defer, endpoints, error, reactor, task
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pipegate.sockets import (
    bounded_reads, close_now, close_write, connect_protocol, eager_writes, no_delay, plain_writes, read_waiting,
    send_now, socket_transport, stream_endpoint, stream_socket)
from pipegate.sockets import SMALL_READ, SMALL_STREAK
from tests.support import Loopback, TestApp, eventually, request


class _Producer:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def plain_listener(testcase) -> socket.socket:
    """A listening socket on 127.0.0.1 that the reactor does not watch: the test reads it itself."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2)
    testcase.addCleanup(listener.close)
    return listener


async def connect_to(listener: socket.socket, protocol):
    """Connect C{protocol} to C{listener} through the reactor; returns the protocol and the accepted socket."""
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getsockname()[1])
    protocol = await endpoints.connectProtocol(endpoint, protocol)
    peer, _ = listener.accept()
    return protocol, peer


class SendNowTests(unittest.TestCase):

    async def setUp(self):
        self.client, self.peer = await connect_to(plain_listener(self), Protocol())
        self.peer.setblocking(False)
        self.addCleanup(self.peer.close)
        self.addCleanup(self.client.transport.abortConnection)

    def waiting(self) -> bytes:
        """What has reached the peer's socket so far (without letting the reactor run)."""
        try:
            return self.peer.recv(65536)
        except BlockingIOError:
            return b""

    def test_a_write_waits_for_the_reactor(self):
        # What send_now changes: a plain write is still in Twisted's buffer.
        self.client.transport.write(b"queued")
        self.assertEqual(self.waiting(), b"")

    def test_send_now_hands_the_bytes_to_the_kernel(self):
        self.client.transport.write(b"first ")
        self.client.transport.write(b"second")
        send_now(self.client.transport)
        self.assertEqual(self.waiting(), b"first second")
        # Nothing is left for the reactor to send twice.
        self.client.transport.write(b" third")
        send_now(self.client.transport)
        self.assertEqual(self.waiting(), b" third")

    def test_with_a_streaming_producer_that_runs(self):
        # doWrite would not touch a running streaming producer: send.
        self.client.transport.registerProducer(_Producer(), True)
        self.client.transport.write(b"sent")
        send_now(self.client.transport)
        self.assertEqual(self.waiting(), b"sent")

    def test_not_while_a_producer_could_be_resumed(self):
        # A paused streaming producer, or a pull producer: doWrite could resume it
        # from inside send_now, so the bytes wait for the reactor.
        transport = self.client.transport
        transport.registerProducer(_Producer(), True)
        transport.producerPaused = True  # what a full write buffer does to it
        transport.write(b"queued")
        send_now(transport)
        self.assertEqual(self.waiting(), b"")
        transport.unregisterProducer()
        transport.registerProducer(_Producer(), False)
        send_now(transport)
        self.assertEqual(self.waiting(), b"")

    def test_not_once_closing(self):
        self.client.transport.write(b"queued")
        self.client.transport.loseConnection()
        send_now(self.client.transport)
        self.assertEqual(self.waiting(), b"")

    def test_no_delay_and_socket_transport_through_a_wrapper(self):
        class Wrapper:
            transport = self.client.transport
        self.assertIs(socket_transport(Wrapper()), self.client.transport)
        sock = self.client.transport.getHandle()
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        no_delay(Wrapper())
        self.assertNotEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)


class EagerWriteTests(unittest.TestCase):

    async def setUp(self):
        self.client, self.peer = await connect_to(plain_listener(self), Protocol())
        self.addCleanup(self.peer.close)
        self.addCleanup(self.client.transport.abortConnection)
        eager_writes(self.client.transport)

    def drain_peer(self, until: int) -> bytes:
        """Read the peer's socket (blocking, 5 s at most) until C{until} bytes came."""
        self.peer.settimeout(5)
        got = []
        while sum(map(len, got)) < until:
            got.append(self.peer.recv(1 << 20))
        return b"".join(got)

    def test_a_write_goes_out_at_once_and_leaves_the_reactor_alone(self):
        transport = self.client.transport
        transport.write(b"at once")
        self.assertEqual(self.drain_peer(7), b"at once")
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(transport._tempDataLen, 0)

    async def test_what_the_socket_does_not_take_is_queued_in_order(self):
        transport = self.client.transport
        big = bytes(range(256)) * 40_000          # 10 MiB: more than the socket buffers take
        transport.write(big)
        self.assertGreater(transport._tempDataLen, 0)
        self.assertIn(transport, reactor.getWriters())
        transport.write(b"behind")                 # must not overtake the queued bytes
        self.peer.setblocking(False)
        got = []
        for _ in range(500):
            await task.deferLater(reactor, 0.01, lambda: None)
            try:
                while True:
                    chunk = self.peer.recv(1 << 20)
                    if not chunk:
                        break
                    got.append(chunk)
            except BlockingIOError:
                pass
            if sum(map(len, got)) >= len(big) + 6:
                break
        self.assertEqual(b"".join(got), big + b"behind")

    def test_not_once_closing(self):
        transport = self.client.transport
        transport.loseConnection()
        transport.write(b"queued")
        self.assertEqual(transport._tempDataLen, 6)

    async def test_memoryviews_go_out_and_what_is_left_is_queued_as_bytes(self):
        # The mux links' TLS layer writes views of its own buffers (and reuses none).
        transport = self.client.transport
        self.assertTrue(transport.write.__func__.takes_views)
        transport.write(memoryview(b"a view"))
        self.assertEqual(self.drain_peer(6), b"a view")
        big = bytearray(bytes(range(256)) * 40_000)   # 10 MiB: more than the socket buffers take
        transport.write(memoryview(big))
        self.assertGreater(transport._tempDataLen, 0)
        transport.write(memoryview(b"behind"))        # queued behind, as bytes
        self.assertTrue(all(type(part) is bytes for part in transport._tempDataBuffer))
        expected = bytes(big) + b"behind"
        big[:] = bytes(len(big))                     # what was queued was copied
        self.assertEqual(await self.collect(len(expected)), expected)

    async def collect(self, size: int) -> bytes:
        got = []
        self.peer.setblocking(False)
        for _ in range(500):
            await task.deferLater(reactor, 0.01, lambda: None)
            try:
                while True:
                    got.append(self.peer.recv(1 << 20))
            except BlockingIOError:
                pass
            if sum(map(len, got)) >= size:
                break
        return b"".join(got)

    def test_a_sequence_goes_out_in_sendmsgs_of_at_most_iov_max_pieces(self):
        # One sendmsg per IOV_MAX (1024) pieces: more would fail with EMSGSIZE.
        transport = self.client.transport
        self.assertTrue(transport.writeSequence.__func__.takes_views)
        calls = []
        real = transport.socket

        class Counting:
            def sendmsg(self, pieces):
                calls.append(len(pieces))
                return real.sendmsg(pieces)

            def __getattr__(self, name):
                return getattr(real, name)
        transport.socket = Counting()
        self.addCleanup(setattr, transport, "socket", real)
        pieces = [memoryview(bytes([i % 251]) * 3) for i in range(2500)]
        transport.writeSequence(pieces)
        self.assertEqual(calls, [1024, 1024, 452])
        self.assertEqual(self.drain_peer(7500), b"".join(pieces))
        self.assertEqual(transport._tempDataLen, 0)
        calls.clear()
        transport.writeSequence([b"one", memoryview(b"two")])
        self.assertEqual(calls, [2])
        self.assertEqual(self.drain_peer(6), b"onetwo")

    async def test_what_a_sequence_leaves_is_queued_as_bytes_in_order(self):
        transport = self.client.transport
        big = bytearray(bytes(range(256)) * 8_000)   # 2 MiB a piece, 10 MiB in all
        pieces = [memoryview(big)[i:i + 2_048_000] for i in range(0, len(big), 2_048_000)] * 5
        transport.writeSequence(pieces)
        self.assertGreater(transport._tempDataLen, 0)
        transport.writeSequence([memoryview(b"be"), b"hind"])   # queued behind, joined
        self.assertTrue(all(type(part) is bytes for part in transport._tempDataBuffer))
        expected = bytes(big) * 5 + b"behind"
        big[:] = bytes(len(big))                     # what was queued was copied
        self.assertEqual(await self.collect(len(expected)), expected)


class _Collect(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason) -> None:
        self.lost.callback(reason.value)


class BoundedReadTests(unittest.TestCase):

    async def test_reads_stay_small_under_a_large_write_buffer(self):
        collect, peer = await connect_to(plain_listener(self), _Collect())
        transport = collect.transport
        transport.bufferSize = 4 * 1024 * 1024   # what a mux link sets (write side)
        bounded_reads(transport, 65536)
        self.assertEqual(transport.bufferSize, 4 * 1024 * 1024)
        payload = bytes(range(256)) * 8192        # 2 MiB, sent before the reactor reads
        peer.sendall(payload)
        peer.close()
        reason = await collect.lost
        self.assertEqual(b"".join(collect.chunks), payload)
        self.assertLessEqual(max(map(len, collect.chunks)), 65536)
        self.assertGreater(len(collect.chunks), 1)
        self.assertIsInstance(reason, error.ConnectionDone)


class DirectReadTests(unittest.TestCase):
    """stream_socket's reads (one call, not Twisted's doRead and _dataReceived) against Twisted's own."""

    async def pair(self):
        """Two connections: one read through stream_socket's doRead, one through Twisted's."""
        ends = []
        for direct in (True, False):
            collect, peer = await connect_to(plain_listener(self), _Collect())
            self.addCleanup(peer.close)
            self.addCleanup(collect.transport.abortConnection)
            reactor.removeReader(collect.transport)   # (the test reads them itself)
            if direct:
                self.assertIs(stream_socket(collect.transport, 1000), collect.transport)
                self.assertIn("doRead", vars(collect.transport))
            else:
                collect.transport.bufferSize = 1000
            ends.append((collect, peer))
        return ends

    async def test_the_same_results(self):
        for case in ("data", "nothing", "end", "reset"):
            results = []
            for collect, peer in await self.pair():
                if case == "data":
                    peer.sendall(b"x" * 1500)
                elif case == "end":
                    peer.shutdown(socket.SHUT_WR)
                elif case == "reset":
                    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    peer.close()
                got = [collect.transport.doRead() for _ in range(3)]
                results.append(([type(r) for r in got], b"".join(collect.chunks)))
            self.assertEqual(results[0], results[1], case)
            done = error.ConnectionDone
            nothing = [type(None)] * 3
            self.assertEqual(results[0][0], {"data": nothing, "nothing": nothing, "end": [done] * 3,
                                             "reset": [error.ConnectionLost, done, done]}[case])
            self.assertEqual(results[0][1], b"x" * 1500 if case == "data" else b"")

    async def test_small_reads_while_the_messages_are_small(self):
        # Reads of SMALL_READ (pymalloc-sized bytes) until one fills it; then bufferSize, as Twisted's,
        # until SMALL_STREAK of those in a row bring SMALL_READ or less.  What comes, and in what order, is
        # what Twisted's reads give.
        (direct, direct_peer), (general, general_peer) = await self.pair()
        self.assertEqual(direct.transport.pg_read_size, SMALL_READ)
        sizes = []
        messages = [b"a" * 40, b"b" * 40, b"c" * 2000, b"d" * 2000, b"e" * 600]
        messages += [b"s" * 30] * SMALL_STREAK + [b"t" * 600, b"u" * 5]
        for message in messages:
            for collect, peer in ((direct, direct_peer), (general, general_peer)):
                peer.sendall(message)
                before = len(collect.chunks)
                while len(b"".join(collect.chunks[before:])) < len(message):
                    if collect is direct:
                        sizes.append(collect.transport.pg_read_size)
                    self.assertIsNone(collect.transport.doRead())
                self.assertEqual(b"".join(collect.chunks[before:]), message)
        self.assertEqual(b"".join(direct.chunks), b"".join(general.chunks))
        self.assertEqual(sizes, [SMALL_READ] * 3 + [1000] * (5 + SMALL_STREAK) + [SMALL_READ, 1000, 1000])
        chunks = [40, 40, SMALL_READ, 1000, 521, 1000, 1000, 600] + [30] * SMALL_STREAK + [SMALL_READ, 121, 5]
        self.assertEqual([len(chunk) for chunk in direct.chunks], chunks)
        self.assertEqual(direct.transport.pg_read_size, 1000)

    async def test_small_reads_never_exceed_the_buffer(self):
        collect, peer = await connect_to(plain_listener(self), _Collect())
        self.addCleanup(peer.close)
        self.addCleanup(collect.transport.abortConnection)
        reactor.removeReader(collect.transport)
        stream_socket(collect.transport, 100)
        peer.sendall(b"x" * 250)
        for _ in range(3):
            collect.transport.doRead()
        self.assertEqual([len(chunk) for chunk in collect.chunks], [100, 100, 50])

    async def test_plain_writes_undoes_it(self):
        (collect, peer), _ = await self.pair()
        plain_writes(collect.transport)
        self.assertNotIn("doRead", vars(collect.transport))
        self.assertNotIn("write", vars(collect.transport))


class ReadWaitingTests(unittest.TestCase):
    """read_waiting: what a socket holds is read at once, without waiting for the reactor."""

    async def setUp(self):
        self.collect, self.peer = await connect_to(plain_listener(self), _Collect())
        self.transport = self.collect.transport
        self.addCleanup(self.peer.close)
        self.addCleanup(self.transport.abortConnection)

    def test_waiting_bytes_are_read_now(self):
        self.peer.sendall(b"hello")
        read_waiting(self.transport, self.collect.dataReceived)
        self.assertEqual(self.collect.chunks, [b"hello"])
        self.assertTrue(self.transport.connected)
        self.assertIn(self.transport, reactor.getReaders())

    async def test_nothing_waiting_does_nothing_and_later_bytes_come_as_usual(self):
        read_waiting(self.transport, self.collect.dataReceived)
        self.assertEqual(self.collect.chunks, [])
        self.peer.sendall(b"later")
        await eventually(lambda: self.collect.chunks == [b"later"])

    async def test_the_end_of_the_stream_is_left_to_the_reactor(self):
        self.peer.sendall(b"last")
        self.peer.close()
        read_waiting(self.transport, self.collect.dataReceived)
        self.assertEqual(self.collect.chunks, [b"last"])
        read_waiting(self.transport, self.collect.dataReceived)   # (only the end is left)
        self.assertEqual(self.collect.chunks, [b"last"])
        self.assertTrue(self.transport.connected)
        self.assertIsInstance(await self.collect.lost, error.ConnectionDone)

    async def test_a_reset_closes_as_the_reactor_would(self):
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.peer.close()
        read_waiting(self.transport, self.collect.dataReceived)
        self.assertTrue(self.collect.lost.called)
        self.assertIsInstance(await self.collect.lost, error.ConnectionLost)
        self.assertNotIn(self.transport, reactor.getReaders())
        self.assertNotIn(self.transport, reactor.getWriters())

    def test_other_transports_are_left_alone(self):
        transport = StringTransport()
        read_waiting(transport, self.fail)
        self.transport.loseConnection()
        self.peer.sendall(b"x")
        read_waiting(self.transport, self.fail)   # (closing)


class ConnectTests(unittest.TestCase):

    def test_address_literals_skip_the_resolver(self):
        for host, kind in [("127.0.0.1", endpoints.TCP4ClientEndpoint), ("::1", endpoints.TCP6ClientEndpoint),
                           ("localhost", endpoints.HostnameEndpoint), ("db.internal", endpoints.HostnameEndpoint)]:
            self.assertIsInstance(stream_endpoint(reactor, host, 5432, 3.0), kind, host)

    async def test_connect_protocol_is_quiet(self):
        listener = plain_listener(self)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        endpoint = stream_endpoint(reactor, "127.0.0.1", listener.getsockname()[1], 3.0)

        async def connect_and_close(connect) -> None:
            client = Protocol()
            await connect(endpoint, client)
            lost = defer.Deferred()
            client.connectionLost = lambda reason: lost.callback(None)
            client.transport.loseConnection()
            await lost
            await task.deferLater(reactor, 0, lambda: None)  # the factory stops after the protocol

        # Twisted's connectProtocol logs "Starting factory" and "Stopping factory" ...
        await connect_and_close(endpoints.connectProtocol)
        self.assertEqual([e.get("log_format") for e in events],
                         ["Starting factory {factory!r}", "Stopping factory {factory!r}"])
        del events[:]
        # ... ours nothing.
        await connect_and_close(connect_protocol)
        self.assertEqual([e.get("log_format") for e in events], [])


class CloseWriteTests(unittest.TestCase):
    """close_write: the FIN goes at once when nothing is queued, after the queued bytes otherwise."""

    async def setUp(self):
        self.client, self.peer = await connect_to(plain_listener(self), Protocol())
        self.addCleanup(self.peer.close)
        self.addCleanup(self.client.transport.abortConnection)
        self.peer.settimeout(5)

    def read_to_eof(self) -> bytes:
        got = []
        while chunk := self.peer.recv(65536):
            got.append(chunk)
        return b"".join(got)

    def test_nothing_queued_shuts_down_at_once(self):
        transport = self.client.transport
        close_write(transport)
        self.assertEqual(self.read_to_eof(), b"")   # without the reactor running
        self.assertNotIn(transport, reactor.getWriters())
        self.peer.sendall(b"still read")            # the other direction stays open

    async def test_queued_bytes_go_first(self):
        transport = self.client.transport
        transport.write(b"queued")                  # Twisted's write waits for the reactor
        close_write(transport)
        self.assertIn(transport, reactor.getWriters())
        await eventually(lambda: transport not in reactor.getWriters())   # the reactor's turn
        self.assertEqual(self.read_to_eof(), b"queued")

    def test_twisted_is_told_the_write_side_is_shut(self):
        transport = self.client.transport
        close_write(transport)
        transport.write(b"dropped")                 # as after Twisted's own half-close
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(self.read_to_eof(), b"")

    def test_close_now_with_nothing_queued_closes_at_once(self):
        transport, lost = self.client.transport, []
        self.client.connectionLost = lost.append
        close_now(transport)
        self.assertEqual(len(lost), 1)               # without the reactor running
        lost[0].trap(error.ConnectionDone)
        self.assertEqual(self.read_to_eof(), b"")
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())

    async def test_close_now_with_bytes_queued_sends_them_first(self):
        transport, lost = self.client.transport, defer.Deferred()
        self.client.connectionLost = lambda reason: lost.callback(reason.value)
        transport.write(b"queued")                  # Twisted's write waits for the reactor
        close_now(transport)
        self.assertFalse(lost.called)
        self.assertIsInstance(await lost, error.ConnectionDone)
        self.assertEqual(self.read_to_eof(), b"queued")

    async def test_close_now_after_close_write(self):
        transport, lost = self.client.transport, []
        self.client.connectionLost = lost.append
        close_write(transport)
        close_now(transport)
        self.assertEqual(len(lost), 1)
        self.assertEqual(self.read_to_eof(), b"")

    def test_close_now_of_other_transports_loses_the_connection(self):
        transport = StringTransport()
        close_now(transport)
        self.assertTrue(transport.disconnecting)

    def test_other_transports_lose_the_write_connection(self):
        class HalfCloseable(StringTransport):
            write_lost = False

            def loseWriteConnection(self):
                self.write_lost = True
        transport = HalfCloseable()
        close_write(transport)
        self.assertTrue(transport.write_lost)
        close_write(StringTransport())              # none to lose: nothing happens


class LinkSocketTests(unittest.TestCase):
    """Both ends of a real relay-connector WebSocket turn Nagle off."""

    async def test_link_sockets_have_nagle_off(self):
        loop = Loopback(self)
        app_port = await loop.app(TestApp())
        relay, relay_port = await loop.relay()
        connector = await loop.connector(relay_port, app_port, "t1")
        response, _ = await request(loop.agent(), b"GET",
                                    f"http://127.0.0.1:{relay_port.getHost().port}/t1/who")
        self.assertEqual(response.code, 200)
        ends = [connector.links[0].transport] + [link.transport for link in relay.tunnels["t1"].links]
        self.assertEqual(len(ends), 2)
        for transport in ends:
            sock = socket_transport(transport).getHandle()
            self.assertNotEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
