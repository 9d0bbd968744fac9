"""
Every use of a private name of Twisted, pyOpenSSL or Autobahn: nothing else in pipegate/ reaches one.

Each entry says why no public API does the job and the releases it was checked against (all: Twisted
26.10.0, pyOpenSSL 26.4.0, Autobahn 26.11.1, Python 3.11); tests/test_compat.py has a guard test per entry
that fails, naming the private name, when an upgrade changes it.  pyproject.toml's upper bounds
(twisted<26.11, pyopenssl<26.5, autobahn<26.12) are the releases after these: raise one only after
tests.test_compat (and the suite) pass on the new release.  A new use goes here, with its reason and guard.
"""

from __future__ import annotations

from types import MethodType

from OpenSSL import SSL
from OpenSSL.SSL import Error, WantReadError
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols import tls as _twisted_tls
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.application.internet import ClientService
from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogPublisher
from twisted.python.failure import Failure

_log = Logger()

CHECKED_AGAINST = {"twisted": "26.10.0", "pyopenssl": "26.4.0", "autobahn": "26.11.1"}


# -- Twisted's TLS layer (twisted.protocols.tls) and pyOpenSSL ------------------------------
# Why: the stock layer feeds OpenSSL 16 KiB per SSL_write, writes the send BIO to the socket after each
# and hands every record to the protocol on its own: five of each per 64 KiB mux DATA frame.  Against
# the stock TLSMemoryBIOFactory (benchmarks/README.md "TLS layer of mux links"): gateway + provider
# 9-19 % less CPU per GB (iperf3, all four configurations); small frames the same.  No public hook
# batches the record work: this overrides private methods of TLSMemoryBIOProtocol.
_RECV = 2**15   # more than the plaintext of one TLS record (16 KiB); a read or a send of less goes as bytes


class BatchedTLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS layer, with the record work batched per write and per read.  A write is one
    C{SSL_write} (L{whole_writes}; after the handshake, without pyOpenSSL's wrapper), the send BIO is
    drained into one transport write (from 32 KiB a memoryview, if the transport's C{write} has a true
    C{takes_views}: L{pipegate.sockets.eager_writes}), a read goes into the receive BIO (after the
    handshake, without pyOpenSSL's wrapper) and its plaintext is delivered in one C{dataReceived}
    (L{_pg_read}: from 32 KiB as a read-only memoryview that nothing reuses).  Handshake, errors, close
    and producers are the base class's; without the BIO probe (below), it is the base class.

    Private names used (Twisted 26.10.0, twisted.protocols.tls.TLSMemoryBIOProtocol): overrides and calls
    C{_write(bytes)}, C{_flushSendBIO()}, C{_flushReceiveBIO()}; calls C{_bufferedWrite},
    C{_tlsShutdownFinished}; reads C{_tlsConnection}, C{_lostTLSConnection}, C{_aborted},
    C{_handshakeDone}, C{_appSendBuffer}.  The base class must still route its writes, reads, handshake
    and shutdown through the overridden methods.  Guard: tests.test_compat.TLSLayer.
    """

    _pg_probe = False   # whether the memory BIOs can be asked what they hold (probe_bios, below)

    def dataReceived(self, data):
        if type(data) is _bytes and self._handshakeDone and self._pg_probe and not self._appSendBuffer \
                and not self._lostTLSConnection \
                and _BIO_write(self._tlsConnection._into_ssl, data, len(data)) == len(data):
            self._flushReceiveBIO()   # (a memory BIO takes all or, failing, nothing: then the base class's)
        else:
            TLSMemoryBIOProtocol.dataReceived(self, data)

    def _write(self, bytes):
        if not self._pg_probe:
            return TLSMemoryBIOProtocol._write(self, bytes)
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        data = memoryview(bytes)
        if type(bytes) is _bytes and self._handshakeDone:   # (on a failure pyOpenSSL's send retries, raises)
            data = data[max(0, _SSL_write(connection._ssl, bytes, len(bytes))):]
        while data:
            try:
                sent = connection.send(data)
            except WantReadError:
                self._bufferedWrite(data.tobytes())
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                return
            data = data[sent:]
        self._flushSendBIO()

    def _flushSendBIO(self):
        if not self._pg_probe:
            return TLSMemoryBIOProtocol._flushSendBIO(self)
        connection = self._tlsConnection
        size = _bio_pending(connection._from_ssl, _NULL)
        if not size:   # (asked, instead of a bio_read raising WantReadError when there is nothing to send)
            return
        write = self.transport.write
        while size >= _RECV and getattr(write, "__func__", None) is ProtocolWrapper.write:   # (pass-through)
            write = write.__self__.transport.write
        if size < _RECV or not getattr(getattr(write, "__func__", None), "takes_views", False):
            return self.transport.write(connection.bio_read(size))
        buffer = _new_buffer("char[]", size)   # (pipegate.sockets' eager write: no copy into bytes)
        read = _lib.BIO_read(connection._from_ssl, buffer, size)
        self.transport.write(memoryview(_ffi.buffer(buffer, max(0, read))))

    def _flushReceiveBIO(self):
        if self._pg_probe and not self._lostTLSConnection and self._pg_read(self._tlsConnection):
            self._flushSendBIO()
        else:   # the base class's loop: one record per recv, and recv's errors, the end and their handling
            TLSMemoryBIOProtocol._flushReceiveBIO(self)

    def _pg_read(self, connection):
        # Every record OpenSSL can decrypt now, each SSL_read straight into one fresh buffer, until WANT_READ
        # (read-ahead is off: no whole record left; plaintext is never longer than its records: SIZE holds
        # all).  True: all read; False: an error, the end, or a full buffer, for the base class's loop.
        ssl = connection._ssl
        size = _bio_pending(connection._into_ssl, _NULL) + _lib.SSL_pending(ssl) + _RECV
        buffer, got = _new_buffer("char[]", size), 0
        read = _SSL_read(ssl, buffer, size)
        while read > 0 and got + read < size:
            got += read
            read = _SSL_read(ssl, buffer + got, size - got)
        got += max(read, 0)
        if got and not self._aborted:
            data = _ffi.buffer(buffer, got)
            self.wrappedProtocol.dataReceived(data[:] if got < _RECV else memoryview(data).toreadonly())
        return read <= 0 and _lib.SSL_get_error(ssl, read) == _lib.SSL_ERROR_WANT_READ


def whole_writes(connection: SSL.Connection) -> None:
    """
    Let one C{SSL_write} take a whole buffer: pyOpenSSL turns on C{SSL_MODE_ENABLE_PARTIAL_WRITE} (one
    16 KiB record per call), and no public call clears a mode on one connection (pyOpenSSL 26.4.0:
    C{Context.set_mode} cannot clear).  Uses pyOpenSSL's private C{SSL._lib} (the cffi binding) and
    C{Connection._ssl}; without them writes stay partial (still correct: the loop in
    L{BatchedTLSProtocol._write}).  Guard: tests.test_compat.PyOpenSSL.
    """
    if hasattr(_lib, "SSL_clear_mode") and getattr(connection, "_ssl", None) is not None:
        _lib.SSL_clear_mode(connection._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)


class BatchedTLSFactory(TLSMemoryBIOFactory):
    """
    C{TLSMemoryBIOFactory} making L{BatchedTLSProtocol}s whose connections have L{whole_writes}: no
    public hook on the C{SSL.Connection} made per protocol, so this wraps the private C{_creatorCallable}
    (Twisted 26.10.0; called once per protocol from C{TLSMemoryBIOProtocol.makeConnection}).  Guard:
    tests.test_compat.TLSLayer.test_factory_creates_connections_through_creator_callable.
    """

    protocol = BatchedTLSProtocol

    def __init__(self, contextFactory, isClient: bool, wrappedFactory, clock=None) -> None:
        if clock is None:   # (the public clock parameter: see TurnEndClock, at the end of this module)
            from twisted.internet import reactor
            clock = TurnEndClock(reactor)
        super().__init__(contextFactory, isClient, wrappedFactory, clock)
        create = self._creatorCallable

        def creator(protocol):
            connection = create(protocol)
            protocol._pg_probe = probe_bios(connection)
            if protocol._pg_probe:   # (else the layer is Twisted's, which writes one record per SSL_write)
                whole_writes(connection)
            return connection
        self._creatorCallable = creator


def flush_tls_buffer(transport) -> None:
    """
    Write out what Twisted's buffering TLS layer (C{BufferingTLSTransport}) holds for the reactor turn's
    end, if C{transport} is one (nothing else is asked: a miss through a C{ProtocolWrapper}'s
    C{__getattr__} raises and catches an AttributeError).  Small writes wait in its private
    C{_aggregator} (Twisted 26.10.0) until a C{callLater(0)}; the public C{loseConnection} flushes it but
    also closes.  Guard: tests.test_compat.TLSLayer.test_buffering_layer_aggregates_in_aggregator.
    """
    if isinstance(transport, BufferingTLSTransport):
        aggregator = getattr(transport, "_aggregator", None)
        if aggregator is not None:
            aggregator.flush()


# -- Twisted's TCP transport (twisted.internet.tcp.Connection, abstract.FileDescriptor) ------
# Why: see pipegate/sockets.py (eager_writes, bounded_reads): per-write epoll_ctl calls and 4 MiB reads
# cost the links most of their per-message time; no public API sends at once or bounds the read size
# separately from bufferSize.

def tcp_data_received(transport):
    """
    The bound C{_dataReceived(data)} of a C{twisted.internet.tcp.Connection} (what its C{doRead} calls
    with what C{recv} returned), or None for another transport: L{pipegate.sockets.bounded_reads}'s
    C{doRead} reads a fixed size and calls it.  Private (Twisted 26.10.0).  Guard:
    tests.test_compat.TCPTransport.test_connection_reads_through_data_received.
    """
    return getattr(transport, "_dataReceived", None)


def has_write_buffers(transport) -> bool:
    """
    Whether C{transport} keeps Twisted's C{FileDescriptor} write buffers that L{nothing_queued} and
    L{write_closed} read (and is a TCP connection: C{TLS} is C{tcp.Connection}'s startTLS flag).
    """
    return hasattr(transport, "_tempDataLen") and hasattr(transport, "TLS")


def nothing_queued(transport) -> bool:
    """
    Whether the write buffers of C{transport} (a C{FileDescriptor}) are empty: reads C{_tempDataLen}
    (private), C{dataBuffer} and C{offset} (undocumented) of C{twisted.internet.abstract.FileDescriptor}
    (Twisted 26.10.0).  Guard: tests.test_compat.TCPTransport.test_file_descriptor_write_buffers.
    """
    return not transport._tempDataLen and transport.offset >= len(transport.dataBuffer)


def writable_now(t) -> bool:
    """Whether bytes for C{t} (a C{tcp.Connection}) may go to its socket now: L{nothing_queued}, open, not
    L{write_closed}, no startTLS, in one call (Twisted 26.10.0).  Guard: TCPTransport.test_writable_now."""
    return (not t._tempDataLen and t.offset >= len(t.dataBuffer) and t.connected and not t.disconnecting
            and not t._writeDisconnected and not t.TLS)


def write_closed(transport, mark: bool = False) -> bool:
    """
    Whether the write side of C{transport} (a C{FileDescriptor}) is shut down (C{loseWriteConnection} done):
    private C{_writeDisconnected} (Twisted 26.10.0).  C{mark}: set it first (shut down directly: then
    C{loseConnection} closes at once).  Guard: tests.test_compat.TCPTransport.test_write_disconnected_flag.
    """
    if mark:
        transport._writeDisconnected = True
    return transport._writeDisconnected


def close_without_shutdown(connection_class):
    """
    Class decorator: the orderly close of a C{tcp.Connection} subclass's socket is a C{close} alone.
    C{_SocketCloser._closeSocket} calls C{shutdown(SHUT_RDWR)} first unless its private class attribute
    C{_shouldShutdown} (Twisted 26.10.0) is false; after both ends' FINs that fails (C{ENOTCONN}, an
    OSError raised and caught): at every close of a provider's service connection.  Not needed, as
    Twisted's comment there says: no other process holds the socket (close-on-exec), so C{close} sends the
    same FIN (or reset, for unread data).  Guard: tests.test_compat.TCPTransport.test_should_shutdown.
    """
    connection_class._shouldShutdown = False
    return connection_class


# -- twisted.web.client ---------------------------------------------------------------------

def quiet_http11_client_factory(quiescentCallback, metadata):
    """
    The factory C{HTTPConnectionPool} builds per new connection (Twisted's private C{_HTTP11ClientFactory})
    without the "Starting factory" / "Stopping factory" lines it logs for each: the connector opens one per
    request to the local app, the Docker client one per Engine request.  The pool has no public way to
    choose the factory: L{quiet_pool} sets its private C{_factory}, which it calls with C{(quiescentCallback,
    metadata)} (Twisted 26.10.0, C{HTTPConnectionPool._newConnection}).  (Imported here, not at the top:
    the port plane does not load twisted.web.)  Guard: tests.test_compat.WebClient.
    """
    from twisted.web.client import _HTTP11ClientFactory
    factory = _HTTP11ClientFactory(quiescentCallback, metadata)
    factory.noisy = False
    return factory


def quiet_pool(pool):
    """Make C{pool} (an C{HTTPConnectionPool}) build quiet factories; returns C{pool}."""
    pool._factory = quiet_http11_client_factory
    return pool


# -- twisted.application.internet.ClientService ---------------------------------------------

class QuietClientService(ClientService):
    """
    A C{ClientService} without its "Scheduling retry 1 to connect <endpoint> in 0.82... seconds." line after
    every failed attempt (PipeGate's dialers log the reason, in the user's words, and the next delay).  It
    logs through its private class attribute C{_log}, handed to its state machine by C{__init__} (Twisted
    26.10.0); its warnings and errors still pass.  Guard: tests.test_compat.ClientServiceLog.
    """

    _log = Logger(observer=FilteringLogObserver(globalLogPublisher, [LogLevelFilterPredicate(LogLevel.warn)]))


# -- twisted.web.http.HTTPChannel (the relay's early start of public requests) --------------
# Why: the relay starts forwarding a public request when its headers are complete and streams its body
# (HTTPChannel only calls requestReceived after the whole body), and keeps the caller's raw request
# target byte-exact.  HTTPChannel has no public hook for either, so the relay's channel reads and resets
# its parser state (Twisted 26.10.0: HTTPChannel.lineReceived and allContentReceived).  Guard:
# tests.test_compat.HTTPChannelState.

def first_line_pending(channel) -> bool:
    """Whether C{channel}'s next line is a request line (name-mangled C{__first_line})."""
    return bool(channel._HTTPChannel__first_line)


def parsed_request_line(channel) -> tuple[bytes, bytes, bytes]:
    """The C{(command, path, version)} C{channel} parsed from the current request line."""
    return channel._command, channel._path, channel._version


def request_path(channel) -> bytes | None:
    """The request target C{channel} parsed from the current request line, if any."""
    return getattr(channel, "_path", None)


def set_request_path(channel, path: bytes) -> None:
    """Replace the request target C{channel} will hand to its request."""
    channel._path = path


def reset_request_parser(channel) -> None:
    """Reset C{channel}'s parser for the next request, as C{allContentReceived} does before C{requestReceived}."""
    channel.length = 0
    channel._receivedHeaderCount = 0
    channel._receivedHeaderSize = 0
    channel._HTTPChannel__first_line = 1
    channel._transferDecoder = None
    del channel._command, channel._path, channel._version


def hold_for_request(channel) -> None:
    """What C{allContentReceived} does next: hold the idle timeout (C{_savedTimeOut}), queue pipelined input."""
    if channel.timeOut:
        channel._savedTimeOut = channel.setTimeout(None)
    channel._handlingRequest = True


def abort_pending(channel) -> bool:
    """Whether C{channel} has scheduled its abort after a timeout (a second one would leak the first)."""
    return channel._abortingCall is not None


# -- Autobahn (autobahn.websocket.protocol.WebSocketProtocol) -------------------------------

def cancel_close_timer(protocol) -> None:
    """
    Autobahn leaves its close-handshake timer pending when the TCP connection goes first; cancel it so a
    closed link leaves nothing scheduled.  C{closeHandshakeTimeoutCall}: an undocumented attribute of
    Autobahn's C{WebSocketProtocol} (26.11.1: set in C{sendCloseFrame}, cancelled only when the peer's
    close frame arrives); no public way to cancel it.  Guard: tests.test_compat.AutobahnState.
    """
    call = getattr(protocol, "closeHandshakeTimeoutCall", None)
    protocol.closeHandshakeTimeoutCall = None
    if call is not None:
        try:
            call.cancel()
        except (AttributeError, ValueError):
            pass  # already fired or cancelled


def handshake_status_line(protocol) -> str:
    """
    The status line of the server's answer to a WebSocket client's handshake (C{"HTTP/1.1 409 Conflict"}),
    or C{""}.  C{http_status_line}: an undocumented attribute of Autobahn's C{WebSocketClientProtocol}
    (26.11.1, set in C{processHandshake}); C{failHandshake(reason)} gets only Autobahn's text.  Guard:
    tests.test_compat.AutobahnState.
    """
    return getattr(protocol, "http_status_line", "") or ""


def autobahn_between_frames(protocol) -> bool:
    """
    Autobahn holds no part of a received frame or message: a link's own frame reader
    (L{pipegate.http.pipe.FrameLink}) may take over the bytes that follow.

    C{data} (the receive buffer), C{current_frame} and C{inside_message} are undocumented attributes of
    Autobahn's C{WebSocketProtocol} (Autobahn 26.11.1: set in C{_connectionMade}, at the opening
    handshake's end, in C{processData}, C{onFrameBegin} and C{onFrameEnd}); the public API has no way to
    ask whether the reader is between messages.  Guard: tests.test_compat.AutobahnState.
    """
    return not protocol.data and protocol.current_frame is None and not protocol.inside_message


def autobahn_traffic_seen(protocol) -> None:
    """
    What Autobahn does with each data frame it reads itself: with C{autoPingRestartOnAnyTraffic} (its
    default), incoming data stands in for a pong and cancels a pending ping timeout, so a link busy with
    data is not dropped while the pong waits behind it.

    C{autoPingTimeoutCall} (undocumented attribute) and C{_cancelAutoPingTimeoutCall} (private method)
    of Autobahn's C{WebSocketProtocol} (Autobahn 26.11.1, called from C{onFrameEnd}).  Guard:
    tests.test_compat.AutobahnState.
    """
    if protocol.autoPingTimeoutCall and protocol.autoPingRestartOnAnyTraffic:
        protocol._cancelAutoPingTimeoutCall()


# -- Autobahn's compiled XOR masker ----------------------------------------------------------
# Why: the links mask and unmask their own data frames (pipegate.http.pipe).  Autobahn's public maskers
# (autobahn.websocket.xormasker) come from its NVX wrappers, which parse C declarations with pycparser
# when imported: about 1.2 MiB of RSS in every relay and connector, avoided by AUTOBAHN_USE_NVX=0
# (Autobahn then masks its own few frames, pings and closes, in Python).  The compiled module the
# wrappers load, C{_nvx_xormasker}, imports on its own without parsing; it is undocumented (Autobahn
# 26.11.1: built by C{autobahn/nvx/_xormasker.py}; its functions are what C{XorMaskerNvx} calls).
# Without it (no NVX build) the public masker serves.  Guard: tests.test_compat.AutobahnMasker.
try:
    from _nvx_xormasker import ffi as _nvx_ffi, lib as _nvx_lib
except ImportError:  # pragma: no cover - Autobahn built without its native extensions
    _nvx_ffi = _nvx_lib = None

_NVX_SSE2 = 2   # C{nvx_xormask_set_impl}'s number for SSE2 (Autobahn's XOR_MASKER_SSE2)


def xor_mask(mask: bytes, payload: bytes) -> bytes:
    """C{payload} XORed with the 4-byte C{mask} repeated (RFC 6455 section 5.3), in C."""
    if _nvx_lib is None:
        from autobahn.websocket.xormasker import create_xor_masker
        return create_xor_masker(mask, len(payload)).process(payload)
    key = _nvx_ffi.new("uint8_t[4]", mask)
    masker = _nvx_lib.nvx_xormask_new(key)
    try:
        _nvx_lib.nvx_xormask_set_impl(masker, _NVX_SSE2)
        data = bytearray(payload)
        _nvx_lib.nvx_xormask_process(masker, _nvx_ffi.from_buffer(data), len(data))
    finally:
        _nvx_lib.nvx_xormask_free(masker)
    return bytes(data)


# -- Twisted's buffering TLS layer: a write that goes now, without its flush call ------------
# Why: BufferingTLSTransport.write hands every write to its private _AggregateSmallWrites, which
# schedules a callLater(0) to flush the turn's writes.  A mux link sends its control frames (OPEN,
# OPEN_OK, FIN, WINDOW, ...) at once anyway (send_now flushes the aggregator), so each still made a
# DelayedCall, pushed on the reactor's heap and popped a turn later to flush nothing: two or three per
# tunnelled connection in each of gateway and provider.  No public API writes through the layer without
# it.  Reads the layer's private C{_aggregator} and its private C{_buffer} (Twisted 26.10.0,
# twisted.protocols.tls), calls the aggregator's C{flush} and C{TLSMemoryBIOProtocol.write}.  Guard:
# tests.test_compat.WriteNow.

# (None if a release renames it: then write_now falls back to the layer's own write)
_AggregateSmallWrites = getattr(_twisted_tls, "_AggregateSmallWrites", None)


def _tls_write_now(layer, data: bytes) -> None:
    aggregator = layer._aggregator
    if type(aggregator) is not _AggregateSmallWrites:
        return   # the layer's connection is lost (its _NullAggregator drops writes)
    buffer = aggregator._buffer
    if buffer:   # what was written before goes first, in the same record batch and send
        buffer.append(data)
        aggregator.flush()
    else:
        TLSMemoryBIOProtocol.write(layer, data)


def write_now(transport):
    """
    A callable writing its bytes to C{transport} at once: through a buffering TLS layer
    (C{BufferingTLSTransport}), together with what that layer holds for the turn's end (one C{SSL_write}
    and one transport write for both) and without scheduling its flush; any other transport's own
    C{write}.
    """
    if _AggregateSmallWrites is not None and isinstance(transport, BufferingTLSTransport) and isinstance(
            getattr(transport, "_aggregator", None), _AggregateSmallWrites):
        return MethodType(_tls_write_now, transport)
    return lambda data: transport.write(data)


# -- Twisted's epoll reactor: I/O events dispatched without the legacy log context ----------
# Why: EPollReactor.doPoll wraps every I/O event in twisted.python.log.callWithLogger (logPrefix(), a copy
# and update of the legacy log context dict, a push and pop on the context tracker: about 13 Python calls
# per event) for the "system" field of legacy log.msg/log.err lines, which PipeGate (twisted.logger) does
# not write; a gateway or provider handles 5-6 events per tunnelled connection, 1-2 per small message.
# No public API chooses how the reactor dispatches.  lean_dispatch gives one EPollReactor a doIteration
# that is doPoll's loop with a try/except in place of callWithLogger (an exception escaping an event is
# still logged, the loop goes on; legacy lines logged inside an event say system "-"), a read event alone
# handled inline as _doReadOrWrite's read branch (its call and class-attribute reads: ~1,700 instructions
# an event).  Private (Twisted 26.10.0, doPoll, posixbase._PollLikeMixin): the reactor's _poller,
# _selectables, _POLL_IN, _doReadOrWrite, _disconnectSelectable.  Guard: tests.test_compat.LeanDispatch.
# The loop then runs the calls queued for the turn's end (TurnEndClock): the links' TLS layers flush small
# writes there, not in a callLater(0) a turn (public: TLSMemoryBIOFactory's clock, used by its aggregator).

class _TurnEndCall:
    """A call queued for the end of the reactor's current turn (see L{TurnEndClock})."""

    __slots__ = ("func", "args", "pending")

    def __init__(self, func, args) -> None:
        self.func, self.args, self.pending = func, args, True

    def active(self) -> bool:
        return self.pending

    def cancel(self) -> None:
        self.pending = False


class _LeanPoll:
    """One EPollReactor's C{doIteration}: doPoll's loop without callWithLogger, then TurnEndClock's calls."""

    __slots__ = ("reactor", "turn_end")

    def __init__(self, reactor) -> None:
        self.reactor, self.turn_end = reactor, []

    def __call__(self, timeout):
        if self.turn_end:
            # Queued outside the loop or by a timed call: run now, do not sleep (they may add timed calls).
            self._end_turn()
            timeout = 0
        elif timeout is None:
            timeout = -1   # wait indefinitely
        reactor = self.reactor
        selectables = reactor._selectables
        try:
            events = reactor._poller.poll(timeout, len(selectables))
        except InterruptedError:   # (an OSError with errno EINTR, as doPoll checks)
            return
        dispatch, disconnect, read = reactor._doReadOrWrite, reactor._disconnectSelectable, reactor._POLL_IN
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    if event != read or selectable.fileno() == -1:
                        dispatch(selectable, fd, event)
                        continue
                    try:   # (_doReadOrWrite's read: see the section's comment)
                        why = selectable.doRead()
                    except BaseException as e:   # (logged, and the selectable disconnected, as there)
                        why = e
                        _log.failure("Unhandled error reading {selectable!r}", selectable=selectable)
                    if why:
                        disconnect(selectable, why, True)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    _log.failure("Unhandled error in an I/O event of {selectable!r}", selectable=selectable)
        if self.turn_end:
            self._end_turn()

    def _end_turn(self) -> None:
        while self.turn_end:
            calls, self.turn_end = self.turn_end, []
            for index, call in enumerate(calls):
                if call.pending:
                    call.pending = False
                    try:
                        call.func(*call.args)
                    except KeyboardInterrupt:
                        self.turn_end[:0] = calls[index + 1:]   # the rest still runs (a flush each)
                        raise
                    except BaseException:
                        _log.failure("Unhandled error in a call at the turn's end: {func!r}", func=call.func)


def lean_dispatch(reactor) -> bool:
    """
    Make C{reactor}, if it is Twisted's C{EPollReactor} with its own C{doPoll}, dispatch I/O events
    without the legacy log context (see above).  Returns whether it does.  Idempotent.
    """
    from twisted.internet.epollreactor import EPollReactor
    if not isinstance(reactor, EPollReactor) or type(reactor).doPoll is not EPollReactor.doPoll:
        return False
    names = ("_poller", "_selectables", "_doReadOrWrite", "_disconnectSelectable", "_POLL_IN")
    if not all(hasattr(reactor, name) for name in names):
        return False
    if type(reactor.doIteration) is not _LeanPoll:
        reactor.doIteration = _LeanPoll(reactor)
    return True


class TurnEndClock:
    """
    The clock of the links' TLS layers (L{BatchedTLSFactory}): C{callLater(0, f)}, which Twisted's small-write
    aggregator makes once per turn that writes, runs C{f} when the reactor's current turn has handled its
    I/O events, from a plain list, if the reactor dispatches with L{lean_dispatch}: no DelayedCall made,
    pushed on the reactor's heap and popped (about 3,000 instructions).  Anything else goes to the reactor.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor

    def seconds(self) -> float:
        return self.reactor.seconds()

    def callLater(self, delay, func, *args, **kw):
        poll = getattr(self.reactor, "doIteration", None)
        if delay == 0 and not kw and type(poll) is _LeanPoll:
            call = _TurnEndCall(func, args)
            poll.turn_end.append(call)
            return call
        return self.reactor.callLater(delay, func, *args, **kw)


# -- pyOpenSSL: what the memory BIOs hold, records read into a buffer of ours, calls without wrappers --
# Why: pyOpenSSL's recv, bio_read and bio_write copy through buffers of their own and check errors in
# Python per call, and raise WantReadError on an empty BIO (2.2 and 1.1 us; BatchedTLSProtocol met it
# twice per link read).  No public call says what a memory BIO holds or reads into the caller's memory:
# this calls OpenSSL's BIO_get_mem_data (NULL pointer: the byte count), SSL_pending, SSL_read, SSL_write,
# SSL_get_error, BIO_read and BIO_write through pyOpenSSL's private cffi binding C{SSL._lib} / C{SSL._ffi}
# (its allocator, without zeroing), on the connection's private C{_ssl}, C{_into_ssl} and C{_from_ssl}
# (pyOpenSSL 26.4.0, cryptography 50.0.2); without them the layer is Twisted's.  Bulk TCP: 13-20 %, then
# 4-7 % fewer instructions per MB (benchmarks/README.md, "Bulk TCP: records read into one buffer", "Bulk
# TCP: fewer link reads, no pyOpenSSL wrappers").  Guard: tests.test_compat.BIOProbe.
_lib, _ffi = getattr(SSL, "_lib", None), getattr(SSL, "_ffi", None)
_bio_pending, _NULL = getattr(_lib, "BIO_get_mem_data", None), getattr(_ffi, "NULL", None)
_SSL_read, _SSL_write, _BIO_write = (getattr(_lib, n, None) for n in ("SSL_read", "SSL_write", "BIO_write"))
_bytes = bytes   # (BatchedTLSProtocol._write's argument has the name, as in Twisted)
_new_buffer = _ffi.new_allocator(should_clear_after_alloc=False) if _ffi is not None else None


def probe_bios(connection) -> bool:
    """Whether L{BatchedTLSProtocol} can ask C{connection}'s memory BIOs what they hold."""
    names = [getattr(_lib, name, None) for name in ("SSL_read", "SSL_write", "SSL_pending", "SSL_get_error",
                                                    "BIO_read", "BIO_write")]
    names += [getattr(connection, name, None) for name in ("_ssl", "_into_ssl", "_from_ssl")]
    return all(x is not None for x in (_bio_pending, _NULL, _new_buffer, *names))
