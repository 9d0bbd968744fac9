"""
The opt-in C{--metrics} listener of the relay, gateway and provider, wired one way.
"""

from __future__ import annotations

from twisted.application import service

from pipegate.drain import AfterDrain


def add_metrics_listener(top: service.MultiService, node, kind: str, description: str | None, reactor) -> None:
    """
    Serve C{/metrics} and C{/status} of C{node} (a relay, gateway or provider: C{kind})
    on server endpoint C{description}; nothing when it is None.  The listener sits in
    an L{AfterDrain}, so scrapes still answer while C{node} drains.  twisted.web and
    prometheus-client are imported only when a listener is asked for (about 4 MiB of
    idle RSS for the gateway and provider).
    """
    if not description:
        return
    from pipegate import metrics, status

    collector = getattr(metrics, f"{kind}_collector")(node)
    describe = getattr(status, f"{kind}_status")
    ops = AfterDrain(node)
    status.add_ops(ops, description, collector, lambda: describe(node), reactor)
    ops.setServiceParent(top)
