"""
How the HTTP plane hands frames to its sockets: a corked block of a link leaves in one
write, the connector reads the local app inside its links' cork (pipegate/http/appclient.py),
and the inspector's Agent gets one endpoint per origin (pipegate/http/pipe.py FrameLink,
pipegate/http/outbound.py AppEndpoints).
"""

from __future__ import annotations

from contextlib import contextmanager

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported

from pipegate.http import frames
from pipegate.http.appclient import AppConnection, AppPool, AppRequest
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
    def setUp(self) -> None:
        self.transport = RecordingTransport()
        self.link = Link(self.transport)

    def test_uncorked_frames_are_written_one_by_one(self) -> None:
        self.link.send_message(frames.End(1))
        self.link.send_message(frames.End(3))
        self.assertEqual(self.transport.writes, [M(frames.End(1)),
                                                 M(frames.End(3))])

    def test_a_corked_block_is_one_write(self) -> None:
        head = frames.ResponseHead(1, 200, b"OK", ((b"a", b"b"),))
        with self.link.corked():
            self.link.send_message(head)
            with self.link.corked():   # nested: still one write, at the outermost end
                self.link.send_message(frames.Data(1, b"x" * 10))
            self.assertEqual(self.transport.writes, [])
            self.link.send_message(frames.End(1))
        self.assertEqual(self.transport.writes, [b"".join(
            M(f) for f in (head, frames.Data(1, b"x" * 10), frames.End(1)))])
        self.assertIs(self.link.transport, self.transport)

    def test_an_empty_block_writes_nothing(self) -> None:
        with self.link.corked():
            pass
        self.assertEqual(self.transport.writes, [])
        self.assertIs(self.link.transport, self.transport)

    def test_other_transport_calls_pass_through_inside_a_block(self) -> None:
        with self.link.corked():
            self.link.send_message(frames.End(1))
            self.assertEqual(self.link.transport.getPeer(), self.transport.getPeer())
        self.assertEqual(self.transport.writes, [M(frames.End(1))])

    def test_losing_the_connection_inside_a_block_writes_what_was_collected_first(self) -> None:
        lost_after: list = []
        self.transport.loseConnection = lambda: lost_after.append(list(self.transport.writes))
        with self.link.corked():
            self.link.send_message(frames.End(1))
            self.link.send_message(frames.End(3))
            self.link.transport.loseConnection()
        self.assertEqual(lost_after, [[M(frames.End(1)) + M(frames.End(3))]])
        self.assertEqual(len(self.transport.writes), 1)   # nothing written twice

    def test_an_error_inside_the_block_still_writes_and_restores(self) -> None:
        with self.assertRaises(ZeroDivisionError):
            with self.link.corked():
                self.link.send_message(frames.End(1))
                1 / 0
        self.assertIs(self.link.transport, self.transport)
        self.assertEqual(len(self.transport.writes), 1)


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


class Recorder:
    """A request's owner that logs what it is told."""

    def __init__(self, log: list) -> None:
        self.log = log

    def app_response(self, status, reason, headers, length) -> None:
        self.log.append(("head", status))

    def app_data(self, data: bytes) -> None:
        self.log.append(("data", data))

    def app_end(self) -> None:
        self.log.append(("end",))

    def app_failed(self, reason, answered) -> None:
        self.log.append(("failed",))


class AppConnections(unittest.TestCase):
    def test_each_read_and_the_loss_happen_inside_the_cork(self) -> None:
        log: list = []

        @contextmanager
        def corked():
            log.append("cork")
            yield
            log.append("uncork")

        connection = AppConnection(AppPool(MemoryReactorClock(), None, max_idle=0, corked=corked))
        connection.makeConnection(StringTransport())
        connection.send(AppRequest(Recorder(log), b"GET", b"GET / HTTP/1.1\r\n\r\n", None, None))
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        connection.connectionLost(None)
        self.assertEqual(log, ["cork", ("head", 200), ("data", b"ab"), "uncork",
                               "cork", ("failed",), "uncork"])

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
