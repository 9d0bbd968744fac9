"""
Guards for L{pipegate._compat}: one test per private name of Twisted, pyOpenSSL or
Autobahn that PipeGate uses, failing with that name when an upgrade changes it; no such
name outside pipegate/_compat.py; and the packaging guard: every distribution that
pipegate/ imports is declared in pyproject.toml, with upper bounds on those three.

No sockets: TLS runs over StringTransports, HTTPChannel on a StringTransport, the rest
is read from the libraries' classes and sources.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys
import textwrap
import tomllib
from importlib import metadata
from types import MethodType
from pathlib import Path

from OpenSSL import SSL
from twisted.application import internet
from twisted.internet import abstract, defer, protocol, ssl, task, tcp
from twisted.internet import error
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.logger import formatEvent, globalLogPublisher
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import policies, tls as twisted_tls
from twisted.trial import unittest
from twisted.python.failure import Failure
from twisted.web import client as web_client, http

from pipegate import _compat
from pipegate.mux.tls import generated_certificate
from tests.support import shuttle

ROOT = Path(__file__).resolve().parent.parent


class GuardMixin:
    """Assertions whose failure message names the private name and the module using it."""

    def assertPrivate(self, owner, name: str, use: str) -> None:
        if not hasattr(owner, name):
            owner_name = getattr(owner, "__qualname__", owner)
            self.fail(f"{owner_name}.{name} is gone (used by pipegate._compat.{use}); "
                      f"check the upgrade's changes and adapt pipegate/_compat.py")

    def assertSourceHas(self, function, fragment: str, use: str) -> None:
        source = inspect.getsource(function)
        if fragment not in source:
            self.fail(f"{function.__qualname__} no longer contains {fragment!r} "
                      f"(relied on by pipegate._compat.{use})")

    def assertSignature(self, function, params: list[str], use: str) -> None:
        found = list(inspect.signature(function).parameters)
        if found != params:
            self.fail(f"{function.__qualname__}{tuple(found)} changed from {tuple(params)} "
                      f"(overridden or called by pipegate._compat.{use})")


class _Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)


def handshaken_pair(factory_class):
    """A client and a server protocol of C{factory_class}, handshaken over StringTransports."""
    cert = generated_certificate()
    clock = task.Clock()
    server_options = ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original)
    server = factory_class(server_options, False, protocol.Factory.forProtocol(_Recorder),
                           clock).buildProtocol(None)
    client = factory_class(ssl.CertificateOptions(verify=False), True,
                           protocol.ClientFactory.forProtocol(_Recorder), clock).buildProtocol(None)
    server_transport, client_transport = StringTransport(), StringTransport()
    server.makeConnection(server_transport)
    client.makeConnection(client_transport)
    shuttle(client, client_transport, server, server_transport)
    return client, server


def mode_of(connection: SSL.Connection) -> int:
    """The connection's SSL mode bits (SSL_set_mode adds nothing and returns them)."""
    return SSL._lib.SSL_set_mode(connection._ssl, 0)


class TLSLayer(GuardMixin, unittest.TestCase):
    """BatchedTLSProtocol / BatchedTLSFactory / flush_tls_buffer: twisted.protocols.tls."""

    def test_overridden_and_called_methods_keep_their_shape(self):
        base = twisted_tls.TLSMemoryBIOProtocol
        for name, params in [("_write", ["self", "bytes"]), ("_flushSendBIO", ["self"]),
                             ("_flushReceiveBIO", ["self"]), ("_bufferedWrite", ["self", "octets"]),
                             ("_shutdownTLS", ["self"]), ("_tlsShutdownFinished", ["self", "reason"])]:
            self.assertPrivate(base, name, "BatchedTLSProtocol")
            self.assertSignature(getattr(base, name), params, "BatchedTLSProtocol")
        self.assertTrue(issubclass(_compat.BatchedTLSProtocol, twisted_tls.BufferingTLSTransport))
        self.assertIs(twisted_tls.TLSMemoryBIOFactory.protocol, twisted_tls.BufferingTLSTransport)

    def test_base_class_still_routes_through_the_overrides(self):
        base = twisted_tls.TLSMemoryBIOProtocol
        use = "BatchedTLSProtocol"
        self.assertSourceHas(base.write, "self._write(", use)
        self.assertSourceHas(base.dataReceived, "self._flushReceiveBIO()", use)
        self.assertSourceHas(base._checkHandshakeStatus, "self._flushSendBIO()", use)
        self.assertSourceHas(base._shutdownTLS, "self._flushSendBIO()", use)
        self.assertSourceHas(base.connectionLost, "self._flushReceiveBIO()", use)
        self.assertSourceHas(base._unbufferPendingWrites, "self._write(", use)

    def test_state_read_by_the_overrides(self):
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        for side in (client, server):
            self.assertIsInstance(side, _compat.BatchedTLSProtocol)
            for name in ("_tlsConnection", "_lostTLSConnection", "_aborted", "_handshakeDone",
                         "_appSendBuffer"):
                self.assertPrivate(side, name, "BatchedTLSProtocol")
            self.assertIsInstance(side._tlsConnection, SSL.Connection)
            self.assertIs(side._lostTLSConnection, False)
            self.assertIs(side._aborted, False)
            self.assertIs(side._handshakeDone, True)
            self.assertEqual(side._appSendBuffer, [])
        client.write(b"x" * 70_000)
        server.dataReceived(client.transport.value())
        self.assertEqual(server.wrappedProtocol.chunks, [b"x" * 70_000])

    def test_factory_creates_connections_through_creator_callable(self):
        self.assertSourceHas(twisted_tls.TLSMemoryBIOProtocol.makeConnection,
                             "self.factory._creatorCallable(self)", "BatchedTLSFactory")
        factory = twisted_tls.TLSMemoryBIOFactory(ssl.CertificateOptions(), True, protocol.ClientFactory())
        self.assertPrivate(factory, "_creatorCallable", "BatchedTLSFactory")
        # The wrapped creator is what made the connection: partial writes are off.
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        self.assertFalse(mode_of(client._tlsConnection) & SSL._lib.SSL_MODE_ENABLE_PARTIAL_WRITE)

    def test_buffering_layer_aggregates_in_aggregator(self):
        # flush_tls_buffer (used by pipegate.sockets.send_now) flushes it.
        layer = twisted_tls.BufferingTLSTransport(
            twisted_tls.TLSMemoryBIOFactory(ssl.CertificateOptions(), True, protocol.Factory.forProtocol(
                protocol.Protocol)), protocol.Protocol(), False)
        self.assertPrivate(layer, "_aggregator", "flush_tls_buffer")
        self.assertTrue(callable(layer._aggregator.flush), "BufferingTLSTransport._aggregator.flush")
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        client.transport.clear()
        client.write(b"small")
        self.assertEqual(client.transport.value(), b"", "small writes no longer wait for the turn's end")
        _compat.flush_tls_buffer(client)
        server.dataReceived(client.transport.value())
        self.assertEqual(server.wrappedProtocol.chunks, [b"small"])

    def test_flush_asks_nothing_of_other_transports(self):
        # A wrapper (the gateway's accept gate around a mux link's socket) would look _aggregator up
        # through its __getattr__ and miss: an AttributeError raised and caught per flush.
        asked = []

        class Wrapper(policies.ProtocolWrapper):
            def __getattr__(self, name):
                asked.append(name)
                return super().__getattr__(name)
        wrapper = Wrapper(policies.WrappingFactory(protocol.Factory()), protocol.Protocol())
        wrapper.makeConnection(StringTransport())
        _compat.flush_tls_buffer(wrapper)
        self.assertEqual(asked, [])


class PyOpenSSL(GuardMixin, unittest.TestCase):
    """whole_writes: pyOpenSSL's SSL._lib and Connection._ssl."""

    def test_private_binding_and_pointer(self):
        self.assertPrivate(SSL, "_lib", "whole_writes")
        for name in ("SSL_clear_mode", "SSL_set_mode", "SSL_MODE_ENABLE_PARTIAL_WRITE"):
            self.assertPrivate(SSL._lib, name, "whole_writes")
        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD))
        self.assertPrivate(connection, "_ssl", "whole_writes")

    def test_whole_writes_clears_partial_writes(self):
        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD))
        # pyOpenSSL's default is on: the reason whole_writes exists.
        self.assertTrue(mode_of(connection) & SSL._lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        _compat.whole_writes(connection)
        self.assertFalse(mode_of(connection) & SSL._lib.SSL_MODE_ENABLE_PARTIAL_WRITE)


class TCPTransport(GuardMixin, unittest.TestCase):
    """tcp_data_received, has_write_buffers, nothing_queued, write_closed, close_without_shutdown."""

    def file_descriptor(self) -> abstract.FileDescriptor:
        fd = abstract.FileDescriptor(reactor=MemoryReactorClock())
        fd.connected = 1
        return fd

    def test_connection_reads_through_data_received(self):
        self.assertPrivate(tcp.Connection, "_dataReceived", "tcp_data_received")
        self.assertSignature(tcp.Connection._dataReceived, ["self", "data"], "tcp_data_received")
        self.assertSourceHas(tcp.Connection.doRead, "self.socket.recv(self.bufferSize)", "tcp_data_received")
        self.assertSourceHas(tcp.Connection.doRead, "self._dataReceived(data)", "tcp_data_received")
        connection = tcp.Connection.__new__(tcp.Connection)
        self.assertEqual(_compat.tcp_data_received(connection), connection._dataReceived)
        self.assertIsNone(_compat.tcp_data_received(StringTransport()))

    def test_file_descriptor_write_buffers(self):
        fd = self.file_descriptor()
        for name in ("_tempDataLen", "dataBuffer", "offset"):
            self.assertPrivate(fd, name, "nothing_queued")
        self.assertTrue(_compat.nothing_queued(fd))
        fd.write(b"abc")
        self.assertEqual(fd._tempDataLen, 3, "FileDescriptor.write no longer counts in _tempDataLen")
        self.assertFalse(_compat.nothing_queued(fd))
        self.assertIs(tcp.Connection.TLS, False)   # has_write_buffers' test for a TCP connection
        self.assertFalse(_compat.has_write_buffers(fd))
        self.assertFalse(_compat.has_write_buffers(StringTransport()))
        fd.TLS = False   # (what tcp.Connection adds)
        self.assertTrue(_compat.has_write_buffers(fd))

    def test_write_disconnected_flag(self):
        self.assertPrivate(abstract.FileDescriptor, "_writeDisconnected", "write_closed")
        self.assertSourceHas(abstract.FileDescriptor.doWrite, "self._writeDisconnected = True",
                             "write_closed")
        fd = self.file_descriptor()
        self.assertFalse(_compat.write_closed(fd))
        fd._writeDisconnected = True
        self.assertTrue(_compat.write_closed(fd))
        fd.write(b"dropped")
        self.assertTrue(_compat.nothing_queued(fd),
                        "FileDescriptor.write no longer drops writes after a half-close")
        # Set by write_closed(mark=True) after a direct shutdown: loseConnection must then close
        # at once, without waiting for the reactor (sockets.close_now).
        fd = self.file_descriptor()
        lost = []
        fd.connectionLost = lost.append
        self.assertTrue(_compat.write_closed(fd, mark=True))
        self.assertTrue(fd._writeDisconnected)
        fd.loseConnection()
        self.assertEqual(len(lost), 1, "FileDescriptor.loseConnection no longer closes at once after a half-close")
        lost[0].trap(ConnectionDone)
        self.assertFalse(fd.disconnecting)

    def test_writable_now(self):
        # The eager write's one call: the same answer as nothing_queued, write_closed and the public flags.
        for name in ("_tempDataLen", "dataBuffer", "offset", "_writeDisconnected"):
            self.assertPrivate(abstract.FileDescriptor(reactor=MemoryReactorClock()), name, "writable_now")

        def general(fd) -> bool:
            return (_compat.nothing_queued(fd) and bool(fd.connected) and not fd.disconnecting
                    and not _compat.write_closed(fd) and not fd.TLS)

        def states():
            yield "fresh", lambda fd: None
            yield "queued", lambda fd: fd.write(b"abc")
            yield "queued, then flushed", lambda fd: (fd.write(b"abc"), setattr(fd, "offset", 3),
                                                      setattr(fd, "_tempDataLen", 0),
                                                      setattr(fd, "dataBuffer", b"abc"))
            yield "in the buffer, not flushed", lambda fd: setattr(fd, "dataBuffer", b"abc")
            yield "not connected", lambda fd: setattr(fd, "connected", 0)
            yield "disconnecting", lambda fd: setattr(fd, "disconnecting", True)
            yield "write closed", lambda fd: _compat.write_closed(fd, mark=True)
            yield "startTLS", lambda fd: setattr(fd, "TLS", True)

        answers = {}
        for name, change in states():
            fd = self.file_descriptor()
            fd.TLS = False
            change(fd)
            answers[name] = _compat.writable_now(fd)
            self.assertEqual(answers[name], general(fd), name)
        self.assertEqual([name for name, writable in answers.items() if writable],
                         ["fresh", "queued, then flushed"])

    def test_should_shutdown(self):
        self.assertPrivate(tcp.Connection, "_shouldShutdown", "close_without_shutdown")
        self.assertIs(tcp.Connection._shouldShutdown, True)
        self.assertSourceHas(tcp.Connection._closeSocket, "if self._shouldShutdown:", "close_without_shutdown")
        calls = []

        class Socket:
            def shutdown(self, how):
                calls.append(("shutdown", how))

            def close(self):
                calls.append("close")
        plain = type("Plain", (tcp.Connection,), {})
        closing = _compat.close_without_shutdown(type("Closing", (tcp.Connection,), {}))
        for kind, expected in ((plain, [("shutdown", 2), "close"]), (closing, ["close"])):
            connection = kind.__new__(kind)
            connection.socket = Socket()
            del calls[:]
            connection._closeSocket(True)   # (orderly: what connectionLost asks but after an abort)
            self.assertEqual(calls, expected, kind)


class WebClient(GuardMixin, unittest.TestCase):
    """quiet_pool / quiet_http11_client_factory: twisted.web.client."""

    def test_pool_builds_connections_with_its_factory(self):
        self.assertPrivate(web_client, "_HTTP11ClientFactory", "quiet_http11_client_factory")
        self.assertSignature(web_client._HTTP11ClientFactory.__init__,
                             ["self", "quiescentCallback", "metadata"], "quiet_http11_client_factory")
        pool = web_client.HTTPConnectionPool(MemoryReactorClock(), persistent=False)
        self.assertPrivate(pool, "_factory", "quiet_pool")
        self.assertIs(pool._factory, web_client._HTTP11ClientFactory)
        self.assertSourceHas(web_client.HTTPConnectionPool._newConnection, "self._factory(", "quiet_pool")

    def test_quiet_factory(self):
        pool = _compat.quiet_pool(web_client.HTTPConnectionPool(MemoryReactorClock(), persistent=False))
        factory = pool._factory(lambda protocol: None, "metadata")
        self.assertIsInstance(factory, web_client._HTTP11ClientFactory)
        self.assertFalse(factory.noisy)
        self.assertTrue(web_client._HTTP11ClientFactory(lambda protocol: None, "metadata").noisy)


class _Refused:
    """A client endpoint whose every connection attempt is refused."""

    def connect(self, factory):
        return defer.fail(ConnectionRefusedError())


class ClientServiceLog(GuardMixin, unittest.TestCase):
    """QuietClientService: twisted.application.internet.ClientService."""

    def events(self, cls) -> list[str]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = task.Clock()
        dialer = cls(_Refused(), protocol.Factory.forProtocol(protocol.Protocol), retryPolicy=lambda n: 1.0,
                     clock=clock)
        dialer.startService()
        dialer.startService()   # ClientService warns about a second start
        clock.advance(1.0)      # a second failed attempt
        dialer.stopService()
        return [formatEvent(e) for e in events]

    def test_retry_lines_are_dropped_and_warnings_pass(self):
        self.assertPrivate(internet.ClientService, "_log", "QuietClientService")
        self.assertSourceHas(internet.ClientService.__init__, "log=self._log", "QuietClientService")
        stock = self.events(internet.ClientService)
        self.assertTrue(any(line.startswith("Scheduling retry 1 to connect") for line in stock), stock)
        quiet = self.events(_compat.QuietClientService)
        self.assertFalse(any("Scheduling retry" in line for line in quiet), quiet)
        self.assertTrue(any(line.startswith("Duplicate ClientService.startService") for line in quiet), quiet)


class _Request(http.Request):
    received = None

    def requestReceived(self, command, path, version):
        type(self).received = (command, path, version)


def channel() -> http.HTTPChannel:
    ch = http.HTTPChannel()
    ch.requestFactory = _Request
    ch.timeOut = None
    ch.makeConnection(StringTransport())
    return ch


class HTTPChannelState(GuardMixin, unittest.TestCase):
    """first_line_pending ... abort_pending: twisted.web.http.HTTPChannel's parser state."""

    def test_first_line_flag(self):
        self.assertPrivate(http.HTTPChannel, "_HTTPChannel__first_line", "first_line_pending")
        ch = channel()
        self.assertTrue(_compat.first_line_pending(ch))
        ch.dataReceived(b"GET /a%20b HTTP/1.1\r\n")
        self.assertFalse(_compat.first_line_pending(ch),
                         "HTTPChannel.__first_line not cleared by a request line")

    def test_parsed_request_line(self):
        ch = channel()
        ch.dataReceived(b"POST /raw?q=1 HTTP/1.1\r\n")
        for name in ("_command", "_path", "_version"):
            self.assertPrivate(ch, name, "parsed_request_line")
        self.assertEqual(_compat.parsed_request_line(ch), (b"POST", b"/raw?q=1", b"HTTP/1.1"))
        self.assertEqual(_compat.request_path(ch), b"/raw?q=1")
        _compat.set_request_path(ch, b"/other")
        ch.dataReceived(b"Host: x\r\n\r\n")
        self.assertEqual(_Request.received, (b"POST", b"/other", b"HTTP/1.1"))

    def test_reset_matches_all_content_received(self):
        # reset_request_parser + hold_for_request copy HTTPChannel.allContentReceived up to
        # its requestReceived call; a release that resets more state must update the copy.
        tree = ast.parse(textwrap.dedent(inspect.getsource(http.HTTPChannel.allContentReceived)))
        assigned, deleted = set(), set()
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else []
            for target in targets:
                for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                            and t.value.id == "self"):
                        (deleted if isinstance(node, ast.Delete) else assigned).add(t.attr)
        self.assertEqual(assigned, {"length", "_receivedHeaderCount", "_receivedHeaderSize", "__first_line",
                                    "_transferDecoder", "_savedTimeOut", "_handlingRequest"},
                         "HTTPChannel.allContentReceived resets other state than "
                         "reset_request_parser/hold_for_request")
        self.assertEqual(deleted, {"_command", "_path", "_version"})

    def test_reset_and_hold_leave_the_channel_as_stock_does(self):
        stock = channel()
        stock.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")   # stock allContentReceived ran
        ours = channel()
        ours.allContentReceived = lambda: None                     # ...and here ours does its work
        ours.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _compat.reset_request_parser(ours)
        _compat.hold_for_request(ours)
        for name in ("length", "_receivedHeaderCount", "_receivedHeaderSize", "_HTTPChannel__first_line",
                     "_transferDecoder", "_handlingRequest"):
            self.assertEqual(getattr(ours, name), getattr(stock, name), name)
        for name in ("_command", "_path", "_version"):
            self.assertFalse(hasattr(ours, name), name)
        timed = channel()
        timed.callLater = task.Clock().callLater
        timed.setTimeout(60)
        _compat.hold_for_request(timed)
        self.assertEqual(timed._savedTimeOut, 60, "HTTPChannel._savedTimeOut")
        self.assertIsNone(timed.timeOut)

    def test_aborting_call(self):
        self.assertPrivate(http.HTTPChannel, "_abortingCall", "abort_pending")
        self.assertSourceHas(http.HTTPChannel.forceAbortClient, "self._abortingCall = None", "abort_pending")
        ch = channel()
        clock = task.Clock()
        ch.callLater = clock.callLater
        self.assertFalse(_compat.abort_pending(ch))
        ch.timeoutConnection()
        self.assertTrue(_compat.abort_pending(ch),
                        "HTTPChannel.timeoutConnection no longer sets _abortingCall")
        clock.advance(60)
        self.assertFalse(_compat.abort_pending(ch))


class AutobahnState(GuardMixin, unittest.TestCase):
    """cancel_close_timer, handshake_status_line, autobahn_between_frames, autobahn_traffic_seen:
    Autobahn's WebSocketProtocol."""

    def test_receive_state_between_frames(self):
        from autobahn.websocket.protocol import (WebSocketClientProtocol, WebSocketProtocol,
                                                 WebSocketServerProtocol)
        use = "autobahn_between_frames"
        self.assertSourceHas(WebSocketProtocol._connectionMade, "self.data = b\"\"", use)
        for done in (WebSocketServerProtocol.succeedHandshake, WebSocketClientProtocol.processHandshake):
            self.assertSourceHas(done, "self.current_frame = None", use)   # at the opening handshake's end
            self.assertSourceHas(done, "self.inside_message = False", use)
        self.assertSourceHas(WebSocketProtocol._dataReceived, "self.data += data", use)
        self.assertSourceHas(WebSocketProtocol.processData, "self.current_frame = FrameHeader(", use)
        self.assertSourceHas(WebSocketProtocol.onFrameEnd, "self.current_frame = None", use)
        self.assertSourceHas(WebSocketProtocol.onFrameBegin, "self.inside_message = True", use)
        self.assertSourceHas(WebSocketProtocol.onFrameEnd, "self.inside_message = False", use)
        proto = WebSocketProtocol()
        proto.data, proto.current_frame, proto.inside_message = b"", None, False
        self.assertTrue(_compat.autobahn_between_frames(proto))
        for name, value in (("data", b"\x82"), ("current_frame", object()), ("inside_message", True)):
            busy = WebSocketProtocol()
            busy.data, busy.current_frame, busy.inside_message = b"", None, False
            setattr(busy, name, value)
            self.assertFalse(_compat.autobahn_between_frames(busy), name)

    def test_traffic_cancels_the_ping_timeout(self):
        from autobahn.websocket.protocol import WebSocketProtocol
        use = "autobahn_traffic_seen"
        self.assertPrivate(WebSocketProtocol, "_cancelAutoPingTimeoutCall", use)
        self.assertSourceHas(WebSocketProtocol.onFrameEnd, "self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic",
                             use)
        self.assertSourceHas(WebSocketProtocol.onFrameEnd, "self._cancelAutoPingTimeoutCall()", use)
        self.assertSourceHas(WebSocketProtocol._connectionMade, "self.autoPingTimeoutCall = None", use)
        cancelled = []
        proto = WebSocketProtocol()
        proto._cancelAutoPingTimeoutCall = lambda: cancelled.append(True)
        proto.autoPingRestartOnAnyTraffic = True
        proto.autoPingTimeoutCall = None
        _compat.autobahn_traffic_seen(proto)
        self.assertEqual(cancelled, [])
        proto.autoPingTimeoutCall = object()
        _compat.autobahn_traffic_seen(proto)
        self.assertEqual(cancelled, [True])
        proto.autoPingRestartOnAnyTraffic = False
        _compat.autobahn_traffic_seen(proto)
        self.assertEqual(cancelled, [True])

    def test_close_handshake_timer(self):
        from autobahn.twisted.websocket import WebSocketClientProtocol
        from autobahn.websocket.protocol import WebSocketProtocol
        self.assertSourceHas(WebSocketProtocol.sendCloseFrame, "self.closeHandshakeTimeoutCall = ",
                             "cancel_close_timer")
        self.assertSourceHas(WebSocketProtocol._connectionMade, "self.closeHandshakeTimeoutCall = None",
                             "cancel_close_timer")
        proto = WebSocketClientProtocol()
        clock = task.Clock()
        proto.closeHandshakeTimeoutCall = clock.callLater(5, lambda: None)
        _compat.cancel_close_timer(proto)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIsNone(proto.closeHandshakeTimeoutCall)
        _compat.cancel_close_timer(proto)   # none pending: nothing to do

    def test_handshake_status_line(self):
        from autobahn.twisted.websocket import WebSocketClientProtocol
        self.assertSourceHas(WebSocketClientProtocol.processHandshake, "self.http_status_line",
                             "handshake_status_line")
        proto = WebSocketClientProtocol()
        self.assertEqual(_compat.handshake_status_line(proto), "")
        proto.http_status_line = "HTTP/1.1 409 Conflict"
        self.assertEqual(_compat.handshake_status_line(proto), "HTTP/1.1 409 Conflict")


# -- declared dependencies ----------------------------------------------------------------

def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_top_level(root: Path) -> dict[str, set[str]]:
    """Every top-level module imported anywhere under C{root} (lazy imports too) -> files."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(root.parent)))
    return found


def extension_owners(module: str) -> list[str]:
    """
    The distributions that install C{module} as a top-level compiled extension
    (C{_nvx_xormasker.cpython-311-x86_64-linux-gnu.so}, Autobahn's): C{packages_distributions}
    maps only Python files and packages.
    """
    return [dist.metadata["Name"] for dist in metadata.distributions()
            for f in dist.files or ()
            if len(f.parts) == 1 and f.name.split(".")[0] == module and f.suffix in (".so", ".pyd")]


def declared_requirements() -> dict[str, str]:
    """The [project] dependencies of pyproject.toml: normalized name -> requirement."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
        out[_normalize(name)] = requirement
    return out


class AutobahnMasker(GuardMixin, unittest.TestCase):
    """xor_mask: Autobahn's compiled NVX masker module, loaded without its wrapper."""

    def test_compiled_module_and_functions(self):
        import _nvx_xormasker
        for name in ("nvx_xormask_new", "nvx_xormask_set_impl", "nvx_xormask_process", "nvx_xormask_free"):
            self.assertPrivate(_nvx_xormasker.lib, name, "xor_mask")
        from autobahn.nvx import _xormasker
        self.assertSourceHas(_xormasker.XorMaskerNvx.__init__, "nvx_xormask_set_impl(self._masker, 2)",
                             "xor_mask")   # 2 = SSE2
        self.assertIsNotNone(_compat._nvx_lib, "pipegate._compat found no _nvx_xormasker")

    def test_masks_as_autobahn_does(self):
        from autobahn.nvx._xormasker import create_xor_masker
        for size in (0, 1, 3, 4, 5, 127, 128, 129, 1023, 1024, 65536 + 3):
            payload = os.urandom(size)
            mask = os.urandom(4)
            self.assertEqual(_compat.xor_mask(mask, payload), create_xor_masker(mask, size).process(payload), size)
            self.assertEqual(_compat.xor_mask(mask, _compat.xor_mask(mask, payload)), payload)


class WriteNow(GuardMixin, unittest.TestCase):
    """write_now: BufferingTLSTransport._aggregator and _AggregateSmallWrites._buffer / flush."""

    def pair(self):
        clock = task.Clock()
        cert = generated_certificate()
        server = _compat.BatchedTLSFactory(
            ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original), False,
            protocol.Factory.forProtocol(_Recorder), clock).buildProtocol(None)
        client = _compat.BatchedTLSFactory(ssl.CertificateOptions(verify=False), True,
                                           protocol.ClientFactory.forProtocol(_Recorder), clock).buildProtocol(None)
        server_transport, client_transport = StringTransport(), StringTransport()
        server.makeConnection(server_transport)
        client.makeConnection(client_transport)
        shuttle(client, client_transport, server, server_transport)
        for call in clock.getDelayedCalls():   # (the handshake's own writes' flushes)
            clock.advance(0)
        client_transport.clear()
        return clock, client, server

    def test_private_names(self):
        self.assertPrivate(twisted_tls, "_AggregateSmallWrites", "write_now")
        self.assertIs(_compat._AggregateSmallWrites, twisted_tls._AggregateSmallWrites)
        clock, client, server = self.pair()
        self.assertPrivate(client, "_aggregator", "write_now")
        self.assertIsInstance(client._aggregator, twisted_tls._AggregateSmallWrites)
        self.assertPrivate(client._aggregator, "_buffer", "write_now")
        self.assertIsInstance(client._aggregator._buffer, list)
        self.assertSourceHas(twisted_tls._AggregateSmallWrites.write, "self._clock.callLater(0", "write_now")
        self.assertSourceHas(twisted_tls.TLSMemoryBIOProtocol.write, "self._write(", "write_now")

    def test_writes_at_once_after_what_is_held_without_a_call(self):
        clock, client, server = self.pair()
        now = _compat.write_now(client)
        now(b"first")
        self.assertEqual(clock.getDelayedCalls(), [], "write_now scheduled the aggregator's flush")
        server.dataReceived(client.transport.value())
        client.transport.clear()
        client.write(b"held")   # through the aggregator: waits for the turn's end
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(client.transport.value(), b"")
        writes = []
        client.transport.write = writes.append
        now(b"second")
        self.assertEqual(len(writes), 1, "the held bytes and write_now's went in separate writes")
        server.dataReceived(writes[0])
        self.assertEqual(b"".join(server.wrappedProtocol.chunks), b"firstheldsecond")
        clock.advance(0)   # the held write's flush finds nothing left
        self.assertEqual(len(writes), 1)

    def test_dropped_once_the_connection_is_lost(self):
        clock, client, server = self.pair()
        now = _compat.write_now(client)
        client.connectionLost(Failure(ConnectionDone()))
        client.transport.clear()
        now(b"late")
        self.assertEqual(client.transport.value(), b"")

    def test_other_transports_write_as_usual(self):
        transport = StringTransport()
        _compat.write_now(transport)(b"plain")
        self.assertEqual(transport.value(), b"plain")


class LeanDispatch(GuardMixin, unittest.TestCase):
    """lean_dispatch: EPollReactor.doPoll's loop, _poller, _selectables, _doReadOrWrite."""

    def reactor(self):
        from twisted.internet.epollreactor import EPollReactor
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        waker = reactor.waker
        for end in ("i", "o"):
            if isinstance(getattr(waker, end, None), int):
                self.addCleanup(os.close, getattr(waker, end))
        return reactor

    def test_private_names_and_the_loop_copied(self):
        from twisted.internet.epollreactor import EPollReactor
        use = "lean_dispatch"
        reactor = self.reactor()
        for name in ("_poller", "_selectables", "_doReadOrWrite"):
            self.assertPrivate(reactor, name, use)
        self.assertSignature(EPollReactor._doReadOrWrite, ["self", "selectable", "fd", "event"], use)
        # _lean_do_poll is this loop with callWithLogger left out: a change to it is a change to copy.
        self.assertSourceHas(EPollReactor.doPoll, "l = self._poller.poll(timeout, len(self._selectables))", use)
        self.assertSourceHas(EPollReactor.doPoll, "log.callWithLogger(selectable, _drdw, selectable, fd, event)", use)
        self.assertSourceHas(EPollReactor.doPoll, "if err.errno == errno.EINTR:", use)
        self.assertIs(EPollReactor.doIteration, EPollReactor.doPoll)

    def test_dispatches_events_and_survives_a_failing_one(self):
        import socket
        from twisted.internet import main
        reactor = self.reactor()
        self.assertTrue(_compat.lean_dispatch(reactor))
        self.assertTrue(_compat.lean_dispatch(reactor))   # (idempotent)
        self.assertIs(type(reactor.doIteration), _compat._LeanPoll)
        events = []

        class Reader(abstract.FileDescriptor):
            def __init__(self, sock, fail):
                super().__init__(reactor)
                self.sock, self.fail = sock, fail
                self.connected = True

            def fileno(self):
                return self.sock.fileno()

            def doRead(self):
                events.append(("read", self.sock.recv(10)))
                return main.CONNECTION_DONE if self.fail else None

            def connectionLost(self, reason):
                events.append(("lost", self.fail))
                raise RuntimeError("connectionLost failed")

        pairs = [socket.socketpair() for _ in range(2)]
        for a, b in pairs:
            self.addCleanup(a.close)
            self.addCleanup(b.close)
        failing, fine = Reader(pairs[0][0], True), Reader(pairs[1][0], False)
        reactor.addReader(failing)
        reactor.addReader(fine)
        pairs[0][1].send(b"one")
        pairs[1][1].send(b"two")
        reactor.doIteration(1)
        self.assertEqual(sorted(events), [("lost", True), ("read", b"one"), ("read", b"two")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn(failing, reactor.getReaders())
        self.assertIn(fine, reactor.getReaders())
        reactor.removeReader(fine)

    def test_read_events_inline_as_do_read_or_write(self):
        # A read event alone runs _doReadOrWrite's read branch inline: the same calls, logs and disconnects as
        # the reactor's own doPoll, for every outcome of doRead.
        import socket
        from twisted.internet import main, posixbase
        from twisted.internet.epollreactor import EPollReactor
        from twisted.internet.interfaces import IHalfCloseableDescriptor
        from zope.interface import implementer
        use = "lean_dispatch"
        for name in ("_disconnectSelectable", "_POLL_IN"):
            self.assertPrivate(EPollReactor, name, use)
        self.assertSignature(EPollReactor._disconnectSelectable, ["self", "selectable", "why", "isRead", "faildict"],
                             use)
        for fragment in ("if selectable.fileno() == -1:", "why = selectable.doRead()", "why = sys.exc_info()[1]",
                         "log.err()", "self._disconnectSelectable(selectable, why, inRead)"):
            self.assertSourceHas(posixbase._PollLikeMixin._doReadOrWrite, fragment, use)

        def run(lean: bool, outcome: str) -> list:
            reactor = self.reactor()
            seen = []
            if lean:
                self.assertTrue(_compat.lean_dispatch(reactor))
                general = reactor._doReadOrWrite
                reactor._doReadOrWrite = lambda *args: (seen.append("general path"), general(*args))

            @implementer(IHalfCloseableDescriptor)
            class Reader(abstract.FileDescriptor):
                def __init__(self, sock):
                    super().__init__(reactor)
                    self.sock = sock
                    self.connected = True
                    self.registered = False

                def fileno(self):
                    return -1 if outcome == "no fd" and self.registered else self.sock.fileno()

                def doRead(self):
                    seen.append(("read", self.sock.recv(10)))
                    if outcome == "raises":
                        raise ValueError("doRead failed")
                    return {"done": main.CONNECTION_DONE, "lost": main.CONNECTION_LOST}.get(outcome)

                def readConnectionLost(self, reason):
                    seen.append(("readConnectionLost", reason.type))

                def connectionLost(self, reason):
                    seen.append(("connectionLost", reason.type))

            a, b = socket.socketpair()
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            reader = Reader(a)
            reactor.addReader(reader)
            reader.registered = True
            b.send(b"x")
            if lean:
                reactor.doIteration(1)
            else:
                EPollReactor.doPoll(reactor, 1)
            seen.append(("still read", reader in reactor.getReaders()))
            seen.append(("logged", [type(f.value) for f in self.flushLoggedErrors()]))
            reactor.removeReader(reader)
            return seen

        expected = {
            "none": [("read", b"x"), ("still read", True), ("logged", [])],
            "done": [("read", b"x"), ("readConnectionLost", error.ConnectionDone), ("still read", False),
                     ("logged", [])],
            "lost": [("read", b"x"), ("connectionLost", error.ConnectionLost), ("still read", False),
                     ("logged", [])],
            "raises": [("read", b"x"), ("connectionLost", ValueError), ("still read", False),
                       ("logged", [ValueError])],
            "no fd": [("connectionLost", error.ConnectionFdescWentAway), ("still read", False), ("logged", [])],
        }
        for outcome, seen in expected.items():
            self.assertEqual(run(False, outcome), seen, outcome)
            self.assertEqual(run(True, outcome), ["general path"] * (outcome == "no fd") + seen, outcome)

    def test_turn_end_calls_run_after_the_events_of_the_turn(self):
        import socket
        reactor = self.reactor()
        clock = _compat.TurnEndClock(reactor)
        self.assertTrue(_compat.lean_dispatch(reactor))
        ran = []

        class Reader(abstract.FileDescriptor):
            def __init__(self, sock):
                super().__init__(reactor)
                self.sock = sock
                self.connected = True

            def fileno(self):
                return self.sock.fileno()

            def doRead(self):
                ran.append(("read", self.sock.recv(10)))
                clock.callLater(0, ran.append, "turn end")
                clock.callLater(0, ran.append, "cancelled").cancel()

        def fail():
            raise RuntimeError("turn-end call failed")

        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        reader = Reader(a)
        reactor.addReader(reader)
        self.addCleanup(reactor.removeReader, reader)
        # Queued outside the loop (or by a timed call): run before the next poll, which does not sleep.
        call = clock.callLater(0, fail)
        clock.callLater(0, ran.append, "early")
        self.assertTrue(call.active())
        self.assertEqual(reactor.getDelayedCalls(), [])
        reactor.doIteration(None)
        self.assertFalse(call.active())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(ran, ["early"])
        b.send(b"x")
        reactor.doIteration(1)
        self.assertEqual(ran, ["early", ("read", b"x"), "turn end"])
        self.assertEqual(reactor.getDelayedCalls(), [])
        later = clock.callLater(5, ran.append, "later")   # not the turn's end: the reactor's
        self.assertEqual(reactor.getDelayedCalls(), [later])
        later.cancel()

    def test_calls_after_an_interrupted_one_still_run(self):
        reactor = self.reactor()
        clock = _compat.TurnEndClock(reactor)
        self.assertTrue(_compat.lean_dispatch(reactor))
        ran = []

        def interrupt():
            raise KeyboardInterrupt()
        clock.callLater(0, ran.append, 1)
        clock.callLater(0, interrupt)
        after = clock.callLater(0, ran.append, 2)
        with self.assertRaises(KeyboardInterrupt):
            reactor.doIteration(0)
        self.assertEqual(ran, [1])
        self.assertTrue(after.active())   # (a small-write aggregator waiting on it would stall)
        reactor.doIteration(0)
        self.assertEqual(ran, [1, 2])
        self.assertFalse(after.active())

    def test_turn_end_clock_without_lean_dispatch_is_the_reactor(self):
        reactor = task.Clock()
        clock = _compat.TurnEndClock(reactor)
        ran = []
        clock.callLater(0, ran.append, 1)
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        reactor.advance(0)
        self.assertEqual(ran, [1])
        self.assertEqual(clock.seconds(), reactor.seconds())

    def test_link_tls_layers_use_it(self):
        from twisted.internet import reactor
        factory = _compat.BatchedTLSFactory(ssl.CertificateOptions(), True,
                                            protocol.ClientFactory.forProtocol(protocol.Protocol))
        self.assertIsInstance(factory._clock, _compat.TurnEndClock)
        self.assertIs(factory._clock.reactor, reactor)
        layer = factory.buildProtocol(None)
        self.assertIs(layer._aggregator._clock, factory._clock)

    def test_other_reactors_are_left_alone(self):
        self.assertFalse(_compat.lean_dispatch(task.Clock()))
        self.assertFalse(_compat.lean_dispatch(MemoryReactorClock()))


class BIOProbe(GuardMixin, unittest.TestCase):
    """probe_bios: SSL._lib.BIO_get_mem_data, SSL._ffi.NULL, Connection._into_ssl / _from_ssl."""

    def test_private_names(self):
        self.assertPrivate(SSL, "_lib", "probe_bios")
        self.assertPrivate(SSL, "_ffi", "probe_bios")
        for name in ("BIO_get_mem_data", "BIO_read", "BIO_write", "SSL_pending", "SSL_read", "SSL_write",
                     "SSL_get_error", "SSL_ERROR_WANT_READ"):
            self.assertPrivate(SSL._lib, name, "probe_bios")
        for name in ("new_allocator", "buffer"):
            self.assertPrivate(SSL._ffi, name, "BatchedTLSProtocol._pg_read")
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        for side in (client, server):
            for name in ("_ssl", "_into_ssl", "_from_ssl"):
                self.assertPrivate(side._tlsConnection, name, "probe_bios")
            self.assertTrue(side._pg_probe, "BatchedTLSFactory's layers do not probe their BIOs")

    def test_large_reads_are_fresh_read_only_views(self):
        # What FrameDecoder relies on to keep them uncopied: each read its own buffer, read-only.
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        client.transport.clear()
        reads = server.wrappedProtocol.chunks
        for fill in (b"a", b"b"):
            client.write(fill * 70_000)
            server.dataReceived(client.transport.value())
            client.transport.clear()
        client.write(b"c" * 100)
        _compat.flush_tls_buffer(client)
        server.dataReceived(client.transport.value())
        self.assertEqual([type(read) for read in reads], [memoryview, memoryview, bytes])
        self.assertTrue(reads[0].readonly and reads[1].readonly)
        self.assertEqual((reads[0], reads[1], reads[2]), (b"a" * 70_000, b"b" * 70_000, b"c" * 100))

    def test_a_part_of_a_record_stops_reading_without_an_exception(self):
        # SSL_read's WANT_READ on a record not yet whole ends the read, without pyOpenSSL's recv
        # (which would raise and catch a WantReadError).
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        client.transport.clear()
        client.write(b"p" * 40_000)
        _compat.flush_tls_buffer(client)
        wire = client.transport.value()
        connection = server._tlsConnection
        calls = []

        class Watch:
            def __getattr__(self, name):
                return getattr(connection, name)

            def recv(self, size):
                calls.append(size)
                return connection.recv(size)
        server._tlsConnection = Watch()
        try:
            server.dataReceived(wire[:-10])
            server.dataReceived(wire[-10:])
        finally:
            server._tlsConnection = connection
        self.assertEqual(calls, [])
        self.assertEqual(b"".join(server.wrappedProtocol.chunks), b"p" * 40_000)

    def test_after_the_handshake_reads_and_writes_skip_pyopenssl_s_wrappers(self):
        # BIO_write and SSL_write straight through the cffi binding: pyOpenSSL's bio_write and send
        # (their checks, in Python) are not called for a read or a write of the link.
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        client.transport.clear()

        def refuse(*args):
            raise AssertionError("pyOpenSSL's wrapper called")
        for side in (client, server):
            for name in ("bio_write", "send", "recv"):
                self.patch(side._tlsConnection, name, refuse)
        for size in (100, 70_000):
            client.write(b"w" * size)
            _compat.flush_tls_buffer(client)
            server.dataReceived(client.transport.value())
            client.transport.clear()
        self.assertEqual(b"".join(server.wrappedProtocol.chunks), b"w" * 70_100)

    def test_the_end_after_data_is_still_the_base_class_s(self):
        # SSL_read's 0 at the peer's close_notify: the data before it is delivered, then the
        # base class's loop reads the end (ZeroReturnError) and shuts the layer down.
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        client.transport.clear()
        client.write(b"q" * 50_000)
        _compat.flush_tls_buffer(client)
        client.loseConnection()
        server.dataReceived(client.transport.value())
        self.assertEqual(b"".join(server.wrappedProtocol.chunks), b"q" * 50_000)
        self.assertTrue(server._lostTLSConnection)

    def test_records_go_out_as_views_only_to_a_write_that_takes_them(self):
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        writes = []

        def takes_views(transport, data):
            writes.append(data)
        takes_views.takes_views = True
        client.transport.clear()
        client.write(b"s" * 70_000)               # StringTransport: bytes, as always
        self.assertGreater(len(client.transport.value()), 70_000)
        client.transport.write = MethodType(takes_views, client.transport)
        client.write(b"t" * 70_000)
        self.assertEqual([type(data) for data in writes], [memoryview])
        # Through a pass-through wrapper (the gateway's ConnectionGate) too; small sends stay bytes.
        socket_side, client.transport = client.transport, policies.ProtocolWrapper(None, None)
        client.transport.transport = socket_side
        client.write(b"u" * 70_000)
        client.write(b"v" * 100)
        _compat.flush_tls_buffer(client)
        self.assertEqual([type(data) for data in writes], [memoryview, memoryview, bytes])
        server.dataReceived(socket_side.value() + b"".join(map(bytes, writes)))
        self.assertEqual(b"".join(server.wrappedProtocol.chunks),
                         b"s" * 70_000 + b"t" * 70_000 + b"u" * 70_000 + b"v" * 100)

    def test_without_the_probe_the_layer_is_twisted_s(self):
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        for side in (client, server):
            side._pg_probe = False
        client.transport.clear()
        SSL._lib.SSL_set_mode(client._tlsConnection._ssl, SSL._lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        client.write(b"r" * 70_000)
        server.dataReceived(client.transport.value())
        self.assertEqual(server.wrappedProtocol.chunks, [b"r" * 16_384] * 4 + [b"r" * 4_464])

    def test_counts_what_the_bios_hold(self):
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        out, inc = client._tlsConnection, server._tlsConnection
        pending = _compat._bio_pending
        self.assertEqual(pending(out._from_ssl, _compat._NULL), 0)
        out.send(b"x" * 20_000)
        wire = out.bio_read(2**18)
        self.assertEqual(pending(out._from_ssl, _compat._NULL), 0)
        out.send(b"y")
        self.assertGreater(pending(out._from_ssl, _compat._NULL), 0)
        inc.bio_write(wire[:100])
        self.assertEqual(pending(inc._into_ssl, _compat._NULL), 100)

    def test_every_record_is_read_however_the_bytes_arrive(self):
        # The read loop stops on an empty incoming BIO and SSL_pending 0 instead of on
        # WantReadError: it must still deliver every record, whole or cut anywhere.
        messages = [b"a", b"b" * 16_384, b"c" * 16_385, b"d" * 40_000, b"e" * 5]
        for cut in (1, 5, 22, 4_000, 16_406, 10**6):
            client, server = handshaken_pair(_compat.BatchedTLSFactory)
            client.transport.clear()
            for message in messages:
                client.write(message)
                _compat.flush_tls_buffer(client)
            wire = client.transport.value()
            reads = []
            server.wrappedProtocol.dataReceived = reads.append
            for start in range(0, len(wire), cut):
                server.dataReceived(wire[start:start + cut])
            self.assertEqual(b"".join(reads), b"".join(messages), cut)
            self.assertEqual(server._tlsConnection.pending(), 0)

    def test_openssl_takes_one_record_at_a_time_from_the_bio(self):
        # What the probe's stop rests on: with read-ahead off (nothing in PipeGate turns it
        # on), a recv takes exactly one record from the memory BIO, so an empty BIO and
        # SSL_pending 0 mean that OpenSSL holds no whole record.
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        out, inc = client._tlsConnection, server._tlsConnection
        records = []
        for size in (10, 5_000, 16_384, 3):
            out.send(b"r" * size)
            records.append(out.bio_read(2**18))
        inc.bio_write(b"".join(records))
        for number, record in enumerate(records):
            held = _compat._bio_pending(inc._into_ssl, _compat._NULL)
            self.assertEqual(held, sum(map(len, records[number:])))
            inc.recv(2**15)
            self.assertEqual(inc.pending(), 0)
            self.assertEqual(_compat._bio_pending(inc._into_ssl, _compat._NULL), held - len(record))

    def test_nothing_to_send_raises_nothing(self):
        client, server = handshaken_pair(_compat.BatchedTLSFactory)
        client.transport.clear()
        calls = []
        connection = client._tlsConnection
        real = connection.bio_read

        class Watch:
            def __getattr__(self, name):
                return getattr(connection, name)

            def bio_read(self, size):
                calls.append(size)
                return real(size)
        client._tlsConnection = Watch()
        try:
            client._flushSendBIO()
            self.assertEqual(calls, [], "an empty send BIO was read (a WantReadError raised)")
            connection.send(b"z")
            client._flushSendBIO()
            self.assertEqual(len(calls), 1)
            self.assertNotEqual(client.transport.value(), b"")
        finally:
            client._tlsConnection = connection


class DeclaredDependencies(unittest.TestCase):

    def test_every_imported_distribution_is_declared(self):
        declared = declared_requirements()
        providers = metadata.packages_distributions()
        missing = []
        for module, files in sorted(imported_top_level(ROOT / "pipegate").items()):
            if module in sys.stdlib_module_names or module == "pipegate":
                continue
            # A namespace shared with our own plugin (twisted.plugins) names us too.
            dists = {_normalize(d) for d in providers.get(module, []) or extension_owners(module)} - {"pipegate"}
            where = ", ".join(sorted(files))
            if not dists:
                missing.append(f"{module} (imported by {where}: no installed distribution)")
            elif not dists & declared.keys():
                missing.append(f"{module} from {' or '.join(sorted(dists))} (imported by {where})")
        self.assertEqual(missing, [], "imported but not declared in pyproject.toml [project] dependencies")

    def test_upper_bounds_where_private_names_are_used(self):
        declared = declared_requirements()
        for name in ("twisted", "pyopenssl", "autobahn"):
            self.assertIn(name, declared)
            self.assertRegex(declared[name], r"<\s*\d", f"{name} needs an upper bound (pipegate/_compat.py)")
            bound = re.search(r"<\s*([\d.]+)", declared[name]).group(1)
            checked = _compat.CHECKED_AGAINST[name]
            self.assertLess(tuple(map(int, checked.split("."))), tuple(map(int, bound.split("."))),
                            f"{name}: _compat.CHECKED_AGAINST {checked} is not below the pin <{bound}")

    def test_setup_cfg_declares_nothing(self):
        # Packaging metadata lives in pyproject.toml only; a second list would drift.
        setup_cfg = (ROOT / "setup.cfg").read_text()
        self.assertNotRegex(setup_cfg, r"(?m)^\s*install_requires\s*=")

# Private names of the three libraries that pipegate uses (every one behind a helper of
# pipegate._compat).  Reached on any object, or named in a string (getattr):
_PRIVATE = frozenset({
    "_HTTP11ClientFactory", "_HTTPChannel__first_line", "_command", "_path", "_version",
    "_receivedHeaderCount", "_receivedHeaderSize", "_transferDecoder", "_savedTimeOut", "_handlingRequest",
    "_abortingCall", "_parsePOSTFormSubmission", "_tempDataLen", "_writeDisconnected", "_dataReceived",
    "_aggregator", "_creatorCallable", "_tlsConnection", "_lostTLSConnection", "_aborted", "_flushSendBIO",
    "_flushReceiveBIO", "_bufferedWrite", "_shutdownTLS", "_tlsShutdownFinished", "_lib", "_ssl",
    "closeHandshakeTimeoutCall", "http_status_line", "current_frame", "inside_message", "autoPingTimeoutCall",
    "_cancelAutoPingTimeoutCall", "_nvx_xormasker", "_shouldShutdown"})
# ...and names that are private only on someone else's object (ours on self): pool._factory.
_PRIVATE_ON_OTHERS = frozenset({"_factory"})


def private_uses(path: Path) -> list[str]:
    """Where C{path} reaches one of the private names above."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if node.attr in _PRIVATE or (node.attr in _PRIVATE_ON_OTHERS and not on_self):
                found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in _PRIVATE:
            found.append(f"{node.lineno}: {node.value!r}")
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in _PRIVATE:
            found.append(f"{node.lineno}: def {node.name}")
        elif isinstance(node, ast.alias) and node.name.split(".")[-1] in _PRIVATE:
            found.append(f"{node.lineno}: import {node.name}")
    return found


class PrivateNamesStayHere(unittest.TestCase):

    def test_only_compat_reaches_private_names(self):
        package = ROOT / "pipegate"
        outside = {}
        for path in sorted(package.rglob("*.py")):
            relative = path.relative_to(package).as_posix()
            if relative == "_compat.py":
                continue
            uses = private_uses(path)
            if uses:
                outside[relative] = uses
        self.assertEqual(outside, {},
                         "private names of Twisted/pyOpenSSL/Autobahn outside pipegate/_compat.py")

    def test_the_scan_sees_them(self):
        self.assertIn("5: .closeHandshakeTimeoutCall", private_uses(_write_sample(self)))


def _write_sample(testcase) -> Path:
    path = Path(testcase.mktemp() + ".py")
    path.write_text("def f(protocol):\n    pass\n\n\n    protocol.closeHandshakeTimeoutCall = None\n")
    return path
