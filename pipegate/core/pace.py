"""
The pace a request body must keep (pure: no reactor).

A caller that trickles its body (a byte just inside each idle timeout) shows progress
forever, and holds its slot of a tunnel's requests in flight as long as it likes; a few
addresses doing so starve the tunnel ("slow POST").  L{MinimumPace} gives a body a grace
period, then asks for an average of at least C{rate} bytes a second, as Apache's
mod_reqtimeout does (C{body=20,MinRate=500}).  Time in which the relay itself does not
read (the body waits for a connector, for credit, or for the caller's bandwidth limit) is
not counted against it: each resume starts a new grace period.
"""

from __future__ import annotations


class MinimumPace:
    """
    A body's deadline: C{grace} seconds from its start (or from the last resume), plus one
    second for every C{rate} bytes received since then.
    """

    def __init__(self, rate: float, grace: float, now: float) -> None:
        self.rate = rate
        self.grace = grace
        self._since = now
        self._received = 0
        self.paused = False

    def received(self, size: int) -> None:
        self._received += size

    def pause(self) -> None:
        """The relay stopped reading the body: no deadline until L{resume}."""
        self.paused = True

    def resume(self, now: float) -> None:
        """The relay reads again: a new grace period starts."""
        if self.paused:
            self.paused = False
            self._since = now
            self._received = 0

    def deadline(self) -> float | None:
        """When the body is too slow unless more arrives; None while paused."""
        if self.paused:
            return None
        return self._since + self.grace + self._received / self.rate

    def too_slow(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline


class ReadingPace:
    """
    The pace a caller must take an answer at ("slow read"): the time its connection pushes
    back (the relay has more to write than the caller takes) may add up to C{grace}
    seconds, plus one second for every C{rate} bytes the caller took.  Time the answer
    waits for the local app is not counted, so a slow app or a quiet event stream costs
    nothing; a caller that keeps its receive window almost shut and takes a trickle (enough
    to keep the answer moving inside the request timeout) is cut once it falls behind.
    What the caller took is passed in (C{taken}): the bytes its TCP stack acknowledged
    where that is known, not what was handed to its connection, of which the kernel's
    send buffer alone holds megabytes.
    """

    def __init__(self, rate: float, grace: float) -> None:
        self.rate = rate
        self.grace = grace
        self._stalled = 0.0                # seconds pushed back so far, in finished stretches
        self._since: float | None = None   # when the current push-back began

    @property
    def stalled(self) -> bool:
        return self._since is not None

    def stall(self, now: float) -> None:
        """The caller's connection pushes back (pauseProducing)."""
        if self._since is None:
            self._since = now

    def unstall(self, now: float) -> None:
        """It takes again (resumeProducing)."""
        if self._since is not None:
            self._stalled += now - self._since
            self._since = None

    def deadline(self, taken: int) -> float | None:
        """When the caller is too slow unless it takes more; None while it is not pushing back."""
        if self._since is None:
            return None
        return self._since + self.grace + taken / self.rate - self._stalled
