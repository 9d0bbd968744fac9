"""
The mux links' TLS layer (pipegate/mux/tls.py: LinkTLSProtocol): whole writes into
OpenSSL, one transport write per flush, one dataReceived per read.  The guards on the
private parts of Twisted's TLS layer and pyOpenSSL it relies on (pipegate/_compat.py)
are in tests/test_compat.py.

Sans-IO: two protocols on StringTransports, bytes moved between them by hand (the
end-to-end behaviour through real sockets is covered by tests/test_ports_e2e.py).
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import protocol, ssl, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from pipegate import _compat
from pipegate.mux import tls
from pipegate.mux.decoder import FrameDecoder
from tests.support import NullNode, pattern


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason=None) -> None:
        self.lost = reason


class CountingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Pair:
    """A client and a server LinkTLSProtocol, handshaken over StringTransports."""

    def __init__(self) -> None:
        cert = tls.generated_certificate()
        self.clock = task.Clock()
        server_options = ssl.CertificateOptions(privateKey=cert.privateKey.original,
                                                certificate=cert.original)
        server_factory = tls.LinkTLSFactory(server_options, False,
                                            protocol.Factory.forProtocol(Recorder), self.clock)
        client_factory = tls.LinkTLSFactory(ssl.CertificateOptions(verify=False), True,
                                            protocol.ClientFactory.forProtocol(Recorder), self.clock)
        self.server = server_factory.buildProtocol(None)
        self.client = client_factory.buildProtocol(None)
        self.server_transport, self.client_transport = CountingTransport(), CountingTransport()
        self.server.makeConnection(self.server_transport)
        self.client.makeConnection(self.client_transport)
        self.pump()
        assert self.client._handshakeDone and self.server._handshakeDone

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for source, sink in ((self.client_transport, self.server), (self.server_transport, self.client)):
                data = source.value()
                if data:
                    source.clear()
                    sink.dataReceived(data)
                    moved = True


class Batching(unittest.TestCase):
    def test_one_write_is_one_ssl_write_and_one_transport_write(self):
        pair = Pair()
        sends = []
        original = _compat._SSL_write   # (what BatchedTLSProtocol._write calls once the handshake is done)
        self.patch(_compat, "_SSL_write",
                   lambda ssl, data, size: sends.append(size) or original(ssl, data, size))
        payload = pattern(256 * 1024)
        pair.client_transport.writes = 0
        pair.client.write(payload)
        self.assertEqual(sends, [len(payload)])
        self.assertEqual(pair.client_transport.writes, 1)
        # 16 records of 16 KiB, each with its header and tag.
        self.assertGreater(len(pair.client_transport.value()), len(payload) + 16 * 16)

    def test_everything_received_is_delivered_in_one_call(self):
        pair = Pair()
        payload = pattern(256 * 1024)
        pair.client.write(payload)
        pair.pump()
        app = pair.server.wrappedProtocol
        self.assertEqual(app.chunks, [payload])

    def test_small_writes_keep_order_and_content(self):
        pair = Pair()
        pieces = [pattern(n, seed=n) for n in (1, 100, 70000, 5, 16384, 16385, 3)]
        for piece in pieces:
            pair.client.write(piece)
        pair.clock.advance(0)   # the base class's aggregation of small writes
        pair.pump()
        self.assertEqual(b"".join(pair.server.wrappedProtocol.chunks), b"".join(pieces))

    def test_data_before_close_notify_is_delivered_then_the_link_closes(self):
        pair = Pair()
        payload = pattern(100 * 1024)
        pair.client.write(payload)
        pair.client.loseConnection()
        # Data records and the close_notify reach the server in one read.
        pair.pump()
        app = pair.server.wrappedProtocol
        self.assertEqual(b"".join(app.chunks), payload)
        self.assertTrue(pair.server._lostTLSConnection)
        self.assertTrue(pair.server_transport.disconnecting)

    def test_corrupt_record_fails_the_link_after_delivering_what_came_before(self):
        pair = Pair()
        good = pattern(20000)
        pair.client.write(good)
        pair.clock.advance(0)   # the base class's aggregation of small writes
        wire = pair.client_transport.value()
        pair.client_transport.clear()
        pair.client.write(pattern(20000, seed=9))
        pair.clock.advance(0)
        bad = bytearray(pair.client_transport.value())
        pair.client_transport.clear()
        bad[-1] ^= 0xFF   # the last record's authentication tag
        pair.server.dataReceived(wire + bytes(bad))
        app = pair.server.wrappedProtocol
        self.assertEqual(b"".join(app.chunks)[:len(good)], good)
        self.assertTrue(pair.server._lostTLSConnection)
        self.assertIsInstance(pair.server._reason.value, SSL.Error)


class RawBytes(unittest.TestCase):
    """raw_bytes_received: whether the peer sent anything at all (a TCP probe sends nothing)."""

    def test_nothing_then_something_and_reads_still_delivered(self):
        cert = tls.generated_certificate()
        server_factory = tls.LinkTLSFactory(ssl.CertificateOptions(
            privateKey=cert.privateKey.original, certificate=cert.original), False,
            protocol.Factory.forProtocol(Recorder), task.Clock())
        probed = server_factory.buildProtocol(None)
        probed.makeConnection(StringTransport())
        self.assertEqual(probed.raw_bytes_received, 0)
        probed.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(probed.raw_bytes_received, 0)

        pair = Pair()
        self.assertGreater(pair.server.raw_bytes_received, 0)
        self.assertIn("dataReceived", vars(pair.server))   # (the first read's count is enough)
        pair.client.write(b"after the handshake")
        pair.clock.advance(0)
        pair.pump()
        self.assertEqual(b"".join(pair.server.wrappedProtocol.chunks), b"after the handshake")

    def test_no_reference_cycle_left_when_lost(self):
        pair = Pair()
        pair.server.connectionLost(Failure(ConnectionDone()))
        self.assertNotIn("dataReceived", vars(pair.server))


class LinkWrites(unittest.TestCase):
    """
    A MuxLink on LinkTLSProtocol: small DATA frames of one reactor turn leave as one
    transport write at the end of the turn (one TLS record batch, one send); large DATA
    and control frames leave at once, after what is held, in order.
    """

    def setUp(self) -> None:
        from pipegate.mux import frames
        from pipegate.mux.session import LinkConfig, LinkFactory
        self.frames = frames
        cert = tls.generated_certificate()
        self.clock = task.Clock()
        config = LinkConfig(secret=b"s" * 32, role=frames.ROLE_GATEWAY)
        server_options = ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original)
        self.server = tls.LinkTLSFactory(server_options, False, protocol.Factory.forProtocol(Recorder),
                                         self.clock).buildProtocol(None)
        self.client = tls.LinkTLSFactory(ssl.CertificateOptions(verify=False), True,
                                         LinkFactory(NullNode(), config, self.clock, True), self.clock).buildProtocol(None)
        self.server_transport, self.client_transport = CountingTransport(), CountingTransport()
        self.server.makeConnection(self.server_transport)
        self.client.makeConnection(self.client_transport)
        for _ in range(10):
            for source, sink in ((self.client_transport, self.server), (self.server_transport, self.client)):
                data = source.value()
                source.clear()
                if data:
                    sink.dataReceived(data)
        self.clock.advance(0)
        self.link = self.client.wrappedProtocol
        self.link.admitted = True  # (admission is tests/test_mux_*'s subject, not this)
        self.addCleanup(self.link._stop_timers)
        self.server.wrappedProtocol.chunks.clear()
        self.client_transport.clear()
        self.client_transport.writes = 0

    def received(self) -> list:
        self.server.dataReceived(self.client_transport.value())
        self.client_transport.clear()
        return FrameDecoder().feed(b"".join(self.server.wrappedProtocol.chunks))

    def test_small_data_of_a_turn_is_one_write_at_its_end(self):
        for channel in range(1, 51):
            self.link.send_data(channel, [b"+OK\r\n"])
        self.assertEqual(self.client_transport.writes, 0)
        self.clock.advance(0)   # the end of the reactor turn
        self.assertEqual(self.client_transport.writes, 1)
        self.assertEqual(self.received(), [self.frames.Data(c, b"+OK\r\n") for c in range(1, 51)])

    def test_large_data_and_control_frames_go_at_once_in_order(self):
        from pipegate.mux.session import SEND_AT_ONCE
        big = pattern(SEND_AT_ONCE)
        self.link.send_data(1, [b"small"])
        self.link.send_data(2, [big])
        self.assertEqual(self.client_transport.writes, 1)   # the held frame and the big one
        self.link.send_data(3, [b"held"])
        self.link.send(self.frames.Window(4, 1000))
        self.link.send(self.frames.Fin(3))
        self.assertEqual(self.client_transport.writes, 3)
        self.clock.advance(0)
        self.assertEqual(self.client_transport.writes, 3)   # nothing was left
        self.assertEqual(self.received(), [
            self.frames.Data(1, b"small"), self.frames.Data(2, big), self.frames.Data(3, b"held"),
            self.frames.Window(4, 1000), self.frames.Fin(3)])

    def test_frames_sent_one_by_one_follow_the_same_rule(self):
        # (the hub forwards DATA with send(), not send_data())
        from pipegate.mux.session import SEND_AT_ONCE
        self.link.send(self.frames.Data(1, b"small"))
        self.link.send(self.frames.Datagram(2, b"dns"))
        self.assertEqual(self.client_transport.writes, 0)
        self.link.send(self.frames.Data(3, pattern(SEND_AT_ONCE)))
        self.assertEqual(self.client_transport.writes, 1)
        self.assertEqual(self.received(), [self.frames.Data(1, b"small"), self.frames.Datagram(2, b"dns"),
                                           self.frames.Data(3, pattern(SEND_AT_ONCE))])

    def test_frames_that_go_at_once_schedule_no_flush(self):
        # Only small DATA waits for the turn's end (one call per turn); a frame sent at once
        # leaves no callLater(0) of the TLS layer behind (pipegate._compat.write_now).
        from pipegate.mux.session import SEND_AT_ONCE
        pending = list(self.clock.getDelayedCalls())   # (the link's handshake timer)
        self.link.send(self.frames.OpenOk(3))
        self.link.send(self.frames.Window(3, 1000))
        self.link.send_data(3, [pattern(SEND_AT_ONCE)])
        self.link.send(self.frames.Fin(3))
        self.assertEqual(self.client_transport.writes, 4)
        self.assertEqual(self.clock.getDelayedCalls(), pending)
        self.link.send_data(4, [b"small"])
        self.assertEqual(len(self.clock.getDelayedCalls()), len(pending) + 1)
        self.assertEqual(self.received(), [
            self.frames.OpenOk(3), self.frames.Window(3, 1000), self.frames.Data(3, pattern(SEND_AT_ONCE)),
            self.frames.Fin(3)])


class DialerLogNames(unittest.TestCase):
    """ClientService logs 'Scheduling retry N to connect <endpoint> in S seconds': the
    operator must read the peer there, not '<..._LinkTLSClientEndpoint object at 0x7f...>'."""

    def test_repr_names_the_peer(self):
        from twisted.internet.testing import MemoryReactorClock

        endpoint = tls.client_endpoint(MemoryReactorClock(), "tcp:gw.example.com:7000")
        self.assertEqual(repr(endpoint), "<TLS link to tcp:gw.example.com:7000>")
