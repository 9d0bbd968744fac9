"""
Connection and flow budgets: how many connections (or UDP flows) one source may hold,
and how many all sources together may hold.

A listener asks L{Budget.acquire} before it builds a protocol for a new connection and
calls L{Budget.release} once that connection is gone.  Past a cap, C{acquire} names the
cap that refused it, the listener refuses the connection (or drops the new flow), counts
the refusal and logs it through a L{LogThrottle}, so that a flood of refusals costs one
log line per interval rather than one per connection.

Pure: no reactor, no sockets.  Times are passed in as C{now}.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Hashable

import attrs

PER_SOURCE = "per-source"
TOTAL = "total"


# Once per connection or flow, and a client usually comes back: the parse is cached for the
# last 1,024 addresses (a few hundred KiB at most).
@functools.lru_cache(maxsize=1024)
def source_key(ip: str) -> str:
    """
    The source a per-IP cap counts C{ip} under: an IPv4 address as is, an IPv4-mapped IPv6
    address (C{::ffff:a.b.c.d}) as its IPv4 address, and any other IPv6 address by its /64
    (C{2001:db8:1:2::/64}), the block one host or one customer line usually has, so that one
    host cannot take a fresh per-IP share with every address of its /64.  An IPv6 zone is
    dropped; text that is not an IP address is returned stripped, a source of its own.
    """
    text = ip.strip()
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


@attrs.define(eq=False)
class Budget:
    """
    Counts what each source holds and the total; refuses past either cap.

    @ivar per_source: the most one source may hold at once; 0 means no per-source cap.
    @ivar total: the most all sources together may hold at once; 0 means no total cap.
    @ivar exempt: sources never held to C{per_source} (a trusted proxy carries many
        callers on its one address); they still count toward C{total}.
    @ivar refused: refusals so far, by the cap that refused (L{PER_SOURCE}, L{TOTAL}).
    """

    per_source: int
    total: int
    exempt: frozenset = frozenset()
    _held: dict[Hashable, int] = attrs.field(factory=dict, init=False)
    _count: int = attrs.field(default=0, init=False)
    refused: dict[str, int] = attrs.field(factory=lambda: {PER_SOURCE: 0, TOTAL: 0}, init=False)

    def acquire(self, source: Hashable) -> str | None:
        """
        Take one unit for C{source}.

        @return: C{None} when taken; otherwise the cap that refused, and nothing is taken.
            L{PER_SOURCE} when C{source} is at its own cap (whether or not the total is
            also reached), L{TOTAL} only for a source under its own cap.
        """
        # The per-source cap first: a source past its own cap is refused for that, so that
        # a caller making room on TOTAL (a UDP table evicting an idle flow) never does so
        # for a source that would be refused anyway.
        held = self._held.get(source, 0)
        if self.per_source and held >= self.per_source and source not in self.exempt:
            self.refused[PER_SOURCE] += 1
            return PER_SOURCE
        if self.total and self._count >= self.total:
            self.refused[TOTAL] += 1
            return TOTAL
        self._held[source] = held + 1
        self._count += 1
        return None

    def release(self, source: Hashable) -> None:
        """Give back one unit C{source} took; a release without a matching acquire is ignored."""
        held = self._held.get(source, 0)
        if held <= 0:
            return
        if held == 1:
            del self._held[source]
        else:
            self._held[source] = held - 1
        self._count -= 1

    def held(self, source: Hashable | None = None) -> int:
        """What C{source} holds, or, without a source, what all sources hold."""
        if source is None:
            return self._count
        return self._held.get(source, 0)

    def sources(self) -> int:
        """How many distinct sources hold at least one unit."""
        return len(self._held)


RATE = "rate"


class SourceRate:
    """
    New connections per source: a token bucket each, C{rate} a second up to C{burst} at
    once, kept for at most C{max_sources} sources (the least recently seen is forgotten
    first, and starts again with a full burst).  What a per-source cap on connections held
    at once cannot stop: a stranger who opens and closes connections one after the other,
    each costing a TLS handshake (about a millisecond of CPU).
    """

    def __init__(self, rate: float, burst: float, max_sources: int = 16384) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: dict[Hashable, tuple[float, float]] = {}   # oldest first

    def allow(self, source: Hashable, now: float) -> bool:
        """Take one connection's token for C{source}; False when it has none left."""
        buckets = self._buckets
        last = buckets.pop(source, None)   # (put back below: the dict keeps the sources by use)
        tokens = self.burst if last is None else min(self.burst, last[0] + (now - last[1]) * self.rate)
        allowed = tokens >= 1
        buckets[source] = (tokens - 1 if allowed else tokens, now)
        if len(buckets) > self.max_sources:
            del buckets[next(iter(buckets))]
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


@attrs.define
class LogThrottle:
    """
    At most one log line per C{interval} seconds for one kind of event.

    C{allow(now)} returns C{None} while the interval runs (the event is only counted), and
    otherwise the number of events it held back since the last line, so that the line can
    say "and N more".
    """

    interval: float = 10.0
    _next: float = attrs.field(default=float("-inf"), init=False)
    _held_back: int = attrs.field(default=0, init=False)

    def allow(self, now: float) -> int | None:
        if now < self._next:
            self._held_back += 1
            return None
        held_back, self._held_back = self._held_back, 0
        self._next = now + self.interval
        return held_back
