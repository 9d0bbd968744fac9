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

BACKLOG_DATAGRAMS = 64
UDP_BUFFER = 2_097_152  # default --udp-buffer: SO_RCVBUF and SO_SNDBUF of every UDP socket


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


class Flow(LinkChannel):
    """One UDP flow's channel state, shared by the gateway and the provider side."""

    log = Logger()

    def __init__(self, clock, idle_timeout: float, write, on_done) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.write = write          # deliver one datagram to the local socket
        self.on_done = on_done
        self.link = None
        self.channel_id = 0
        self.backlog: list[bytes] = []
        self.dropped = 0
        self.done = False
        self._last = clock.seconds()
        self._timer = clock.callLater(idle_timeout, self.expire) if idle_timeout > 0 else None

    def touch(self) -> None:
        # The idle timer is not re-armed per datagram (that was a heap operation each
        # time); it checks the time of the last datagram when it fires.
        self._last = self.clock.seconds()

    def attach(self, link, channel_id: int) -> None:
        self.link = link
        self.channel_id = channel_id
        backlog, self.backlog = self.backlog, []
        for datagram in backlog:
            self.link.send(frames.Datagram(self.channel_id, datagram))

    def outbound(self, datagram: bytes) -> None:
        """A datagram from the local socket, to go over the link."""
        if self.done:
            return
        self.touch()
        if self.link is None:
            if len(self.backlog) < BACKLOG_DATAGRAMS:
                self.backlog.append(datagram)
            else:
                self.dropped += 1
        elif self.link.paused:
            self.dropped += 1
        else:
            self.link.send(frames.Datagram(self.channel_id, datagram))

    def frame_received(self, frame) -> None:
        if self.done:
            return
        if isinstance(frame, frames.Datagram):
            self.touch()
            self.write(frame.data)
        elif isinstance(frame, (frames.Reset, frames.Fin)):
            self.close(notify=False)

    def expire(self) -> None:
        remaining = self._last + self.idle_timeout - self.clock.seconds()
        if remaining > 0 and not self.done:
            self._timer = self.clock.callLater(remaining, self.expire)
            return
        self._timer = None
        self.close(notify=True, reason="idle timeout")

    def close(self, notify: bool = True, reason: str = "flow closed") -> None:
        if self.done:
            return
        self.done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.link is not None:
            if notify:
                self.link.send(frames.Reset(self.channel_id, reason))
            self.link.remove_channel(self.channel_id)
        self.on_done(self)

    def link_lost(self) -> None:
        self.link = None
        self.close(notify=False)


class BackendSocket(DatagramProtocol):
    """The provider's connected UDP socket for one flow."""

    def __init__(self) -> None:
        self.flow: Flow | None = None

    def datagramReceived(self, data, addr):
        if self.flow is not None:
            self.flow.outbound(data)

    def connectionRefused(self):
        pass  # ICMP port unreachable: UDP carries on
