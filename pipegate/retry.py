"""
Reconnect delays shared by the connector and the port-plane nodes, in a module of its
own so that a gateway or provider does not import the HTTP plane (autobahn,
twisted.web) just for this.
"""

from __future__ import annotations

import random
from typing import Callable


def backoff(initial: float = 1.0, maximum: float = 60.0, rng: Callable[[], float] = random.random):
    """Jittered exponential backoff: 1 s doubling to 60 s, each delay scaled by 0.5..1.0."""
    def policy(attempt: int) -> float:
        # ClientService counts failed attempts from 1.
        delay = min(maximum, initial * 2 ** min(max(attempt - 1, 0), 30))
        return delay * (0.5 + rng() / 2)
    return policy
