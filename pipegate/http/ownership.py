"""
Who may join a tunnel that already has connectors (sans-IO, no reactor).

A second connector joins only with the same token (C{jti}) as the ones serving, or when
its token and all of theirs were minted C{--shared}; and every connector of one tunnel
declares the same visitor policy.  Otherwise the login is refused with 409.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:   # the relay loads visitors.py only for a login that declares a policy
    from pipegate.http.visitors import VisitorPolicy


def declared(policy: VisitorPolicy | None) -> VisitorPolicy | None:
    """A login's visitor policy, None when it declares none (or an empty one)."""
    return None if policy is None or policy.empty else policy


@attrs.frozen
class Holder:
    """What a logged-in (or logging-in) connector claims: its token id, sharing, policy."""

    jti: str | None
    shared: bool
    policy: VisitorPolicy | None = attrs.field(converter=declared)   # None: no visitor policy


def join_refusal(holders: Iterable[Holder], newcomer: Holder) -> str | None:
    """None if C{newcomer} may join the connectors C{holders}, else the 409 reason."""
    holders = list(holders)
    if not holders:
        return None
    same_token = newcomer.jti is not None and all(h.jti == newcomer.jti for h in holders)
    if not same_token and not (newcomer.shared and all(h.shared for h in holders)):
        if not newcomer.shared:
            return "tunnel already served by another token (mint both with pipegate token --shared to share it)"
        return "tunnel already served by a token that is not shared"
    if any(h.policy != newcomer.policy for h in holders):
        return "visitor policy differs from the one the tunnel's connectors declared"
    return None
