"""
The ACME order schedule (sans-IO): which names need a certificate order and when.  A
queue with at most C{max_orders} orders at once, exponential backoff after failures,
C{Retry-After} and a global pause on C{rateLimited}, renewal at two thirds of a
certificate's lifetime (or at the CA's ARI suggestion), re-armed after each issuance.
L{pipegate.http.acme.AcmeManager} feeds it events from an injected clock.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

__all__ = ["OrderScheduler", "renewal_time"]

BACKOFF = 60.0                 # first retry after a failure, seconds; doubles each time
MAX_BACKOFF = 6 * 3600.0       # ... up to this
MAX_RETRY_AFTER = 7 * 86400.0  # a CA's Retry-After is honoured up to a week
RENEW_FRACTION = 2 / 3


def renewal_time(not_before: float, not_after: float) -> float:
    """When to renew a certificate without an ARI window: two thirds into its lifetime."""
    return not_before + RENEW_FRACTION * (not_after - not_before)


@attrs.define(eq=False)
class _Name:
    name: str
    seq: int
    sticky: bool             # the --domain itself: always kept and renewed
    due: float               # the next order may start at this time
    failures: int = 0
    busy: bool = False
    held_until: float | None = None   # notAfter of the certificate in hand
    seen: bool = True        # a connector logged in since the last order started
    dormant: bool = False    # not renewed (no connector); a login wakes it


class OrderScheduler:
    """
    Decides which names to order and when.  Events in (L{want}, L{held}, L{succeeded},
    L{failed}), decisions out (L{start}, L{next_wakeup}); every method takes C{now}.
    """

    def __init__(self, max_orders: int = 2, backoff: float = BACKOFF, max_backoff: float = MAX_BACKOFF) -> None:
        self.max_orders = max_orders
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.names: dict[str, _Name] = {}
        self.paused_until = 0.0   # rate-limited: no order starts before this
        self._seq = 0

    def _new(self, name: str, now: float, sticky: bool) -> _Name:
        self._seq += 1
        state = self.names[name] = _Name(name, self._seq, sticky, now)
        return state

    def want(self, name: str, now: float, sticky: bool = False) -> bool:
        """A name should have a certificate (startup, a login). True when it is new."""
        state = self.names.get(name)
        if state is None:
            self._new(name, now, sticky)
            return True
        state.seen = True
        state.sticky = state.sticky or sticky
        woke, state.dormant = state.dormant, False
        return woke

    def held(self, name: str, not_before: float, not_after: float, now: float,
             renew_at: float | None = None, sticky: bool = False) -> float:
        """
        A certificate for C{name} is in hand (loaded from the state directory, or just
        issued); its renewal is due at C{renew_at} (ARI) or two thirds into its life.
        Returns the renewal time.
        """
        state = self.names.get(name) or self._new(name, now, sticky)
        state.sticky = state.sticky or sticky
        state.held_until = not_after
        state.busy = False
        state.failures = 0
        state.seen = False
        state.due = renew_at if renew_at is not None else renewal_time(not_before, not_after)
        return state.due

    def succeeded(self, name: str, not_before: float, not_after: float, now: float,
                  renew_at: float | None = None) -> float:
        return self.held(name, not_before, not_after, now, renew_at)

    def failed(self, name: str, now: float, retry_after: float | None = None,
               rate_limited: bool = False) -> float:
        """An order failed: retry after the backoff (or the CA's Retry-After). Returns the delay."""
        state = self.names[name]
        state.busy = False
        state.failures += 1
        delay = min(self.max_backoff, self.backoff * 2 ** (state.failures - 1))
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        state.due = now + delay
        if rate_limited:
            self.paused_until = max(self.paused_until, now + delay)
        return delay

    @property
    def busy(self) -> int:
        return sum(1 for s in self.names.values() if s.busy)

    def start(self, now: float, live: Callable[[str], bool] = lambda name: True) -> tuple[list[str], list[str]]:
        """
        (names whose orders start now, names that go dormant).  A tunnel's name is
        ordered again (renewal, or a retry after a failure) only if a connector logged in
        since its last order started or C{live(name)}; else it goes dormant until a login.
        """
        if now < self.paused_until:
            return [], []
        due = sorted((s for s in self.names.values() if not s.busy and not s.dormant and s.due <= now),
                     key=lambda s: (s.due, s.seq))
        dropped = []
        for state in due:
            if not state.sticky and not state.seen and not live(state.name):
                state.dormant = True
                dropped.append(state.name)
        started = [s for s in due if not s.dormant][: max(0, self.max_orders - self.busy)]
        for state in started:
            state.busy = True
            state.seen = False   # the next attempt (renewal or retry) needs a login or a live tunnel
        return [s.name for s in started], dropped

    def next_wakeup(self) -> float | None:
        """When L{start} may have something to start (None: only after an event)."""
        if self.busy >= self.max_orders:
            return None
        waiting = [s.due for s in self.names.values() if not s.busy and not s.dormant]
        if not waiting:
            return None
        return max(min(waiting), self.paused_until)
