"""
Pending calls on a clock that an object drops when it stops or moves on.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall


def cancel(call: IDelayedCall | None) -> None:
    """
    Cancel C{call} unless it is gone already (C{None}, fired or cancelled).  Returns
    C{None}, so that C{self._timer = cancel(self._timer)} forgets it in the same line.
    """
    if call is not None and call.active():
        call.cancel()
    return None
