"""
The operations listener (C{--metrics ENDPOINT}): C{/metrics} in the Prometheus text
format and C{/status} as JSON, both read from the service's live state on the reactor
thread.  Also the table printer behind C{pipegate status URL}.
"""

from __future__ import annotations

import hmac
import ipaddress
import json

from prometheus_client import ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.application import service
from twisted.web import resource, server

from pipegate.accept import SiteLimits, small_site
from pipegate.metrics import ServiceCollector, registry_for


def _peer(link) -> str:
    return link.peer_name


def relay_status(relay) -> dict:
    full = relay.stats.by_label("in_flight_refusals")   # 503s at --max-in-flight, by tunnel
    return {
        "service": "relay",
        "draining": relay.stopping,
        "tunnels": [
            {"id": t.id, "connectors": len(t.links), "in_flight": t.in_flight, "waiting": len(t.waiting),
             "refused_full": int(full.get(t.id, 0))}
            for t in sorted(relay.tunnels.values(), key=lambda t: t.id)
        ],
    }


def gateway_status(gateway) -> dict:
    from pipegate.mux.session import ROLE_NAMES

    per_gate: dict[tuple[int, str], int] = {}
    for client in gateway.tcp_clients:
        per_gate[client.key] = per_gate.get(client.key, 0) + 1
    for key, (_, gate) in gateway.gates.items():
        if gate is not None:
            per_gate[key] = per_gate.get(key, 0) + len(gate.flows)
    exposed = gateway.exposed()
    return {
        "service": "gateway",
        "draining": bool(getattr(gateway, "draining", False)),
        "peers": [
            {"peer": _peer(link), "role": ROLE_NAMES.get(link.peer_role, "?"),
             "routes": len(gateway.routes.get(link, ())), "channels": link.channel_count(),
             "going_away": link.going_away}
            for link in sorted(gateway.links, key=_peer)
        ],
        "routes": [
            {"gate": f"{r.gate_port}/{r.protocol}", "service": f"{r.service_host}:{r.service_port}",
             "provider": _peer(link), "tags": ",".join(r.tags)}
            for link, routes in sorted(gateway.routes.items(), key=lambda i: _peer(i[0])) for r in routes
        ],
        "gates": [
            {"gate": f"{port}/{proto}", "providers": len(exposed.get((port, proto), [])),
             "channels": per_gate.get((port, proto), 0)}
            for port, proto in sorted(gateway.gates)
        ],
    }


def provider_status(provider) -> dict:
    from pipegate.mux.session import ROLE_NAMES

    return {
        "service": "provider",
        "draining": bool(getattr(provider, "draining", False)),
        "links": [
            {"peer": _peer(link), "role": ROLE_NAMES.get(link.peer_role, "?"),
             "channels": link.channel_count(), "going_away": link.going_away}
            for link in sorted(provider.links, key=_peer)
        ],
        "services": [
            {"gate": f"{s.gate_port}/{s.protocol}", "service": f"{s.service_host}:{s.service_port}",
             "tags": ",".join(s.tags)}
            for s in provider.services
        ],
    }


def hub_status(hub) -> dict:
    """The hub's part of the relay's /status: one row per router (its number, never its secret)."""
    return {
        "hub_routers": [
            {"router": f"#{router}", **row} for router, row in sorted(hub.core.summary().items())
        ],
    }


def acme_status(manager) -> dict:
    """The relay's ACME names (C{--acme-directory}): certificate expiry and order state."""
    return {"certificates": manager.rows()}


def connector_status(connector) -> dict:
    return {
        "service": "connector",
        "tunnel": connector.tunnel_id,
        "url": connector.public_url,
        "links": [
            {"relay": connector.display_url,
             "streams": len(link.session.streams) if link.session else 0}
            for link in connector.links
        ],
    }


class _Metrics(resource.Resource):
    isLeaf = True

    def __init__(self, registry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class StatusAccess:
    """
    Who may read C{/status} (it names tunnels, routers and peers): with a C{token}, whoever
    sends C{Authorization: Bearer <token>}; without one, loopback peers only.
    """

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def refusal(self, request) -> tuple[int, bytes] | None:
        """None when C{request} may read it, else (status code, body)."""
        if self.token:
            offered = request.getHeader(b"authorization") or b""
            if hmac.compare_digest(offered, b"Bearer " + self.token.encode()):
                return None
            request.setHeader(b"www-authenticate", b'Bearer realm="pipegate-status"')
            return 401, b"/status needs the --status-token as a bearer token\n"
        host = getattr(request.getClientAddress(), "host", "")
        try:
            if ipaddress.ip_address(host.split("%")[0]).is_loopback:
                return None
        except ValueError:
            if not host:  # a unix socket: only what can open the file reaches it
                return None
        return 403, b"/status is private: ask from the host itself or set --status-token\n"


class _Status(resource.Resource):
    isLeaf = True

    def __init__(self, status, access: StatusAccess | None = None) -> None:
        super().__init__()
        self.status = status
        self.access = access

    def render_GET(self, request):
        refused = self.access.refusal(request) if self.access is not None else None
        if refused is not None:
            request.setResponseCode(refused[0])
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return refused[1]
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.status(), indent=1).encode() + b"\n"


class OpsResource(resource.Resource):
    """C{/metrics} and C{/status}; anything else is 404."""

    def __init__(self, collector: ServiceCollector, status, *more: ServiceCollector,
                 access: StatusAccess | None = None) -> None:
        super().__init__()
        self.registry = registry_for(collector, *more)
        # process_open_fds against process_max_fds (the soft LimitNOFILE), resident memory, CPU:
        # the client library's standard process metrics, read from /proc at scrape time.
        self.registry.register(ProcessCollector(registry=None))
        self.putChild(b"metrics", _Metrics(self.registry))
        self.putChild(b"status", _Status(status, access))


class OpsSite(server.Site):
    """The ops listener's site: its access log leaves out successful C{/metrics} scrapes
    (one every 15 s from Prometheus would flood the journal) and keeps every other request."""

    noisy = False
    displayTracebacks = False

    def log(self, request) -> None:
        if request.code == 200 and request.path == b"/metrics":
            return
        super().log(request)


def add_ops(top: service.MultiService, description: str | None, collector: ServiceCollector,
            status, reactor, *more: ServiceCollector, access: StatusAccess | None = None,
            limits: SiteLimits) -> None:
    """
    Serve C{/metrics} (C{collector}'s and C{more}'s) and C{/status} on server endpoint
    C{description} (nothing when None); C{/status} only as C{access} allows (None: anyone).
    """
    if not description:
        return
    site = OpsSite(OpsResource(collector, status, *more, access=access), reactor=reactor)
    small_site(description, site, reactor, "--metrics", limits).setServiceParent(top)


# -- pipegate status URL


def format_table(rows: list[dict]) -> list[str]:
    """Rows of dicts as aligned text columns (the keys of the first row are the header)."""
    if not rows:
        return ["  (none)"]
    columns = list(rows[0])
    cells = [[str(c).upper() for c in columns]] + [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)


def format_status(status: dict) -> str:
    """A /status document as text: scalars first, then one table per list."""
    lines = []
    for key, value in status.items():
        if not isinstance(value, list):
            lines.append(f"{key}: {_cell(value)}")
    for key, value in status.items():
        if isinstance(value, list):
            lines.append("")
            lines.append(f"{key} ({len(value)}):")
            lines.extend(format_table(value))
    return "\n".join(lines) + "\n"
