"""
The relay's tunnel registry: the connectors logged in under each connection id, who may
log in (a valid, unrevoked token whose subject matches the path; the ownership rule of
pipegate/http/ownership.py), which caller a tunnel's visitor policy admits, and which
connector a request goes to.

The registry holds no socket: a connector link is anything with C{tunnel_id},
C{holder} (L{Holder}), C{streams} and C{go_away(reason)}; a waiting request is anything
with C{request}, C{assign(link)} and C{fail(code, reason)} (pipegate/http/streams.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import attrs
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http

from pipegate import auth
from pipegate.core.budget import Budget
from pipegate.core.routes import RouteTable
from pipegate.http.ownership import Holder, join_refusal
from pipegate.stats import Stats

if TYPE_CHECKING:
    from pipegate.http.revocation import Revocations   # loaded only with --revoked (tap/server.py)
    from pipegate.http.visitors import VisitorGate     # loaded by the first login with a visitor policy


@attrs.define(eq=False)
class Tunnel:
    """The connectors logged in under one connection id and its requests in flight."""

    id: str
    # The connectors taking new requests (the provider chooser: round robin; core/routes.py).
    connectors: RouteTable = attrs.field(factory=RouteTable)
    # Slots held by caller IP: requests waiting for their answer head, and upgraded pipes.
    callers: Budget = attrs.field(factory=lambda: Budget(per_source=0, total=0))
    waiting: list = attrs.field(factory=list)
    in_flight: int = 0
    gate: VisitorGate | None = None   # the visitor policy its connectors declared

    @property
    def links(self) -> list:
        """The connectors taking new requests, in login order."""
        return self.connectors.links(self.id)

    def pick(self):
        """The connector for the next request (round robin); the tunnel has one."""
        return self.connectors.pick(self.id)

    @property
    def idle(self) -> bool:
        return not self.links and not self.waiting and self.in_flight == 0


class Tunnels(Mapping):
    """
    The tunnels by connection id (a read-only mapping: tunnels come and go through
    L{tunnel}, L{attach}, L{detach} and L{forget_if_idle}), and connector logins.
    """

    log = Logger()

    def __init__(self, jwt: auth.JWTSettings, per_caller: int, clock: IReactorTime, stats: Stats) -> None:
        self.jwt = jwt
        self.per_caller = per_caller   # slots of one tunnel one caller's waiting requests may hold
        self.clock = clock
        self.stats = stats
        self._by_id: dict[str, Tunnel] = {}
        self.leaving: set = set()                  # links told GOAWAY, finishing their requests
        self.revocations: Revocations | None = None   # --revoked: token ids and connection ids
        self.login_observers: list = []  # callables(tunnel_id) told of every connector login (ACME)

    def __getitem__(self, tunnel_id: str) -> Tunnel:
        return self._by_id[tunnel_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def tunnel(self, tunnel_id: str) -> Tunnel:
        """The tunnel of C{tunnel_id}, made when there is none."""
        tunnel = self._by_id.get(tunnel_id)
        if tunnel is None:
            tunnel = self._by_id[tunnel_id] = Tunnel(
                tunnel_id, callers=Budget(per_source=self.per_caller, total=0))
        return tunnel

    def authenticate(self, path_id: str | None, token: str | None) -> str:
        return self.authenticate_claims(path_id, token).sub

    def authenticate_claims(self, path_id: str | None, token: str | None) -> auth.Claims:
        """
        The token's claims, with C{sub} lower-cased (connection ids are case-insensitive),
        or L{ConnectionDeny}: 401 (no, bad or revoked token), 403 (path differs).
        """
        if not token:
            self.stats.inc("admission_failures", "no_token")
            raise ConnectionDeny(401, "missing token")
        try:
            claims = auth.verify_claims(self.jwt, token, self.clock.seconds())
        except auth.TokenError as e:
            self.stats.inc("admission_failures", "bad_token")
            raise ConnectionDeny(401, str(e))
        sub = claims.sub.lower()
        if path_id is not None and path_id.lower() != sub:
            self.stats.inc("admission_failures", "wrong_path")
            raise ConnectionDeny(403, "token subject does not match the path")
        if self.revocations is not None and self.revocations.revoked(claims.jti, sub):
            self.stats.inc("admission_failures", "revoked")
            raise ConnectionDeny(401, "token revoked")
        return attrs.evolve(claims, sub=sub)

    def admit(self, tunnel_id: str, holder: Holder) -> None:
        """The ownership rule (L{join_refusal}): L{ConnectionDeny} 409 when it refuses."""
        tunnel = self._by_id.get(tunnel_id)
        reason = join_refusal([link.holder for link in tunnel.links] if tunnel else [], holder)
        if reason is not None:
            self.stats.inc("admission_failures", "conflict")
            raise ConnectionDeny(409, reason)

    def set_revocations(self, revocations: Revocations) -> None:
        """A new C{--revoked} list: connectors logged in with a revoked token are cut off now."""
        self.revocations = revocations
        links = [link for t in self._by_id.values() for link in t.links] + list(self.leaving)
        for link in links:
            if revocations.revoked(link.holder.jti, link.tunnel_id):
                self.log.info("disconnecting a connector of tunnel {tunnel_id}: token revoked",
                              tunnel_id=link.tunnel_id)
                link.go_away("token revoked")

    def count_caller(self, request, tunnel: Tunnel, outcome: str) -> None:
        """Ingress and visitor decisions: the access log's last field and a counter by tunnel."""
        request.decision = outcome
        label = tunnel.id if tunnel.links else "(offline)"  # no label per id a stranger makes up
        self.stats.inc("caller_decisions", f"{label},{outcome}")

    def visitor_refusal(self, tunnel: Tunnel, request) -> tuple[int, str] | None:
        """
        The tunnel's visitor policy applied to a caller: None to go on (the caller's
        C{Authorization} then removed when it served as the tunnel's credentials), else the
        status and reason to answer with (401 comes with C{WWW-Authenticate}).
        """
        gate = tunnel.gate
        if gate is None:
            return None
        ip = getattr(request.getClientAddress(), "host", "")
        verdict = gate.check(ip, request.getHeader(b"authorization"), self.clock.seconds())
        self.count_caller(request, tunnel, "visitor_" + verdict.outcome)
        if verdict.allowed:
            if gate.policy.users:
                request.requestHeaders.removeHeader(b"authorization")
            return None
        if verdict.outcome == "ip_denied":
            return http.FORBIDDEN, "forbidden by the tunnel's visitor policy"
        if verdict.outcome == "throttled":
            request.responseHeaders.setRawHeaders(b"retry-after", [b"1"])
            return 429, "too many credentials to check for this tunnel; retry later"
        request.responseHeaders.setRawHeaders(
            b"www-authenticate", [b'Basic realm="%s", charset="UTF-8"' % tunnel.id.encode()])
        return http.UNAUTHORIZED, "credentials required"

    def attach(self, link) -> None:
        """A connector logged in: its waiting requests (visitor policy permitting) go to it."""
        tunnel = self.tunnel(link.tunnel_id)
        if not tunnel.links:
            policy = link.holder.policy   # (None: the connector declared no visitor policy)
            if policy is None:
                tunnel.gate = None
            else:
                from pipegate.http.visitors import VisitorGate

                tunnel.gate = VisitorGate(tunnel.id, policy)
        tunnel.connectors.announce(link, [tunnel.id])
        self.log.info("connector up for tunnel {tunnel_id} ({count} connected)",
                      tunnel_id=link.tunnel_id, count=len(tunnel.links))
        waiting, tunnel.waiting = tunnel.waiting, []
        for stream in waiting:
            refusal = self.visitor_refusal(tunnel, stream.request)
            if refusal is not None:
                stream.fail(*refusal)
            else:
                stream.assign(tunnel.pick())
        for observer in self.login_observers:
            observer(link.tunnel_id)

    def detach(self, link) -> None:
        """A connector takes no new requests (gone, or going away)."""
        tunnel = self._by_id.get(link.tunnel_id)
        if tunnel is None or link not in tunnel.links:
            return
        tunnel.connectors.remove(link)
        if not tunnel.links:
            tunnel.gate = None   # the next connector declares the policy; waiting requests meet it then
        self.log.info("connector down for tunnel {tunnel_id} ({count} left)",
                      tunnel_id=link.tunnel_id, count=len(tunnel.links))
        self.forget_if_idle(tunnel)

    def forget_if_idle(self, tunnel: Tunnel) -> None:
        """Drop C{tunnel} once it has no connector, no waiting request and nothing in flight."""
        if tunnel.idle and self._by_id.get(tunnel.id) is tunnel:
            del self._by_id[tunnel.id]
