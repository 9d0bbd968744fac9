"""
Flow control shared by every stream on both planes (sans-IO: no reactor, no sockets).

L{SendWindow} and L{ReceiveWindow} are the two halves of one direction's credit;
L{GrowthBudget} bounds how far the windows of one service may grow together.  L{Flow}
joins one stream's two directions with the decisions every stream makes the same way
(when credit goes back, when a sink that stays full shrinks its window), so protocol
classes only feed it events and act on what it returns.  docs/protocol.md sections 1.4
(HTTP plane) and 2.6 (mux) describe the credit on the wire.
"""

from __future__ import annotations

import attrs

from pipegate.core.codec import FrameError

# Both planes' frames carry at most this much payload in one DATA frame.
MAX_DATA = 65_536
# The credit a stream direction starts with (both planes' default --window).
INITIAL_WINDOW = 262_144
# The largest credit one WINDOW frame may carry (both planes).
MAX_WINDOW_INCREMENT = 2**31 - 1
# A sink (socket, consumer) that stays full this long (seconds) is not keeping up: its
# window goes back to the initial credit.
SLOW_SINK = 0.1


def checked_increment(increment: int) -> int:
    """A WINDOW frame's credit, checked (both planes, encoding and decoding): 1 to 2**31 - 1."""
    if not 0 < increment <= MAX_WINDOW_INCREMENT:
        raise FrameError(f"WINDOW increment {increment}")
    return increment


@attrs.define
class SendWindow:
    """
    The sending half of one stream direction: splits bytes into DATA payloads no larger
    than L{MAX_DATA} and no more than the credit the peer granted; what does not fit
    waits in a queue until L{credit} is called.  The owner pauses its producer while
    L{blocked} is true, so the queue holds at most one read's worth.
    """

    window: int = INITIAL_WINDOW
    # A list, not a deque: it is empty nearly always and never longer than one read's
    # chunks, and an empty deque costs 760 bytes with its first 64-slot block, an empty
    # list 56: 7 MiB less at the gateway and at the provider for 10,000 idle connections.
    _queue: list[bytes | memoryview] = attrs.field(factory=list)
    queued: int = 0

    @property
    def blocked(self) -> bool:
        return self.queued > 0 or self.window <= 0

    def write(self, data: bytes) -> list[bytes | memoryview]:
        size = len(data)
        if not self._queue and 0 < size <= self.window and size <= MAX_DATA:
            # What _drain would do with an empty queue and enough credit: the common case
            # of a small message (a request or a reply) on a stream that keeps up.
            self.window -= size
            return [data]
        if data:
            self._queue.append(data)
            self.queued += len(data)
        return self._drain()

    def credit(self, increment: int) -> list[bytes | memoryview]:
        self.window += increment
        return self._drain()

    def _drain(self) -> list[bytes | memoryview]:
        # Split without copying: a payload cut from a larger read is a memoryview of it
        # (each is copied once, into the frame that carries it).  Sent chunks leave the
        # queue in one del at the end, so a drain is linear in the chunks it sends.
        out = []
        queue = self._queue
        sent = 0
        while sent < len(queue) and self.window > 0:
            head = queue[sent]
            n = min(len(head), self.window, MAX_DATA)
            if n == len(head):
                out.append(head)
                sent += 1
            else:
                view = memoryview(head)
                out.append(view[:n])
                queue[sent] = view[n:]
            self.window -= n
            self.queued -= n
        if sent:
            del queue[:sent]
        return out


@attrs.define
class GrowthBudget:
    """
    Credit that windows may grow by, shared by every window of a service: bounds what
    all grown windows together can make it buffer.  L{take} hands out what is left.
    """

    limit: int
    used: int = 0

    def take(self, size: int) -> int:
        size = max(0, min(size, self.limit - self.used))
        self.used += size
        return size

    def give(self, size: int) -> None:
        self.used -= size


@attrs.define
class ReceiveWindow:
    """
    The receiving half of one stream direction.  C{available} is the credit the peer
    still holds: it shrinks as DATA arrives and grows only when credit is granted back,
    so a peer that ignores backpressure is caught by L{received}.

    With C{max_window} above the initial credit the window grows: each time a whole
    window has been handed on with the next hop keeping up, it doubles (up to
    C{max_window}) and the extra credit goes out with the next grant.  L{shrink} (the
    next hop is not keeping up) returns it to the initial credit by withholding grants, so a
    fast stream gets a window that covers the time credit takes to come back, and a slow
    one goes back to the initial credit once its next hop holds more than that.  The
    peer needs no notice: it only ever sees more or less credit.  With a C{budget}
    (L{GrowthBudget}), growth beyond the initial credit is taken from it and given
    back by L{shrink} and L{release}.
    """

    available: int = INITIAL_WINDOW
    buffered: int = 0    # received, not yet handed on
    ungranted: int = 0   # handed on, credit not yet returned to the peer (< 0: withheld after a shrink)
    max_window: int = 0  # 0 (or at most the initial credit): a fixed window
    budget: GrowthBudget | None = None
    window: int = attrs.field(init=False)  # available + buffered + ungranted: what the peer may have in flight
    initial: int = attrs.field(init=False)  # the credit the peer starts with
    _run: int = attrs.field(init=False, default=0)  # handed on since the window last changed

    def __attrs_post_init__(self) -> None:
        self.window = self.initial = self.available + self.buffered + self.ungranted

    def received(self, size: int) -> None:
        if size > self.available:
            raise FrameError(f"peer sent {size} bytes with {self.available} of credit")
        self.available -= size
        self.buffered += size

    def consumed(self, size: int) -> None:
        """Record C{size} bytes handed on to the next hop."""
        self.buffered -= size
        # Bytes that pay back credit withheld after a shrink do not count toward growth.
        self._run += max(0, self.ungranted + size) - max(0, self.ungranted)
        self.ungranted += size

    def passed_on(self, size: int) -> None:
        """L{received} and L{consumed} at once: C{size} bytes arrived and were handed on."""
        if size > self.available:
            raise FrameError(f"peer sent {size} bytes with {self.available} of credit")
        self.available -= size
        ungranted = self.ungranted
        if ungranted >= 0:
            self._run += size
        else:
            self._run += max(0, ungranted + size)
        self.ungranted = ungranted + size

    def grant(self, at_least: int = 0) -> int:
        """
        Return the credit to send in a WINDOW frame now (0 = nothing to send).  With
        C{at_least}, credit is held back until that much is due, so that a receiver
        can return credit in a few large WINDOW frames instead of one per DATA frame.
        """
        if self._run >= self.window and self.window < self.max_window:
            extra = min(self.window, self.max_window - self.window)
            if self.budget is not None:
                extra = self.budget.take(extra)
            self.window += extra
            self.ungranted += extra
            self._run = 0
        if self.ungranted <= 0 or self.ungranted < at_least:
            return 0
        credit, self.ungranted = self.ungranted, 0
        self.available += credit
        return credit

    def shrink(self) -> None:
        """The next hop is not keeping up: back to the initial window (credit granted stands)."""
        self._run = 0
        if self.window > self.initial:
            if self.budget is not None:
                self.budget.give(self.window - self.initial)
            self.ungranted -= self.window - self.initial
            self.window = self.initial

    def release(self) -> None:
        """The stream is done: give its growth back to the budget, and grow no more."""
        if self.budget is not None:
            self.budget.give(self.window - self.initial)
            self.budget, self.max_window = None, 0


@attrs.define
class Flow:
    """
    One stream's flow control, both directions: what every stream on both planes (a
    mux channel, a relay stream, a connector stream, a raw pipe) decides the same way.

    Outgoing (this end's source to the peer): L{write} and L{credited} return the DATA
    payloads to send now; the owner pauses its source while L{blocked}.  Incoming (the
    peer to this end's sink): L{arrived} checks the peer kept to its credit and returns
    the credit to grant back now (0: none yet).  Credit goes back once half the window
    is due rather than after every DATA frame, and not at all while the sink is full;
    L{sink_resumed} returns what is due then, first shrinking the window to its initial
    credit when the sink stayed full L{SLOW_SINK} seconds or more (it is not keeping up).
    """

    send: SendWindow
    recv: ReceiveWindow
    sink_full: bool = False
    _full_since: float = 0.0

    @classmethod
    def of(cls, window: int = INITIAL_WINDOW, max_window: int = 0,
           budget: GrowthBudget | None = None) -> Flow:
        """A flow whose both directions start with C{window} of credit; the incoming one may grow."""
        return cls(SendWindow(window=window), ReceiveWindow(available=window, max_window=max_window, budget=budget))

    # -- outgoing
    @property
    def blocked(self) -> bool:
        """The source should stop reading: the peer's credit is spent (or bytes wait for it)."""
        return self.send.blocked

    def write(self, data: bytes) -> list[bytes | memoryview]:
        return self.send.write(data)

    def credited(self, increment: int) -> list[bytes | memoryview]:
        return self.send.credit(increment)

    # -- incoming
    def arrived(self, size: int) -> int:
        """C{size} bytes arrived from the peer and were handed to the sink; return the credit to grant."""
        # recv.passed_on(size), then, unless the sink is full, recv.grant(max(1, recv.window // 2)),
        # in one call (once per DATA frame), with grant called only when it would grow the window
        # or return credit.
        recv = self.recv
        if size > recv.available:
            raise FrameError(f"peer sent {size} bytes with {recv.available} of credit")
        recv.available -= size
        ungranted = recv.ungranted
        if ungranted >= 0:
            run = recv._run = recv._run + size
        else:
            run = recv._run = recv._run + max(0, ungranted + size)
        ungranted = recv.ungranted = ungranted + size
        if self.sink_full:
            return 0
        window = recv.window
        half = window // 2
        if (run < window or window >= recv.max_window) and (ungranted < half or ungranted < 1):
            return 0   # (grant would neither grow the window nor return credit)
        return recv.grant(half if half > 1 else 1)

    def held(self, size: int) -> None:
        """C{size} bytes arrived from the peer and wait for the sink (see L{handed_on})."""
        self.recv.received(size)

    def handed_on(self, size: int) -> int:
        """C{size} held bytes went to the sink; return the credit to grant."""
        self.recv.consumed(size)
        if self.sink_full:
            return 0
        return self.recv.grant(max(1, self.recv.window // 2))

    def sink_paused(self, now: float) -> None:
        """The sink pushes back (its buffer is full): credit stops going back."""
        if not self.sink_full:
            self.sink_full = True
            self._full_since = now

    def sink_resumed(self, now: float) -> int:
        """The sink takes bytes again; return the credit to grant now."""
        if self.sink_full:
            self.sink_full = False
            if now - self._full_since >= SLOW_SINK:
                self.recv.shrink()
        return self.recv.grant()

    def release(self) -> None:
        """The stream is done: its window's growth goes back to the budget."""
        self.recv.release()
