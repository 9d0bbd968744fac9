"""
The token bucket (sans-IO: every call takes C{now} explicitly).

L{TokenBucket.take} lets a chunk through at once and returns how long its sender should
pause; a chunk bigger than the burst leaves a debt that the pause pays off, so big
writes are slowed, never starved.  L{BucketPool} keeps one bucket per key (a source IP,
a tunnel), bounded.  L{datagram_allowed} polices UDP, where there is nothing to pause: a
datagram that would push the debt past a limit is dropped.  The transport wrapper that
applies a bucket is L{pipegate.throttle.Shaper}.
"""

from __future__ import annotations

import math
from typing import Hashable

import attrs


def _finite(low: float, *, strict: bool):
    def check(instance, attribute, value):
        if not math.isfinite(value) or value < low or (strict and value == low):
            relation = ">" if strict else ">="
            raise ValueError(f"{attribute.name} must be finite and {relation} {low}, not {value!r}")
    return check


@attrs.define(eq=False)
class TokenBucket:
    """
    A token bucket in bytes: C{rate} bytes/s refill it up to C{burst} bytes; it starts full.

    The level may go negative (a debt): L{take} always lets the chunk through and reports
    the pause that pays the debt off.  Time that goes backwards is ignored (no refill).
    Several connections may share one bucket (L{BucketPool}).
    """

    rate: float = attrs.field(converter=float, validator=_finite(0.0, strict=True))
    burst: float = attrs.field(converter=float, validator=_finite(0.0, strict=False))
    _last: float = attrs.field(default=0.0, alias="now", converter=float)
    _level: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._level = self.burst

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._level = min(self.burst, self._level + (now - self._last) * self.rate)
            self._last = now
        elif self._level > self.burst:  # burst lowered at run time
            self._level = self.burst

    def take(self, nbytes: int, now: float) -> float:
        """
        Charge C{nbytes} at time C{now}.

        @return: the seconds the caller should pause before sending more; C{0.0} means
            go on.  C{take(0, now)} only reports the pause the current debt needs.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes!r}")
        self._refill(now)
        self._level -= nbytes
        return -self._level / self.rate if self._level < 0 else 0.0

    def level(self, now: float) -> float:
        """The bytes available at C{now} (negative: a debt), after refilling, without taking."""
        self._refill(now)
        return self._level

    def debt(self, now: float) -> float:
        """The bytes owed at C{now}: C{max(0, -level(now))}."""
        return max(0.0, -self.level(now))


@attrs.define(eq=False)
class BucketPool:
    """
    Buckets shared by key, e.g. C{(client_ip, "up")}, counted by reference.

    The first L{acquire} of a key creates its bucket; later ones return the same bucket
    (their C{rate} and C{burst} are ignored) until the last user calls L{release}.
    """

    _buckets: dict[Hashable, TokenBucket] = attrs.field(factory=dict, init=False)
    _users: dict[Hashable, int] = attrs.field(factory=dict, init=False)

    def acquire(self, key: Hashable, rate: float, burst: float, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate, burst, now)
            self._users[key] = 0
        self._users[key] += 1
        return bucket

    def release(self, key: Hashable) -> None:
        """Drop one reference to C{key}'s bucket; the last one removes it.  L{KeyError} if not held."""
        users = self._users[key] - 1
        if users:
            self._users[key] = users
        else:
            del self._users[key], self._buckets[key]

    def get(self, key: Hashable) -> TokenBucket | None:
        return self._buckets.get(key)

    def users(self, key: Hashable) -> int:
        return self._users.get(key, 0)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._buckets


def datagram_allowed(bucket: TokenBucket | None, size: int, now: float, max_debt: float) -> bool:
    """
    Police one datagram of C{size} bytes: charge it and return C{True}, or return
    C{False} (drop it, nothing charged) when taking it would leave a debt above
    C{max_debt}.  No bucket: always allowed.  With C{max_debt} below C{size - burst}, a
    datagram of C{size} bytes never passes.
    """
    if bucket is None:
        return True
    if size - bucket.level(now) > max_debt:
        return False
    bucket.take(size, now)
    return True
