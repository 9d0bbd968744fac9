"""UDP flow bookkeeping (pipegate.ports.udp): the lazy idle timer and the socket buffers."""

from __future__ import annotations

import errno
import socket

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from pipegate.mux import frames
from pipegate.ports.gateway import Gateway, GatewayConfig
from pipegate.ports.udp import Flow, datagram_sender, set_buffers
from pipegate.sockets import DRAIN_PROBE, _QuietUDPPort


class FakeLink:
    paused = False

    def __init__(self) -> None:
        self.sent = []
        self.removed = []

    def send(self, frame) -> None:
        self.sent.append(frame)

    def send_datagram(self, channel_id: int, data: bytes) -> None:
        self.sent.append(frames.Datagram(channel_id, data))

    def release_channel(self, channel_id: int, holder=None) -> bool:
        self.removed.append(channel_id)


class IdleTimerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.delivered = []
        self.done = []
        self.flow = Flow(self.clock, 10.0, self.delivered.append, self.done.append)
        self.link = FakeLink()
        self.flow.attach(self.link, 7)

    def test_idle_flow_expires(self) -> None:
        self.clock.advance(10)
        self.assertEqual(self.done, [self.flow])
        self.assertEqual(self.link.sent, [frames.Reset(7, "idle timeout")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_traffic_postpones_expiry_either_way(self) -> None:
        self.clock.advance(6)
        self.flow.outbound(b"out")
        self.clock.advance(6)           # 12 s: 6 s after the last datagram
        self.assertEqual(self.done, [])
        self.flow.frame_received(frames.Datagram(7, b"in"))
        self.clock.advance(9.5)         # 21.5 s: 9.5 s after the last datagram
        self.assertEqual(self.done, [])
        self.clock.advance(0.5)
        self.assertEqual(self.done, [self.flow])
        self.assertEqual(self.delivered, [b"in"])
        self.assertEqual(self.link.sent, [frames.Datagram(7, b"out"), frames.Reset(7, "idle timeout")])

    def test_one_timer_however_many_datagrams(self) -> None:
        for _ in range(100):
            self.flow.outbound(b"x")
            self.clock.advance(0.01)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_close_cancels_the_timer(self) -> None:
        self.flow.outbound(b"x")
        self.flow.close(notify=False)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.link.removed, [7])


class OpenLink(FakeLink):
    """The parts of a mux link the gateway's Opening touches."""

    closed = going_away = False
    admitted = True
    peer_name = "provider"

    def __init__(self) -> None:
        super().__init__()
        self.channels = {}

    def allocate_channel(self, channel) -> int:
        self.channels[5] = channel
        return 5

    def release_channel(self, channel_id: int, holder=None) -> bool:
        super().release_channel(channel_id, holder)
        self.channels.pop(channel_id, None)


def open_through(gateway: Gateway, key, client, link) -> None:
    """Have C{gateway} open a channel for C{client} on C{key} with C{link} its only provider."""
    for old in gateway.providers.links(key):
        gateway.providers.remove(old)
    gateway.providers.announce(link, [key])
    gateway.try_open(key, client)


class OpeningTests(unittest.TestCase):
    def test_a_flow_closed_while_its_open_is_in_flight_gives_the_channel_back(self) -> None:
        """Issue 17 review: Flow.close left the OPEN in flight, and its channel, behind."""
        clock = Clock()
        gw = Gateway(GatewayConfig(), clock)
        link = OpenLink()
        flow = Flow(clock, 10.0, lambda d: None, lambda f: None)
        flow.client_address = ("127.0.0.2", 4000)
        open_through(gw, (5353, "udp"), flow, link)
        self.assertIs(flow.opening, link.channels[5])
        flow.close(notify=False)
        self.assertEqual(link.channels, {})
        self.assertEqual(link.sent[-1], frames.Reset(5, "client went away"))
        self.assertEqual(clock.getDelayedCalls(), [])   # neither the idle nor the open timer

    def test_an_answered_open_is_not_abandoned_again(self) -> None:
        clock = Clock()
        gw = Gateway(GatewayConfig(), clock)
        link = OpenLink()
        flow = Flow(clock, 10.0, lambda d: None, lambda f: None)
        flow.client_address = ("127.0.0.2", 4000)
        flow.open_failed = lambda: flow.close(notify=False)   # as UDPGate sets it
        open_through(gw, (5353, "udp"), flow, link)
        link.channels[5].frame_received(frames.OpenFail(5, "full"))   # no provider left
        self.assertTrue(flow.done)
        self.assertIsNone(flow.opening)
        self.assertEqual(link.removed, [5])


class SocketBufferTests(unittest.TestCase):
    def test_buffers_raised_up_to_the_system_cap(self) -> None:
        port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        size = 1_048_576
        set_buffers(port, size)
        handle = port.getHandle()
        for option, cap in ((socket.SO_RCVBUF, "rmem_max"), (socket.SO_SNDBUF, "wmem_max")):
            with open(f"/proc/sys/net/core/{cap}") as f:
                limit = int(f.read())
            # Linux keeps twice the (capped) value asked for, for its bookkeeping.
            self.assertEqual(handle.getsockopt(socket.SOL_SOCKET, option), 2 * min(size, limit))


class FakeUDPSocket:
    """A socket's C{recvfrom}/C{send}/C{sendto}: pending datagrams, then EAGAIN; counts the calls."""

    def __init__(self, send_error: int | None = None) -> None:
        self.pending: list[bytes] = []
        self.calls = 0
        self.sent: list = []
        self.send_error = send_error

    def recvfrom(self, size: int):
        self.calls += 1
        if not self.pending:
            raise BlockingIOError(errno.EAGAIN, "empty")
        return self.pending.pop(0), ("127.0.0.1", 53)

    def send(self, data: bytes) -> int:
        if self.send_error is not None:
            raise OSError(self.send_error, "refused")
        self.sent.append(data)
        return len(data)

    def sendto(self, data: bytes, addr) -> int:
        if self.send_error is not None:
            raise OSError(self.send_error, "refused")
        self.sent.append((data, addr))
        return len(data)

    def getHandle(self):
        return self


class Recorder(DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagramReceived(self, data, addr) -> None:
        self.received.append(data)


class FlowSocketReadTests(unittest.TestCase):
    """A per-flow socket (listen_udp_quietly) reads one datagram per wakeup, draining now and then."""

    def setUp(self) -> None:
        self.protocol = Recorder()
        self.port = _QuietUDPPort(0, self.protocol, "127.0.0.1", 65535, Clock())
        self.port.socket = self.sock = FakeUDPSocket()
        self.port.protocol = self.protocol

    def test_request_response_costs_one_read_per_datagram(self) -> None:
        for i in range(DRAIN_PROBE - 1):
            self.sock.pending.append(b"%d" % i)
            self.port.doRead()
        self.assertEqual(self.sock.calls, DRAIN_PROBE - 1)   # no EAGAIN probe
        self.assertEqual(len(self.protocol.received), DRAIN_PROBE - 1)
        self.sock.pending.append(b"last")
        self.port.doRead()     # the probe: reads it, then meets EAGAIN
        self.assertEqual(self.sock.calls, DRAIN_PROBE + 1)
        self.assertEqual(self.protocol.received[-1], b"last")

    def test_a_busy_flow_is_drained_every_wakeup(self) -> None:
        self.sock.pending.extend(b"x" for _ in range(100))
        wakeups = 0
        while self.sock.pending:
            self.port.doRead()
            wakeups += 1
        self.assertEqual(len(self.protocol.received), 100)
        self.assertLessEqual(wakeups, DRAIN_PROBE)
        # still draining: 5 waiting datagrams are read in one wakeup
        self.sock.pending.extend(b"y" for _ in range(5))
        self.port.doRead()
        self.assertEqual(self.sock.pending, [])
        # a drain that finds only one datagram goes back to one read per wakeup
        self.sock.pending.append(b"z")
        self.port.doRead()
        calls = self.sock.calls
        self.sock.pending.append(b"w")
        self.port.doRead()
        self.assertEqual(self.sock.calls, calls + 1)
        self.assertEqual(len(self.protocol.received), 107)


class DatagramSenderTests(unittest.TestCase):
    def test_sends_connected_and_to_an_address(self) -> None:
        sock = FakeUDPSocket()
        send = datagram_sender(sock)
        send(b"a")
        send(b"b", ("127.0.0.2", 9))
        self.assertEqual(sock.sent, [b"a", (b"b", ("127.0.0.2", 9))])

    def test_a_refused_datagram_is_dropped_and_counted(self) -> None:
        for error in (errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED, errno.EMSGSIZE):
            drops = []
            send = datagram_sender(FakeUDPSocket(send_error=error), lambda: drops.append(1))
            send(b"a")           # no exception: it would close the link that carried it
            send(b"b", ("127.0.0.2", 9))
            self.assertEqual(drops, [1, 1])


class OversizedBackendDatagramTests(unittest.TestCase):
    def test_a_service_datagram_no_frame_can_carry_is_dropped_and_counted(self) -> None:
        # (An IPv6 service may send up to 65,527 bytes; encoding it would close the link.)
        from pipegate.ports.udp import BackendSocket
        clock = Clock()
        flow = Flow(clock, 10.0, lambda data: None, lambda f: None)
        link = FakeLink()
        flow.attach(link, 7)
        backend = BackendSocket()
        backend.flow = flow
        backend.datagramReceived(b"x" * (frames.MAX_DATAGRAM + 1), ("::1", 53))
        backend.datagramReceived(b"x" * frames.MAX_DATAGRAM, ("::1", 53))
        self.assertEqual(flow.dropped, 1)
        self.assertEqual([len(f.data) for f in link.sent], [frames.MAX_DATAGRAM])
        flow.close(notify=False)
