"""
The TCP socket under a transport, and what the tunnels do to it: Nagle off, and
sending a link's frames when they are written rather than on the reactor's next turn.

Why L{send_now}: Twisted's TCP transport queues every C{write} and sends the queue
when the reactor next polls and finds the socket writable, that is after it has
handled every other ready socket of this turn.  For a link that carries many
requests this serialises the tunnel: the relay reads 50 public requests, and only
after the last one does the connector get the first; the connector answers 50,
and only then does the relay get any answer.  Each process idled while the other
worked (30-40 % of the two cores idle under C{wrk -c50}).  Links send each batch
of frames as soon as it is written, so the next hop starts on the first request
while this one is still reading the rest (git log -p benchmarks/README.md).
"""

from __future__ import annotations

import socket
import struct
from errno import EAGAIN, ECONNREFUSED, EINTR, EWOULDBLOCK
from types import MethodType

from twisted.internet import endpoints, main, tcp, udp
from twisted.internet.error import ConnectionLost
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import LogLevel
from twisted.python import log
from twisted.python.failure import Failure
from twisted.internet.protocol import Factory
from twisted.internet.abstract import FileDescriptor, isIPAddress, isIPv6Address

from pipegate._compat import (
    flush_tls_buffer, has_write_buffers, nothing_queued, tcp_data_received, writable_now, write_closed)
from pipegate.timers import IdleTimer


_TCP_DO_READ = tcp.Connection.doRead   # (stream_socket replaces it on the connection, not this)


def socket_transport(transport):
    """The TCP transport under C{transport} (through TLS or a wrapper), or None."""
    # Not hasattr(..., "setTcpNoDelay"): protocol wrappers such as TLS delegate it.
    while transport is not None and not isinstance(transport, FileDescriptor):
        transport = getattr(transport, "transport", None)
    return transport


def no_delay(transport) -> None:
    """Turn Nagle off on the TCP socket under C{transport} (through TLS or a wrapper)."""
    transport = socket_transport(transport)
    if transport is not None:
        _no_delay_on(transport)


def _no_delay_on(sock) -> None:
    try:
        sock.setTcpNoDelay(True)
    except OSError:
        pass


# A mux link's reads: about two 64 KiB DATA frames per read halve the receiver's reads, wakeups and TLS
# layer calls per byte; just under glibc's 128 KiB mmap threshold, as a channel's reads
# (pipegate.mux.channel.CHANNEL_SOCKET_BUFFER; a larger read costs an mmap, an mremap and a munmap: see
# below).  64 KiB -> 127 KiB: 3-5 % fewer instructions per MB in gateway + provider (benchmarks/README.md,
# "Bulk TCP: fewer link reads, no pyOpenSSL wrappers").
READ_SIZE = 130_048


def bounded_reads(transport, size: int = READ_SIZE) -> None:
    """
    Read at most C{size} bytes per wakeup from the socket under C{transport},
    whatever its C{bufferSize}.

    Twisted's TCP transport uses C{bufferSize} twice: as how much it buffers before
    pausing its producer, and as the size of every C{recv}.  A mux link raises the
    first to 4 MiB (L{pipegate.mux.linkio.link_write_buffer}), which made each read
    allocate a 4 MiB bytes object: above the C library's mmap threshold, so every
    read cost an C{mmap}, an C{mremap} and a C{munmap} and a page fault per 4 KiB
    received (strace of the provider: 3 of each per tunnelled connection).  The
    transport's C{doRead} is replaced by the same code with a fixed size.
    Calls a private method of C{twisted.internet.tcp.Connection}
    (L{pipegate._compat.tcp_data_received}).
    """
    transport = socket_transport(transport)
    received = tcp_data_received(transport)
    if received is None:
        return
    recv = transport.socket.recv

    def doRead():
        try:
            data = recv(size)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        return received(data)

    transport.doRead = doRead


def eager_writes(transport) -> None:
    """
    Make each C{write} on the socket under C{transport} go to the kernel at once when
    nothing is queued before it; only what the socket does not take is queued for the
    reactor, as before.

    Twisted's C{write} always queues and registers the socket for writing, and the bytes
    go out at the reactor's next poll, or at L{send_now}, after which the socket is
    unregistered again: two C{epoll_ctl} calls and the reactor's bookkeeping for every
    write of a link or channel that keeps up.  Overrides the transport's C{write} with
    one that reads private state of C{twisted.internet.abstract.FileDescriptor}
    (L{pipegate._compat.writable_now}).  A send error is left to the reactor, as in
    L{send_now}.
    """
    transport = socket_transport(transport)
    if transport is not None:
        _eager_writes_on(transport)


def _eager_writes_on(sock) -> None:
    if has_write_buffers(sock):   # (else not a twisted.internet.tcp.Connection)
        # A bound method, not a closure: this is per tunnelled connection (about 64 bytes).
        sock.write = MethodType(_eager_write, sock)
        sock.writeSequence = MethodType(_eager_write_sequence, sock)


def stream_socket(transport, buffer_size: int):
    """
    L{no_delay} and L{eager_writes} on the TCP socket under C{transport}, with
    C{bufferSize} set to C{buffer_size}, and its reads delivered in one call instead of
    Twisted's two, small while the messages are (L{_direct_read}); returns that socket, or
    None when there is none.  (What a tunnelled connection does to its socket, with one
    lookup of the socket instead of one per step.)  L{plain_writes} undoes the write and
    read methods.
    """
    transport = socket_transport(transport)
    if transport is None:
        return None
    _no_delay_on(transport)
    _eager_writes_on(transport)
    if has_write_buffers(transport) and type(transport).doRead is _TCP_DO_READ:
        # (a twisted.internet.tcp.Connection whose doRead is Twisted's own: bounded_reads and
        # startTLS leave the socket alone)
        transport.doRead = MethodType(_direct_read, transport)
        transport.pg_read_size, transport.pg_small_reads = min(SMALL_READ, buffer_size), 0
    transport.bufferSize = buffer_size
    return transport


# A tunnelled connection's reads while its messages are small (a request, an answer): the largest
# bytes object CPython allocates from its own small-object pool (512 bytes, header included).
# A read of bufferSize (127 KiB) allocates that much from the C library and shrinks it to what came:
# about 650 instructions of malloc and realloc per read (callgrind, benchmarks.rr_instr).
SMALL_READ = 512 - 33

# Reads of bufferSize in a row that bring SMALL_READ or less before the reads are small again: a
# stream that mixes small and larger messages (redis-benchmark -P 16: 16 requests of 40-60 bytes,
# then the next 16) stays on bufferSize, instead of each larger one costing a second read and wakeup.
SMALL_STREAK = 16


def _direct_read(transport):
    # Twisted's tcp.Connection.doRead and its _dataReceived in one call (once per message read
    # from a tunnelled connection's socket): the same results, from a recv of pg_read_size.  A
    # read that fills it makes the next ones take bufferSize, as Twisted's would (the rest waits
    # for the next wakeup: level-triggered, it comes at once), until SMALL_STREAK of them in a
    # row bring SMALL_READ or less.
    size = transport.pg_read_size
    try:
        data = transport.socket.recv(size)
    except OSError as e:
        if e.args[0] == EWOULDBLOCK:
            return None
        return main.CONNECTION_LOST
    if not data:
        return main.CONNECTION_DONE
    got = len(data)
    if got == size:
        transport.pg_read_size, transport.pg_small_reads = transport.bufferSize, 0
    elif got <= SMALL_READ < size:
        transport.pg_small_reads += 1
        if transport.pg_small_reads >= SMALL_STREAK:
            transport.pg_read_size = SMALL_READ
    elif size > SMALL_READ:
        transport.pg_small_reads = 0
    transport.protocol.dataReceived(data)
    return None


def read_waiting(transport, data_received) -> None:
    """
    Read what the socket of C{transport} (a plain TCP connection) holds now, and give it
    to C{data_received}, instead of at the reactor's next poll.

    A client that connects and sends at once (a request, a TLS hello) has its first bytes
    at the gateway by the time the connection is accepted: read then, they cost no
    wakeup of their own (an C{epoll_wait}, and the reactor's turn around it).  Nothing
    waiting (C{EWOULDBLOCK}): nothing happens.  The end of the stream is left to the
    reactor, which reads it again on its next poll and closes as always; a receive error
    (a reset) closes the connection here, as the reactor would have (C{connectionLost}
    with C{ConnectionLost}), since reading it has cleared it from the socket.  Any other
    transport (TLS, a wrapper), or one that is closing: nothing is done.
    """
    if not (isinstance(transport, FileDescriptor) and has_write_buffers(transport)) or transport.TLS \
            or not transport.connected or transport.disconnecting:
        return
    try:
        data = transport.getHandle().recv(transport.bufferSize)
    except OSError as e:
        if e.args[0] == EWOULDBLOCK:
            return
        reactor = transport.reactor
        reactor.removeReader(transport)
        reactor.removeWriter(transport)
        transport.connectionLost(Failure(ConnectionLost()))
        return
    if data:
        data_received(data)


def plain_writes(transport) -> None:
    """
    Undo L{eager_writes} (and L{stream_socket}'s reads) on the socket under C{transport};
    call it from the protocol's C{connectionLost}.

    The bound methods that L{eager_writes} and L{stream_socket} set refer to their transport,
    and the transport to them: a reference cycle per connection, which only the garbage collector would
    otherwise free (and each collection walks every live object of its generation).
    """
    transport = socket_transport(transport)
    if transport is not None:
        transport.__dict__.pop("write", None)
        transport.__dict__.pop("writeSequence", None)
        transport.__dict__.pop("doRead", None)   # (stream_socket's)


def _eager_write(transport, data: bytes | memoryview) -> None:
    # Sent now when nothing is queued ahead of it, the socket is open for writing and there is no
    # startTLS (bytes must go through its TLS layer then): writable_now, one call (this is every
    # write of a link or a channel).
    if type(data) in (bytes, memoryview) and writable_now(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    if type(data) is memoryview:
        data = data.tobytes()   # (Twisted's queue takes bytes)
    type(transport).write(transport, data)  # queue the rest: FileDescriptor.write


# A memoryview may be written (the mux links' TLS layer sends its records from a buffer of its own
# without copying them into bytes first: pipegate._compat.BatchedTLSProtocol._flushSendBIO).
_eager_write.takes_views = True

# The most pieces one sendmsg takes (Linux's IOV_MAX; more fail with EMSGSIZE).
IOV_MAX = 1024


def _eager_write_sequence(transport, pieces) -> None:
    # _eager_write of the pieces' concatenation, with one sendmsg per IOV_MAX pieces instead of
    # a join and a send (a mux link hands one channel's DATA payloads of a read here as views of
    # it: pipegate.mux.linkio.deliver_views).  What the kernel does not take is queued as bytes.
    if type(pieces) is not list:
        pieces = list(pieces)
    start = 0
    if writable_now(transport):
        sendmsg = transport.socket.sendmsg
        while start < len(pieces):
            chunk = pieces[start:start + IOV_MAX]
            try:
                sent = sendmsg(chunk)
            except OSError:
                sent = 0
            for piece in chunk:
                size = len(piece)
                if sent < size:
                    break
                sent -= size
                start += 1
            else:
                continue
            if sent:
                pieces = [pieces[start][sent:], *pieces[start + 1:]]
                start = 0
            break
    if start < len(pieces):
        type(transport).write(transport, b"".join(pieces[start:]))  # queue the rest: FileDescriptor.write


_eager_write_sequence.takes_views = True


def send_now(transport) -> None:
    """
    Hand what C{transport} holds to the kernel now instead of at the reactor's next
    turn.  Use it on a socket with Nagle off, after writing a batch of frames.

    Through TLS the records that Twisted's buffering TLS layer holds for the next turn
    are written first.  What the socket does not take stays queued for the reactor,
    as after any write.  Nothing is done while the socket has a paused or pull producer
    registered (its C{doWrite} would resume that producer from inside this call) or
    once it is closing; a send error is left for the reactor, whose next C{doWrite} meets it
    again and closes the connection the usual way.
    """
    while transport is not None and not isinstance(transport, FileDescriptor):
        # twisted.protocols.tls.BufferingTLSTransport keeps small writes for one turn.
        flush_tls_buffer(transport)
        transport = getattr(transport, "transport", None)
    if transport is None or not transport.connected or transport.disconnecting:
        return
    if nothing_queued(transport):
        return  # (L{eager_writes} sent it)
    if transport.producer is not None and (not transport.streamingProducer or transport.producerPaused):
        return  # doWrite would resume it, from inside this call
    transport.doWrite()


def close_write(transport) -> None:
    """
    Half-close C{transport}: the peer gets a FIN after every byte written before.

    Twisted's C{loseWriteConnection} always waits for the reactor: it registers the socket
    for writing, and on the next turn (an C{epoll_ctl}, a wakeup, an empty C{send}, another
    C{epoll_ctl}) shuts the write side down.  When nothing is queued there is nothing to
    wait for, so the socket (C{getHandle()}) is shut down for writing at once: a tunnelled
    connection's FIN reaches the service a reactor turn sooner, at four system calls less.
    Otherwise, and for a transport that is not a plain TCP connection (TLS, a wrapper),
    C{loseWriteConnection} as before.  Twisted is told as its own half-close would
    (L{pipegate._compat.write_closed}): a write after it is dropped, and C{loseConnection}
    closes at once.
    """
    if _shut_write(transport):
        return
    try:
        transport.loseWriteConnection()
    except (AttributeError, NotImplementedError):
        pass


def _shut_write(transport) -> bool:
    """Shut the write side of C{transport} down now, if it is a TCP socket with nothing queued; says whether it did."""
    if has_write_buffers(transport) and writable_now(transport):
        try:
            transport.getHandle().shutdown(socket.SHUT_WR)
        except OSError:
            return False
        write_closed(transport, mark=True)
        return True
    return False


def close_now(transport) -> None:
    """
    C{transport.loseConnection()}, at once when nothing is queued on its TCP socket.

    Twisted's C{loseConnection} waits for the reactor to find the socket writable (an
    C{epoll_ctl} to watch it, a wakeup, an empty write, another C{epoll_ctl}) before it
    closes, unless the write side is shut down already.  With nothing queued there is
    nothing to wait for: Twisted is told the write side is done
    (L{pipegate._compat.write_closed}), and its C{loseConnection} closes the socket now
    (its C{shutdown} and C{close}: the peer gets the same FIN, a reactor turn sooner).
    Otherwise (bytes queued, TLS, a wrapper) C{loseConnection} as before.
    """
    if has_write_buffers(transport) and writable_now(transport):
        write_closed(transport, mark=True)
    transport.loseConnection()


# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a __u64 at this offset since Linux 4.1.
_TCP_INFO_SIZE, _BYTES_ACKED = 128, 120


def bytes_acked(transport) -> int | None:
    """
    The bytes of C{transport}'s TCP connection (under TLS or a wrapper) its peer has
    acknowledged (Linux C{TCP_INFO}), or None where that is not known.
    """
    tcp = socket_transport(transport)
    try:
        info = tcp.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except (AttributeError, OSError):   # (no TCP transport, a closed socket, not Linux)
        return None
    return struct.unpack_from("=Q", info, _BYTES_ACKED)[0] if len(info) == _TCP_INFO_SIZE else None


class UnreadAbort:
    """
    Aborts C{transport}, which is closing behind bytes queued for its peer, once C{seconds}
    pass in which the peer took none of them (the bytes it acknowledged did not grow), or,
    with C{min_rate}, fewer than C{min_rate} bytes a second of them: a caller who never
    reads its answer is cut, one who reads it slowly but steadily is not, and one who takes
    a trickle (one segment a timeout) to keep the connection and the answer's buffers is
    cut too.  Twisted's loseConnection alone waits for the flush for ever.  C{on_abort()} is
    called just before (to log it); L{cancel} when the connection is gone.  C{seconds} 0:
    never.
    """

    def __init__(self, clock, seconds: float, transport, on_abort=lambda: None, min_rate: float = 0.0) -> None:
        self.transport = transport
        self.on_abort = on_abort
        self._least = max(1, int(min_rate * seconds))   # bytes a timeout must see taken
        self._acked = bytes_acked(transport)
        self._timer = IdleTimer(clock, seconds, self._expired)

    def _expired(self) -> None:
        acked = bytes_acked(self.transport)
        if acked is not None and self._acked is not None and acked - self._acked >= self._least:
            # still taking it, slowly: wait on
            self._acked = acked
            self._timer = IdleTimer(self._timer.clock, self._timer.seconds, self._expired)
            return
        self.on_abort()
        self.transport.abortConnection()

    def touch(self) -> None:
        self._timer.touch()   # (as an IdleTimer: what holds one may touch it on traffic)

    def active(self) -> bool:
        return self._timer.active()

    def cancel(self) -> None:
        self._timer.cancel()


def stream_endpoint(reactor, host: str, port: int, timeout: float):
    """
    A TCP client endpoint for C{host}: a name goes through C{HostnameEndpoint}
    (resolution, happy eyeballs), an address literal straight to the socket.

    C{HostnameEndpoint} sends even C{127.0.0.1} through the reactor's resolver,
    a C{getaddrinfo} in the thread pool for every connection; for a service at
    a fixed address that was most of what the provider added to a connect.
    """
    if isIPAddress(host):
        return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)


class _OneShotFactory(Factory):
    noisy = False

    def __init__(self, protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr):
        return self._protocol


def connect_protocol(endpoint, protocol):
    """
    C{endpoints.connectProtocol} without its two log lines per connection.

    Twisted's version builds a new factory class on every call, and that factory is
    noisy: "Starting factory ..." and "Stopping factory ..." in the service's log for
    every tunnelled connection, which also cost the provider a tenth of its CPU per
    connection (py-spy; git log -p benchmarks/README.md).
    """
    return endpoint.connect(_OneShotFactory(protocol))


#: A per-flow UDP socket that reads one datagram per wakeup drains the socket instead
#: (reads until it is empty) on every this-many-th wakeup, to notice a busy flow.
DRAIN_PROBE = 16


class _QuietUDPPort(udp.Port):
    """
    A UDP port whose close line ("(UDP Port N Closed)") is a debug event, and which
    reads a request/response flow without a wasted C{recvfrom}.

    Twisted's C{doRead} reads until the socket says C{EAGAIN}.  A flow's socket (the
    provider's connected socket to its backend) usually holds one datagram per wakeup,
    the answer to one request, so every datagram cost a second C{recvfrom} and an
    C{OSError} raised and caught: 9,414 C{EAGAIN}s for 9,414 requests in strace of the
    provider under the C{udp_rr} benchmark.  This C{doRead} reads one datagram per wakeup
    (level-triggered polling reports the socket again if more are waiting), and drains
    the socket as Twisted does on every L{DRAIN_PROBE}-th wakeup and as long as draining
    finds more than one datagram: a busy flow is read in bursts after at most
    L{DRAIN_PROBE} wakeups.  Only the public attributes of L{udp.Port} are used.
    """

    _draining = False
    _wakeups = 0

    def doRead(self):
        if not self._draining:
            self._wakeups += 1
            if self._wakeups < DRAIN_PROBE:
                # _read_one and _deliver, inline: this is once per datagram of a flow.
                try:
                    data, addr = self.socket.recvfrom(self.maxPacketSize)
                except OSError as e:
                    if e.args[0] in _UDP_READ_REFUSED:
                        self.protocol.connectionRefused()
                    elif e.args[0] not in _UDP_READ_IGNORED:
                        raise
                    return
                if self.addressFamily == socket.AF_INET6:
                    addr = addr[:2]
                try:
                    self.protocol.datagramReceived(data, addr)
                except BaseException:
                    log.err()
                return
            self._wakeups = 0
        read = count = 0
        recvfrom, size, protocol = self.socket.recvfrom, self.maxPacketSize, self.protocol
        while read < self.maxThroughput:
            try:
                data, addr = recvfrom(size)
            except OSError as e:
                self._draining = count > 1
                if e.args[0] in _UDP_READ_REFUSED:
                    protocol.connectionRefused()
                elif e.args[0] not in _UDP_READ_IGNORED:
                    raise
                return
            read += len(data)
            count += 1
            self._deliver(protocol, data, addr)
        self._draining = True

    def _deliver(self, protocol, data, addr):
        if self.addressFamily == socket.AF_INET6:
            addr = addr[:2]  # (host, port), as Twisted's doRead gives it
        try:
            protocol.datagramReceived(data, addr)
        except BaseException:
            log.err()

    def connectionLost(self, reason=None):
        log.callWithContext({"log_level": LogLevel.debug}, super().connectionLost, reason)


_UDP_READ_IGNORED = frozenset({EAGAIN, EWOULDBLOCK, EINTR})   # nothing (more) to read
_UDP_READ_REFUSED = frozenset({ECONNREFUSED})   # an ICMP port unreachable for a connected socket


def listen_udp_quietly(reactor, port: int, protocol, interface: str = "", max_packet_size: int = 8192):
    """
    C{reactor.listenUDP}, for sockets opened per flow: Twisted logs "starting on N" and
    "(UDP Port N Closed)" for each, at info level, through its legacy log; here they are
    debug events (the legacy log takes the level from the log context).  Reactors that
    do not use L{udp.Port} (IOCP) get a plain C{listenUDP}.
    """
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=max_packet_size)
    listening = _QuietUDPPort(port, protocol, interface, max_packet_size, reactor)
    log.callWithContext({"log_level": LogLevel.debug}, listening.startListening)
    return listening
