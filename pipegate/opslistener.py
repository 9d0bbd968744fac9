"""
The opt-in C{--metrics} listener of the relay, gateway and provider, wired one way.
"""

from __future__ import annotations

from twisted.application import service

from pipegate.accept import SiteLimits
from pipegate.drain import AfterDrain


def add_metrics_listener(top: service.MultiService, node, kind: str, description: str | None, reactor,
                         limits: SiteLimits, hub=None, acme=None, status_token: str | None = None) -> None:
    """
    Serve C{/metrics} and C{/status} of C{node} (a relay, gateway or provider: C{kind})
    on server endpoint C{description}; nothing when it is None.  The listener sits in
    an L{AfterDrain}, so scrapes still answer while C{node} drains.  twisted.web and
    prometheus-client are imported only when a listener is asked for (about 4 MiB of
    idle RSS for the gateway and provider).  A relay's C{hub} (C{--mux}) adds its
    C{pipegate_hub_*} metrics and C{hub_routers} rows; its C{acme} manager (C{--acme-directory})
    C{pipegate_acme_*} and C{certificates} rows.  A relay's C{/status} answers only loopback
    peers, or with C{status_token} only that bearer token (L{pipegate.status.StatusAccess}).
    """
    if not description:
        return
    from pipegate import metrics, status

    collector = getattr(metrics, f"{kind}_collector")(node)
    describe = getattr(status, f"{kind}_status")
    ops = AfterDrain(node)

    def current() -> dict:
        state = describe(node)
        if hub is not None:
            state.update(status.hub_status(hub))
        if acme is not None:
            state.update(status.acme_status(acme))
        return state

    more = () if hub is None else (metrics.hub_collector(hub),)
    if acme is not None:
        from pipegate.http.acme import acme_collector

        more += (acme_collector(acme),)
    # The relay's /status names every tunnel id: private unless asked for (docs/configuration.md).
    access = status.StatusAccess(status_token) if kind == "relay" else None
    status.add_ops(ops, description, collector, current, reactor, *more, access=access, limits=limits)
    ops.setServiceParent(top)
