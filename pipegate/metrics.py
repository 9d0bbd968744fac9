"""
Prometheus metrics for every service, on a per-service registry.

Services keep plain numbers in a L{pipegate.stats.Stats} (no Prometheus import in the data paths); a
L{ServiceCollector} turns those counters, plus gauges read from the service's live state
(tunnels, links, gates, channels) at scrape time, into metric families.  Scrapes run on
the reactor thread (L{pipegate.status.OpsResource} renders synchronously), so collectors
read the live objects without locks.

Names follow the Prometheus conventions: C{pipegate_<what>_total} for counters, base
units (bytes, seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from pipegate.stats import COUNTERS, Stats

# A gauge: (name, help, label name or None, {label value: number})
Gauge = tuple[str, str, str | None, dict[str, float]]


class ServiceCollector(Collector):
    """
    Counters from C{stats} (C{counters} names which ones this service exports, plus any
    live additions from C{extra()}), and gauges from C{gauges()}.
    """

    def __init__(self, stats: Stats, counters: Iterable[str], gauges: Callable[[], list[Gauge]],
                 extra: Callable[[], dict[tuple[str, str], float]] | None = None, prefix: str = "") -> None:
        self.stats = stats
        self.counters = tuple(counters)
        self.gauges = gauges
        self.extra = extra
        self.prefix = "pipegate_" + prefix   # "pipegate_hub_" for the hub inside the relay

    def collect(self):
        counts = dict(self.stats.counts)
        if self.extra is not None:
            for key, value in self.extra().items():
                counts[key] = counts.get(key, 0) + value
        for name in self.counters:
            text, label = COUNTERS[name]
            family = CounterMetricFamily(self.prefix + name, text, labels=label.split(",") if label else None)
            if label:
                for (n, value), number in sorted(counts.items()):
                    if n == name:
                        family.add_metric(value.split(","), number)
            else:
                family.add_metric([], counts.get((name, ""), 0))
            yield family
        for name, text, label, values in self.gauges():
            family = GaugeMetricFamily(self.prefix + name, text, labels=[label] if label else None)
            for value, number in sorted(values.items()):
                family.add_metric([value] if label else [], number)
            yield family


def registry_for(*collectors: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry


# -- per service


def relay_collector(relay) -> ServiceCollector:
    def gauges() -> list[Gauge]:
        tunnels = list(relay.tunnels.values())
        return [
            ("tunnels", "Tunnels with at least one connector online.", None,
             {"": sum(1 for t in tunnels if t.links)}),
            ("connectors", "Connector links logged in.", None, {"": sum(len(t.links) for t in tunnels)}),
            ("requests_in_flight", "Public requests being carried.", None,
             {"": sum(t.in_flight for t in tunnels)}),
            ("draining", "1 while the service drains before stopping.", None, {"": int(relay.stopping)}),
        ]
    return ServiceCollector(relay.stats, ("requests", "bytes", "admission_failures", "policy_denials",
                                          "caller_decisions", "throttled_seconds", "drain_cut",
                                          "connections_refused", "caller_share_refusals", "in_flight_refusals",
                                          "upgrades"), gauges)


def hub_collector(hub) -> ServiceCollector:
    """The hub of C{pipegate-server --mux}: C{pipegate_hub_*}, next to the relay's metrics."""
    def gauges() -> list[Gauge]:
        routers = hub.core.summary().values()
        return [
            ("links", "Admitted hub links, by peer role.", "role",
             {role: sum(r[role + "s"] for r in routers) for role in ("provider", "gateway", "observer")}),
            ("routers", "Routers with at least one admitted link.", None, {"": len(routers)}),
            ("routes", "Routes announced to gateways, summed over routers.", None,
             {"": sum(r["routes"] for r in routers)}),
            ("channels", "Channels spliced through the hub (gateway to provider).", None,
             {"": sum(r["channels"] for r in routers)}),
        ]
    return ServiceCollector(hub.stats, ("admission_failures", "dropped_datagrams", "drain_cut"), gauges,
                            prefix="hub_")


def _link_gauges(links) -> dict[str, float]:
    from pipegate.mux.session import ROLE_NAMES

    roles = {name: 0 for name in ROLE_NAMES.values()}
    for link in links:
        roles[ROLE_NAMES.get(link.peer_role, "?")] = roles.get(ROLE_NAMES.get(link.peer_role, "?"), 0) + 1
    return roles


# Refusals past connection and flow caps, and flows evicted from a full table (issue 17).
EDGE_COUNTERS = ("cap_refusals", "evicted_flows")


def gateway_collector(gateway) -> ServiceCollector:
    def gauges() -> list[Gauge]:
        gates: dict[str, float] = {"tcp": 0, "udp": 0}
        for port, proto in gateway.gates:
            gates[proto] = gates.get(proto, 0) + 1
        return [
            ("links", "Admitted mux links, by peer role.", "role", _link_gauges(gateway.links)),
            ("gates", "Gate ports open, by protocol.", "protocol", gates),
            ("channels", "Client connections and UDP flows open, by protocol.", "protocol",
             {"tcp": len(gateway.tcp_clients),
              "udp": sum(len(g.flows) for _, g in gateway.gates.values() if g is not None)}),
            ("routes", "Routes announced by providers.", None,
             {"": sum(len(r) for r in gateway.routes.values())}),
            ("draining", "1 while the service drains before stopping.", None,
             {"": int(getattr(gateway, "draining", False))}),
        ]

    def extra():
        # Shaping pauses of connections still open (closed ones are in stats already).
        out: dict[tuple[str, str], float] = {}
        for client in gateway.tcp_clients:
            shaper = client.transport
            if hasattr(shaper, "read_throttled_seconds"):
                out[("throttled_seconds", "up")] = out.get(("throttled_seconds", "up"), 0) + \
                    shaper.read_throttled_seconds
                out[("throttled_seconds", "down")] = out.get(("throttled_seconds", "down"), 0) + \
                    shaper.write_throttled_seconds
        return out
    return ServiceCollector(gateway.stats, ("bytes", "admission_failures", "policy_denials",
                                            "throttled_seconds", "reconnects", "channel_opens",
                                            "dropped_datagrams", "drain_cut",
                                            *EDGE_COUNTERS, "held_datagrams_dropped"), gauges, extra)


def provider_collector(provider) -> ServiceCollector:
    def gauges() -> list[Gauge]:
        return [
            ("links", "Admitted mux links, by peer role.", "role", _link_gauges(provider.links)),
            ("services", "Services announced.", None, {"": len(provider.services)}),
            ("channels", "Channels open over all links.", None,
             {"": sum(link.channel_count() for link in provider.links)}),
        ]
    return ServiceCollector(provider.stats, ("bytes", "admission_failures", "reconnects", "drain_cut",
                                             *EDGE_COUNTERS), gauges)


def connector_collector(connector) -> ServiceCollector:
    def gauges() -> list[Gauge]:
        return [
            ("relay_links", "WebSocket links to the relay that are open.", None, {"": len(connector.links)}),
            ("streams", "Requests being forwarded to the local app.", None,
             {"": sum(len(link.session.streams) for link in connector.links if link.session)}),
        ]
    return ServiceCollector(connector.stats, ("reconnects", "admission_failures"), gauges)
