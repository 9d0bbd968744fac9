"""UDP flow bookkeeping (pipegate.ports.udp): the lazy idle timer and the socket buffers."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from pipegate.mux import frames
from pipegate.ports.udp import Flow, set_buffers


class FakeLink:
    paused = False

    def __init__(self) -> None:
        self.sent = []
        self.removed = []

    def send(self, frame) -> None:
        self.sent.append(frame)

    def remove_channel(self, channel_id: int) -> None:
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
