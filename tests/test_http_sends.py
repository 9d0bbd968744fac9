"""
How the HTTP plane hands frames to its sockets: what a link sends while corked (each
reactor turn) leaves in one write (pipegate/http/pipe.py FrameLink), and the inspector's
Agent gets one endpoint per origin (pipegate/http/outbound.py AppEndpoints).
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported

from pipegate.http import frames
from pipegate.http.outbound import AppEndpoints
from pipegate.http.pipe import FrameLink, WireReader, ws_frame


class RecordingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Link(FrameLink):
    """A FrameLink at the server end of an open WebSocket (unmasked frames)."""

    STATE_OPEN = 3
    state = STATE_OPEN

    class factory:
        isServer = True

    def __init__(self, transport) -> None:
        self.transport = transport


def M(frame) -> bytes:
    """The WebSocket frame that carries one pipegate frame from the server end."""
    return ws_frame(frames.encode(frame), masked=False)


class CorkedLink(unittest.TestCase):
    """Between L{FrameLink.cork} and L{FrameLink.uncork} (what L{FrameLink.send_in_turn}
    does for each reactor turn) the frames are collected for one write."""

    def setUp(self) -> None:
        self.transport = RecordingTransport()
        self.link = Link(self.transport)

    def test_uncorked_frames_are_written_one_by_one(self) -> None:
        self.link.send_message(frames.End(1))
        self.link.send_message(frames.End(3))
        self.assertEqual(self.transport.writes, [M(frames.End(1)),
                                                 M(frames.End(3))])

    def test_corked_frames_are_one_write(self) -> None:
        head = frames.ResponseHead(1, 200, b"OK", ((b"a", b"b"),))
        self.link.cork()
        self.link.send_message(head)
        self.link.cork()   # nested: still one write, at the last uncork
        self.link.send_message(frames.Data(1, b"x" * 10))
        self.link.uncork()
        self.assertEqual(self.transport.writes, [])
        self.link.send_message(frames.End(1))
        self.link.uncork()
        self.assertEqual(self.transport.writes, [b"".join(
            M(f) for f in (head, frames.Data(1, b"x" * 10), frames.End(1)))])
        self.assertIs(self.link.transport, self.transport)

    def test_nothing_corked_writes_nothing(self) -> None:
        self.link.cork()
        self.link.uncork()
        self.assertEqual(self.transport.writes, [])
        self.assertIs(self.link.transport, self.transport)

    def test_other_transport_calls_pass_through_while_corked(self) -> None:
        self.link.cork()
        self.link.send_message(frames.End(1))
        self.assertEqual(self.link.transport.getPeer(), self.transport.getPeer())
        self.link.uncork()
        self.assertEqual(self.transport.writes, [M(frames.End(1))])

    def test_losing_the_connection_while_corked_writes_what_was_collected_first(self) -> None:
        lost_after: list = []
        self.transport.loseConnection = lambda: lost_after.append(list(self.transport.writes))
        self.link.cork()
        self.link.send_message(frames.End(1))
        self.link.send_message(frames.End(3))
        self.link.transport.loseConnection()
        self.link.uncork()
        self.assertEqual(lost_after, [[M(frames.End(1)) + M(frames.End(3))]])
        self.assertEqual(len(self.transport.writes), 1)   # nothing written twice


class LinkTurns:
    """An open link sends what one reactor turn produced in one write, after the turn."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock
        self.clock = Clock()
        self.transport = RecordingTransport()
        self.link = self.make_link()
        self.link.state = self.link.STATE_OPEN
        self.link.transport = self.transport

    def sent(self, write: bytes) -> list:
        """The pipegate frames in one write of this end."""
        reader = WireReader(masked=not self.link.factory.isServer)
        return [frames.decode(payload) for kind, payload in reader.feed(write)
                if kind is WireReader.MESSAGE]

    def test_frames_of_one_turn_leave_together_after_it(self) -> None:
        self.link.send(frames.End(1))
        self.link.send(frames.Window(3, 100))
        self.assertEqual(self.transport.writes, [])
        self.clock.advance(0)
        self.assertEqual(len(self.transport.writes), 1)
        self.assertEqual(self.sent(self.transport.writes[0]), [frames.End(1), frames.Window(3, 100)])
        self.assertIs(self.link.transport, self.transport)
        self.link.send(frames.End(5))      # the next turn: its own write
        self.clock.advance(0)
        self.assertEqual([self.sent(w) for w in self.transport.writes[1:]], [[frames.End(5)]])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RelayLinkTurns(LinkTurns, unittest.TestCase):
    """The relay's end: the request heads of many callers."""

    def make_link(self):
        from pipegate.http.relay import ConnectorLink
        link = ConnectorLink()
        link.factory = type("Factory", (), {"isServer": True,
                                            "relay": type("Relay", (), {"clock": self.clock})()})()
        link._open = True
        return link

    def test_a_closed_link_sends_nothing_and_schedules_nothing(self) -> None:
        self.link._open = False
        self.link.send(frames.End(1))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.transport.writes, [])


class ConnectorLinkTurns(LinkTurns, unittest.TestCase):
    """The connector's end: the answers of many apps read in one turn (masked frames)."""

    def make_link(self):
        from pipegate.http.connector import ConnectorProtocol
        link = ConnectorProtocol()
        link.factory = type("Factory", (), {"isServer": False,
                                            "connector": type("Connector", (), {"reactor": self.clock})()})()
        return link

    def test_a_link_not_open_sends_nothing_and_schedules_nothing(self) -> None:
        self.link.state = self.link.STATE_CLOSING
        self.link.send(frames.End(1))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.transport.writes, [])


class InspectorEndpoints(unittest.TestCase):
    def test_one_endpoint_per_origin(self) -> None:
        endpoints = AppEndpoints(MemoryReactorClock(), 5.0)
        first = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:3000/a"))
        self.assertIs(endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:3000/b?c")), first)
        self.assertIsNot(endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:3001/a")), first)
        self.assertIsNot(endpoints.endpointForURI(URI.fromBytes(b"https://127.0.0.1:3000/a")), first)

    def test_unknown_scheme_is_refused(self) -> None:
        endpoints = AppEndpoints(MemoryReactorClock())
        with self.assertRaises(SchemeNotSupported):
            endpoints.endpointForURI(URI.fromBytes(b"ftp://127.0.0.1:21/a"))

    def test_the_cache_is_bounded(self) -> None:
        endpoints = AppEndpoints(MemoryReactorClock())
        for port in range(1, 100):
            endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:%d/" % port))
        self.assertEqual(len(endpoints._cache), AppEndpoints.MAX_CACHED)
