"""
Connecting a protocol to a TCP service: an address literal within the turn that asks for
it, and with the socket registered with the reactor once.

Why not C{reactor.connectTCP}: Twisted's C{tcp.Client} starts connecting a reactor turn
later (a C{callLater(0)} for its resolution step, through a Deferred, even for an address
literal), asks for the socket's error before its first C{connect}, registers the socket
for reading and writing (two C{epoll_ctl}), and once it is writable asks for the error and
connects again, unregisters it for both and registers it for reading (three more): at the
provider, for every tunnelled connection, a C{Connector}, a C{Deferred}, two delayed calls
and nine system calls around the C{connect}.  On a loopback connection the kernel has
finished the handshake by the time C{connect} returns (it runs the peer's side in the same
system call), so a second C{connect} says it is connected: the protocol is connected in the
same turn, the socket is registered once (for reading), and no timeout is scheduled.
Otherwise (a remote service, a full backlog) the socket is registered for writing only,
and the reactor's write event (or its error event) finishes the connect as Twisted's
would.  Failures are the same errors as Twisted's connector gives (C{getConnectError} of
the C{connect} error, C{TimeoutError}, C{ConnectBindError}), so an OPEN refused says the
same.
"""

from __future__ import annotations

import functools
import socket
from errno import EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from os import strerror

from twisted.internet import address, error, main, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory
from twisted.python import log
from twisted.python.failure import Failure

from pipegate._compat import close_without_shutdown, write_closed
from pipegate.sockets import connect_protocol, stream_endpoint

_PENDING = frozenset({EINPROGRESS, EALREADY, EWOULDBLOCK})
_CONNECTED = frozenset({0, EISCONN})
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_NAME_INFO = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
# What a close after a half-close tells the protocol, made once (as Twisted's reactor does for the
# ends it reads): see PromptClose.
_CLOSED = Failure(main.CONNECTION_DONE)


@functools.lru_cache(maxsize=256)   # once per connection; a provider has a few services
def _literal(host: str, port: int) -> tuple[int, tuple] | None:
    """(address family, socket address) of an address literal, as Twisted's connector resolves it; else None."""
    if isIPAddress(host):
        return socket.AF_INET, (host, port)
    if isIPv6Address(host):   # (a scope, "%eth0", becomes its number)
        flow, scope = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_STREAM, 0, _NUMERIC)[0][4][2:]
        return socket.AF_INET6, (host, port, flow, scope)
    return None


def connect_stream(reactor, host: str, port: int, timeout: float, protocol, failed) -> None:
    """
    Connect C{protocol} to C{host}:C{port}: its C{connectionMade} says it is connected;
    if the connection cannot be made, C{failed(failure)} is called instead.  Either may be
    called before this returns.

    An address literal is connected by L{StreamClient}: no connector, no endpoint, no
    protocol wrapper between the socket and C{protocol}, no per-connection factory log
    lines (on a reactor that is not a C{PosixReactorBase}, by its C{connectTCP}).  A host
    name goes through L{pipegate.sockets.stream_endpoint} (resolution, happy eyeballs).
    """
    literal = _literal(host, port)
    if literal is None:
        connect_protocol(stream_endpoint(reactor, host, port, timeout), protocol).addErrback(failed)
        return
    if not isinstance(reactor, PosixReactorBase):   # (IOCP; a test's memory reactor): its connector
        reactor.connectTCP(host, port, _DirectConnect(protocol, failed), timeout=timeout)
        return
    family, peer = literal
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:   # (EMFILE and the like: what Twisted's connector says)
        failed(Failure(error.ConnectBindError(e.args[0], e.args[1])))
        return
    StreamClient(sock, protocol, reactor, peer).connect(timeout, failed)


class _DirectConnect(ClientFactory):
    """L{connect_stream}'s factory for C{connectTCP}: the connector gets C{protocol} itself, or tells C{failed}."""

    noisy = False

    def __init__(self, protocol, failed) -> None:
        self._protocol = protocol
        self._failed = failed

    def buildProtocol(self, addr):
        # Handed over once: the factory (which the Connector keeps) then holds neither the
        # protocol nor the failure callback's closure, and no cycle through them remains.
        protocol, self._protocol, self._failed = self._protocol, None, None
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector, reason) -> None:
        if self._failed is not None:   # (None once connected: buildProtocol)
            self._failed(reason)

    def clientConnectionLost(self, connector, reason) -> None:
        # The Connector and its Client refer to each other (connector.transport,
        # transport.connector); Twisted leaves that cycle to the garbage collector.
        connector.transport = None


def _address(family: int, sockaddr: tuple):
    """The Twisted address of a socket address (an IPv6 host with its scope, as Twisted's C{tcp} gives it)."""
    if family == socket.AF_INET6:
        host = socket.getnameinfo(sockaddr, _NAME_INFO)[0]
        return address.IPv6Address("TCP", host, *sockaddr[1:])
    return address.IPv4Address("TCP", *sockaddr[:2])


class PromptClose:
    """
    Mixed into a C{tcp.Connection} subclass (first): a close of a socket shut for writing
    (every tunnelled connection's end: L{pipegate.sockets.close_now}), which
    C{FileDescriptor.loseConnection} does at once, hands the protocol a C{ConnectionDone}
    failure made once instead of a new one each time (its making and C{connectionLost}'s
    check of its type cost about 20 Python calls and an AttributeError raised and caught).
    """

    def loseConnection(self) -> None:
        if self.connected and not self.disconnecting and not self.TLS and write_closed(self):
            self.stopReading()
            self.stopWriting()
            self.connectionLost(_CLOSED)
        else:
            super().loseConnection()


@close_without_shutdown
class StreamClient(PromptClose, tcp.Connection):
    """
    The client side of a TCP connection, connected by L{connect} (see the module's doc).
    Once connected, a C{tcp.Connection} like Twisted's own client's, with its
    C{getHost} and C{getPeer}; its close is a C{close} alone, without the C{shutdown}
    before it that fails after a half-close from both ends, and a L{PromptClose}.
    """

    #: Whether L{connect} asks again at once whether the connect is done (tests turn it off
    #: to take the path of a connect the kernel has not finished).
    ask_at_once = True
    _failed = None
    _timer = None

    def __init__(self, sock, protocol, reactor, peer: tuple) -> None:
        tcp.Connection.__init__(self, sock, protocol, reactor)   # (makes it non-blocking)
        self._peer = peer

    def connect(self, timeout: float, failed) -> None:
        """Start connecting; C{failed(failure)} if it cannot be made, within C{timeout} seconds."""
        self._failed = failed
        result = self._connect_ex()
        if result in _PENDING and self.ask_at_once:
            result = self._connect_ex()   # (a loopback connection is made by now)
        if result in _PENDING:
            self.startWriting()
            self._timer = self.reactor.callLater(timeout, self._fail, error.TimeoutError())
        elif result not in _CONNECTED:
            self._fail(error.getConnectError((result, strerror(result))))
        else:
            self._failed = None
            self.connected = 1
            self.startReading()
            try:
                self.protocol.makeConnection(self)
            except Exception:
                # (as the reactor would have, had this been one of its events)
                why = Failure()
                log.err(why)
                self.stopReading()
                self.connectionLost(why)

    def _connect_ex(self) -> int:
        """connect(2) again: 0 or EISCONN once connected, the pending error if it failed."""
        try:
            return self.socket.connect_ex(self._peer)
        except OSError as e:
            return e.args[0]

    def doWrite(self):
        if self.connected:
            return tcp.Connection.doWrite(self)
        result = self._connect_ex()   # writable while connecting: made, or failed
        if result in _CONNECTED:
            self._failed = None
            self._timer, timer = None, self._timer
            timer.cancel()
            self.connected = 1
            self.startReading()
            self.stopWriting()
            self.protocol.makeConnection(self)
        elif result not in _PENDING:
            self._fail(error.getConnectError((result, strerror(result))))
        return None

    def _fail(self, reason: Exception) -> None:
        failed, self._failed = self._failed, None
        if failed is None:
            return
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.stopWriting()
        self.disconnected = 1
        self.socket.close()
        del self.protocol   # (never connected: Twisted's connector does not tell it either)
        failed(Failure(reason))

    def connectionLost(self, reason) -> None:
        if self.connected:
            tcp.Connection.connectionLost(self, reason)
            return
        # The reactor saw an error or a hang-up while connecting (a refusal, no route):
        # the socket's error says which, as Twisted's connector reads it.
        if self._failed is not None:
            code = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._fail(error.getConnectError((code, strerror(code))) if code
                       else error.ConnectError(string=reason))

    def getHost(self):
        return _address(self.socket.family, self.socket.getsockname())

    def getPeer(self):
        return _address(socket.AF_INET6 if len(self._peer) == 4 else socket.AF_INET, self._peer)

    def logPrefix(self) -> str:
        protocol = getattr(self, "protocol", None)
        prefix = protocol.logPrefix() if hasattr(protocol, "logPrefix") else type(protocol).__name__
        return f"{prefix},client"
