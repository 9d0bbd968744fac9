"""
When to dial a peer again (the delay); L{pipegate.dialer} does the dialling and says why an
attempt failed.

Twisted's L{ClientService} counts failed attempts only until TCP connects: a dial that
connects and is then refused (a TLS trust failure, an HTTP 404 from something that is not
a relay, a wrong router secret) restarts its count, so its retry policy sees attempt 1
for ever and the dialer hammers the peer every 0.5-1 s.  L{Redial} keeps its own count:
every attempt that did not end in a login (connector) or an admission (mux link) grows
the delay, capped and jittered; only a success resets it.  It plugs into
C{ClientService(retryPolicy=...)}, whose attempt number it ignores.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs


@attrs.define
class Redial:
    """
    Jittered exponential backoff over failed attempts: C{initial} seconds doubling
    (C{factor}) to C{maximum}, each delay scaled by 0.5..1.0.

    Call L{succeeded} when an attempt reaches its goal (logged in, admitted); every
    call of L{next_delay} (or of the object, as a retry policy) counts one more failed
    attempt since then.
    """

    initial: float = 1.0
    maximum: float = 60.0
    factor: float = 2.0
    rng: Callable[[], float] = random.random
    failures: int = 0

    def succeeded(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        delay = min(self.maximum, self.initial * self.factor ** min(self.failures - 1, 64))
        return delay * (0.5 + self.rng() / 2)

    def __call__(self, attempt: int) -> float:
        """C{ClientService}'s retry policy; its C{attempt} restarts whenever TCP connects."""
        return self.next_delay()
