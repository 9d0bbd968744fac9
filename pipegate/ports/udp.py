"""
UDP over the mux: one flow per client (address, port), one channel per flow, one
Datagram frame per datagram.  Flows expire after an idle timeout; datagrams that
cannot be sent (no channel yet beyond the backlog, or a full link) are dropped and
counted, as UDP would drop them.
"""

from __future__ import annotations

import socket

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from pipegate.mux import frames
from pipegate.mux.session import LinkChannel
from pipegate.timers import IdleTimer

#: Default --udp-hold: bytes of datagrams a new flow keeps while its channel opens, one
#: gateway-provider round trip.  1 Gbit/s for 20 ms is 2.5 MB; a longer round trip needs more.
UDP_HOLD = 2_500_000
#: Default --udp-hold-total: bytes all new flows together may keep.
UDP_HOLD_TOTAL = 64 * 1024 * 1024
#: What the hold charges for each datagram on top of its payload: the list slot, the bytes
#: object and the Datagram frame it becomes cost about this much, so empty datagrams are not free.
DATAGRAM_OVERHEAD = 64
#: A full flow table (gateway or provider) makes room by closing its longest-idle flow, but
#: only one idle at least this long: a flood of new flows cannot push out flows in use.
EVICT_MIN_IDLE = 5.0
UDP_BUFFER = 2_097_152  # default --udp-buffer: SO_RCVBUF and SO_SNDBUF of every UDP socket

_Datagram = frames.Datagram


def set_buffers(port, size: int) -> None:
    """
    Ask for C{size}-byte kernel receive and send buffers on a listening UDP port.  The
    default (about 208 KiB) holds only a few ms of a fast flow, so datagrams were dropped
    whenever the process was busy; Linux caps the request at net.core.rmem_max/wmem_max.
    """
    handle = port.getHandle()
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            handle.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass


class Hold:
    """
    The bytes that flows not yet attached to a channel keep: at most C{per_flow} bytes each
    and C{total} bytes together, each datagram counted as its length plus
    L{DATAGRAM_OVERHEAD}.  What does not fit is dropped and counted in C{dropped}
    (and reported through C{on_drop}).
    """

    def __init__(self, per_flow: int = UDP_HOLD, total: int = UDP_HOLD_TOTAL, on_drop=None) -> None:
        self.per_flow = per_flow
        self.total = total
        self.used = 0
        self.dropped = 0
        self.on_drop = on_drop

    def take(self, held: int, size: int) -> bool:
        """May a flow already holding C{held} bytes keep C{size} more?  Counts them if so."""
        if held + size > self.per_flow or self.used + size > self.total:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used = max(0, self.used - size)


class Flow(LinkChannel):
    """One UDP flow's channel state, shared by the gateway and the provider side."""

    log = Logger()

    def __init__(self, clock, idle_timeout: float, write, on_done, hold: Hold | None = None) -> None:
        self.clock = clock
        self.hold = hold if hold is not None else Hold()
        self.held = 0               # bytes in the backlog
        self.table = None           # an OrderedDict of flows, least recently used first, kept in order
        self.idle_timeout = idle_timeout
        self.write = write          # deliver one datagram to the local socket
        self.on_done = on_done
        self.link = None
        self.channel_id = 0
        self.opening = None         # the gateway's OPEN in flight for this flow, if any
        self.backlog: list[bytes] = []
        self.dropped = 0
        self.done = False
        self._idle = IdleTimer(clock, idle_timeout, self.expire)   # (0: no timeout; still keeps the time)

    @property
    def last_active(self) -> float:
        """When the last datagram went through, either way."""
        return self._idle.last

    def touch(self) -> None:
        self._idle.touch()
        if self.table is not None:
            self.table.move_to_end(self)

    def attach(self, link, channel_id: int) -> None:
        self.opening = None
        self.link = link
        self.channel_id = channel_id
        backlog, self.backlog = self.backlog, []
        self.hold.give(self.held)
        self.held = 0
        for datagram in backlog:
            self.link.send_datagram(self.channel_id, datagram)

    def outbound(self, datagram: bytes) -> None:
        """A datagram from the local socket, to go over the link."""
        if self.done:
            return
        self.touch()
        if self.link is None:
            cost = len(datagram) + DATAGRAM_OVERHEAD
            if self.hold.take(self.held, cost):
                self.backlog.append(datagram)
                self.held += cost
            else:
                self.dropped += 1
        elif self.link.paused:
            self.dropped += 1
        else:
            self.link.send_datagram(self.channel_id, datagram)

    def count_drop(self) -> None:
        """A datagram from the link that the local socket refused (full buffer, ICMP refusal)."""
        self.dropped += 1

    def frame_received(self, frame) -> None:
        if self.done:
            return
        if type(frame) is _Datagram:
            self.touch()
            self.write(frame.data)
        elif isinstance(frame, (frames.Reset, frames.Fin)):
            self.close(notify=False)

    def expire(self) -> None:
        self.close(notify=True, reason="idle timeout")

    def close(self, notify: bool = True, reason: str = "flow closed") -> None:
        if self.done:
            return
        self.done = True
        self._idle.cancel()
        self.hold.give(self.held)
        self.held, self.backlog = 0, []
        opening, self.opening = self.opening, None
        if opening is not None and self.link is None:
            # Closed (idle, evicted, gate closed) while its OPEN is in flight: give the
            # channel back now, or a late OPEN_OK would bind it to this dead flow for good.
            opening.abandon()
        if self.table is not None:
            self.table.pop(self, None)
            self.table = None
        if self.link is not None:
            if notify:
                self.link.send(frames.Reset(self.channel_id, reason))
            self.link.release_channel(self.channel_id, self)
        self.on_done(self)

    def link_lost(self) -> None:
        self.link = None
        self.close(notify=False)


def evict_idle(table, now: float, min_idle: float) -> bool:
    """Close the longest-idle attached flow of C{table} if it has been idle C{min_idle} s; did it?"""
    if not table:
        return False
    oldest = next(iter(table))
    if oldest.link is None or now - oldest.last_active < min_idle:
        return False
    oldest.close(notify=True, reason="evicted: flow table full")
    return True


def datagram_sender(port, on_drop=None):
    """
    A function that sends one datagram on the UDP C{port}: C{send(data)} on a connected
    port, C{send(data, addr)} otherwise.  It drops (and reports to C{on_drop}) what the
    socket refuses, as UDP would: a full send buffer (C{EAGAIN}, C{ENOBUFS}), an ICMP
    refusal, a datagram too long for the path.

    Straight to the socket (C{port.getHandle()}): Twisted's C{Port.write} checks the
    address with C{isIPAddress} and C{isIPv6Address} for every datagram (2 % of the
    gateway's samples under the udp_rr benchmark), and raises on a full send buffer, which
    here would have escaped into the link's C{dataReceived} and closed the whole link.
    (Python retries C{EINTR} itself.)
    """
    handle = port.getHandle()
    send, sendto = handle.send, handle.sendto

    def send_datagram(data, addr=None):
        try:
            if addr is None:
                send(data)
            else:
                sendto(data, addr)
        except OSError:
            if on_drop is not None:
                on_drop()
    return send_datagram


class BackendSocket(DatagramProtocol):
    """The provider's connected UDP socket for one flow."""

    def __init__(self) -> None:
        self.flow: Flow | None = None

    def datagramReceived(self, data, addr):
        if self.flow is not None:
            if len(data) > frames.MAX_DATAGRAM:   # (an IPv6 service's: no DATAGRAM frame carries it)
                self.flow.count_drop()
                return
            self.flow.outbound(data)

    def connectionRefused(self):
        pass  # ICMP port unreachable: UDP carries on
