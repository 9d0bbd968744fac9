"""
Channels: a TCP connection or a UDP flow carried over a mux link.

L{StreamChannel} joins a TCP socket (the client's at the gateway, the backend's at the
provider) to a mux channel with credit windows both ways and half-close: a FIN from
either socket travels as a Fin frame after all of that direction's data, and the
socket closes once both directions are done.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pipegate.core.window import Flow, GrowthBudget
from pipegate.mux import frames
from pipegate.sockets import UnreadAbort, close_now, close_write, plain_writes, stream_socket
from pipegate.timers import IdleTimer, cancel


# What a channel's socket reads at once, and holds unsent before it pushes back (Twisted's
# bufferSize is both; its default is 64 KiB).  Two DATA frames per read halve the work per
# byte moved; just under glibc's 128 KiB mmap threshold, so each read's bytes come from
# the heap (a larger read costs an mmap, an mremap, a munmap and page faults: see
# pipegate.sockets.bounded_reads).  One stream through gateway + provider: 577-677 ->
# 657-852 MB/s, 2.5-3.0 -> 2.0-2.5 CPU-s/GB (git log -p benchmarks/README.md).
CHANNEL_SOCKET_BUFFER = 130_048

# What a channel reads from its socket before it is attached (the OPEN in flight) and
# holds for the OPEN_OK, before it stops reading: a connect-and-send client's first request
# is sent with the OPEN_OK's turn, without pausing and resuming the socket (two epoll_ctl).
# The read that reaches it may overshoot it by one read (CHANNEL_SOCKET_BUFFER): a client
# whose OPEN hangs (a provider that does not answer, for the open timeout) makes the
# gateway hold at most about 140 KiB for it, as the kernel's socket buffers would.
EARLY_HOLD = 16_384

_Data = frames.Data


@implementer(IHalfCloseableProtocol, IPushProducer)
class StreamChannel(Protocol):
    """A TCP socket on one side, a mux channel on the other."""

    log = Logger()

    # Where a channel starts (set on the instance when they change).
    link = None
    channel_id = 0
    _fin_pending = False
    fin_sent = False
    fin_received = False
    done = False
    on_done = None
    _idle_timer = None
    _unread = None   # a finished channel's, while its socket flushes (pipegate.sockets.UnreadAbort)
    _paused = False   # whether this channel paused its socket's reading

    def __init__(self, window: int, max_window: int = 0, budget: GrowthBudget | None = None) -> None:
        # The incoming window grows toward max_window while the socket keeps up (and
        # shrinks back when it pushes back): see core.window and docs/protocol.md 2.6.
        self.flow = Flow.of(window, max_window, budget)
        self._early: list[bytes] = []

    def set_idle_timeout(self, clock, seconds: float) -> None:
        """Close the channel after C{seconds} with no byte in either direction."""
        if seconds > 0:
            self._idle_timer = IdleTimer(clock, seconds, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if not self.done and self.link is not None:
            self.link.send(frames.Reset(self.channel_id, "idle timeout"))
        self.abort()

    # -- wiring
    def attach(self, link, channel_id: int) -> None:
        """Bind to a link channel; socket bytes read so far go out now."""
        self.link = link
        self.channel_id = channel_id
        early, self._early = self._early, []
        for chunk in early:
            self._send(chunk)
        if self._fin_pending:
            self._maybe_fin()
        self._update_reading()

    @property
    def buffered(self) -> int:
        """Bytes this side holds for the channel: unsent socket bytes and undelivered frames."""
        return self.flow.send.queued + sum(map(len, self._early)) + self.flow.recv.buffered

    # -- socket side
    def connectionMade(self) -> None:
        stream_socket(self.transport, CHANNEL_SOCKET_BUFFER)   # (Nagle off, eager writes)
        self.transport.registerProducer(self, True)
        # Not attached yet (the gateway's OPEN is in flight): the socket is still read, so
        # that what the client sends meanwhile (the request of a connect-and-send client)
        # is here when OPEN_OK comes and goes out with it, instead of after another
        # reactor turn to resume reading; L{dataReceived} stops reading at EARLY_HOLD.

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        if self._idle_timer is not None:
            self._idle_timer.touch()
        link = self.link
        if link is None:
            # Held until attach; once EARLY_HOLD bytes are held (plus at most one read), the
            # socket is paused until attach resumes it.
            self._early.append(data)
            if sum(map(len, self._early)) >= EARLY_HOLD:
                self._paused = True
                self.transport.pauseProducing()
            return
        # _send and SendWindow.blocked, inline: this is once per message read from the socket.
        send = self.flow.send
        link.send_data(self.channel_id, send.write(data))
        if send.queued > 0 or send.window <= 0 or link.paused:
            # (Otherwise the socket is still being read, as it was for this data.)
            self._update_reading()

    def _send(self, data: bytes) -> None:
        self.link.send_data(self.channel_id, self.flow.send.write(data))

    def _update_reading(self) -> None:
        # Only a change goes to the transport (the channel is the only one that pauses its
        # socket): a resume of a socket being read was four calls down to the reactor for
        # nothing, on every attach and every WINDOW.
        if self.transport is None or self.done:
            return
        link = self.link
        if self.flow.send.blocked or link is None or link.paused:
            if link is not None and link.paused:
                link.hold(self)   # resumed by link_resumed
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
        elif self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def readConnectionLost(self) -> None:
        self._fin_pending = True
        self._maybe_fin()

    def writeConnectionLost(self) -> None:
        pass

    def _maybe_fin(self) -> None:
        if (self._fin_pending and not self.fin_sent and self.link is not None
                and self.flow.send.queued == 0):
            self.fin_sent = True
            self.link.send(frames.Fin(self.channel_id))
            self._maybe_done()

    def connectionLost(self, reason=None) -> None:
        plain_writes(self.transport)
        self._unread = cancel(self._unread)
        if not self.done:
            self.done = True
            if self.link is not None:
                self.link.send(frames.Reset(self.channel_id, "connection closed"))
            self._finished()

    # -- link side
    def payload_received(self, channel_id: int, data: bytes) -> None:
        """A DATA frame's payload: the link's hot path (L{MuxLink.dataReceived}) makes no frame for it."""
        if self.done:
            return
        if self.fin_received:
            raise frames.FrameError(f"DATA on channel {self.channel_id} after its FIN")
        if self._idle_timer is not None:
            self._idle_timer.touch()
        # (Flow.arrived raises before the write if the peer overran its credit.)
        credit = self.flow.arrived(len(data))
        self.transport.write(data)  # (eager_writes: sent now when the socket takes it)
        if credit:
            self.link.send(frames.Window(self.channel_id, credit))

    def pieces_received(self, channel_id: int, pieces: list, size: int) -> None:
        """
        Consecutive DATA payloads of one link read as their pieces (views of it: see
        L{pipegate.mux.linkio.deliver_views}), C{size} bytes in all: one credit check for all of
        them (a group that overruns the credit writes nothing), then one C{writeSequence}.
        """
        if self.done:
            return
        if self.fin_received:
            raise frames.FrameError(f"DATA on channel {self.channel_id} after its FIN")
        if self._idle_timer is not None:
            self._idle_timer.touch()
        credit = self.flow.arrived(size)
        self.transport.writeSequence(pieces)  # (eager_writes: one sendmsg, the rest queued as bytes)
        if credit:
            self.link.send(frames.Window(self.channel_id, credit))

    def frame_received(self, frame) -> None:
        if self.done:
            return
        if type(frame) is _Data:
            self.payload_received(frame.channel, frame.data)
            return
        match frame:
            case frames.Window(_, increment):
                self.link.send_data(self.channel_id, self.flow.credited(increment))
                self._maybe_fin()
                self._update_reading()
            case frames.Fin():
                if self.fin_received:
                    raise frames.FrameError(f"a second FIN on channel {self.channel_id}")
                self.fin_received = True
                # A transport with a registered producer never finishes closing.
                self.transport.unregisterProducer()
                if self.fin_sent:
                    self._maybe_done()   # (its loseConnection closes both directions)
                else:
                    close_write(self.transport)
            case frames.Reset():
                self.abort()

    def _maybe_done(self) -> None:
        if self.fin_sent and self.fin_received and not self.done:
            self.done = True
            if self.transport.producer is not None:
                self.transport.unregisterProducer()
            timer = self._idle_timer
            self._finished()
            close_now(self.transport)   # (at once when nothing is queued: after _finished, as before)
            if timer is not None and self.transport.connected:
                # Still flushing: a peer that never reads would hold the connection (its fd, and
                # at a gate its unit of the per-IP and total caps) for ever, since loseConnection
                # waits for the flush.  Aborted after an idle timeout in which it took nothing.
                self._unread = UnreadAbort(timer.clock, timer.seconds, self.transport)

    def link_resumed(self) -> None:
        self._update_reading()

    def link_lost(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self._finished()
        if self.transport is not None:
            self.transport.abortConnection()

    def _finished(self) -> None:
        self.flow.release()
        self._idle_timer = cancel(self._idle_timer)
        if self.link is not None:
            self.link.release_channel(self.channel_id, self)
        if self.on_done is not None:
            callback, self.on_done = self.on_done, None
            callback(self)

    # -- IPushProducer: the socket's write buffer is full; stop returning credit
    def pauseProducing(self) -> None:
        if self.link is not None:
            self.flow.sink_paused(self.link.clock.seconds())

    def resumeProducing(self) -> None:
        # Twisted pauses at 64 KiB buffered, which a socket that keeps up clears on the next
        # turn or so; one that stayed full for SLOW_SINK is not keeping up (Flow.sink_resumed).
        if self.link is None:
            return
        credit = self.flow.sink_resumed(self.link.clock.seconds())
        if credit and not self.done:
            self.link.send(frames.Window(self.channel_id, credit))

    def stopProducing(self) -> None:
        pass
