"""
The counters every service keeps (L{Stats}), with no Prometheus import: the data paths
count here, and L{pipegate.metrics} turns the counts into metric families only when a
C{--metrics} listener is asked for.
"""

from __future__ import annotations

# name -> (help, label name or None); exported as pipegate_<name>_total.  A label "a,b"
# names two labels, and its values are "x,y".
COUNTERS: dict[str, tuple[str, str | None]] = {
    "requests": ("HTTP requests answered by the relay (public ones and /healthz), by status code.", "code"),
    "bytes": ("Payload bytes carried; up = caller/client towards the service, down = back.", "direction"),
    "admission_failures": ("Connector logins or mux links refused before admission, by reason.", "reason"),
    "policy_denials": ("Callers or clients refused by an ingress policy.", None),
    "caller_decisions": ("Public requests decided by the relay's ingress policy or a tunnel's visitor policy, "
                         "by tunnel and outcome.", "tunnel,outcome"),
    "throttled_seconds": ("Pause time imposed by shaping, by direction.", "direction"),
    "reconnects": ("Links to a relay or peer re-established after a loss.", None),
    "channel_opens": ("Channels the gateway tried to open on a provider, by result.", "result"),
    "dropped_datagrams": ("UDP datagrams dropped (policy, shaping, full link).", None),
    "drain_cut": ("Requests or channels still open when the drain timeout ended them.", None),
    "cap_refusals": ("Gate connections or UDP flows refused, and OPENs a provider refused, past a "
                     "connection or flow cap, by cap.", "cap"),
    "evicted_flows": ("Idle UDP flows closed early to make room in a full flow table.", None),
    "gate_bind_failures": ("Failed binds of a gate port (each is tried again later).", None),
    "held_datagrams_dropped": ("UDP datagrams of a new flow dropped because its hold (kept until the "
                               "channel opens) was full.", None),
    "acme_orders": ("ACME certificate orders started (first issuance and renewals).", None),
    "acme_failures": ("ACME orders that failed, by kind (unreachable, challenge, ca_error, rate_limited, "
                      "timeout).", "kind"),
    "connections_refused": ("Connections refused at accept, by the cap that refused them (per-source, "
                            "total) or emfile (accepting paused: no descriptors left).", "cap"),
    "caller_share_refusals": ("Public requests refused because their caller IP already held its share of "
                              "a tunnel's --max-in-flight slots.", None),
    "in_flight_refusals": ("Public requests refused with 503 because their tunnel had --max-in-flight requests "
                           "in flight, by tunnel ((offline) while no connector is logged in).", "tunnel"),
    "upgrades": ("Passthrough (Upgrade) requests by outcome: switched (101), refused (the app answered "
                 "otherwise), failed.", "result"),
}


class Stats:
    """Monotonic counters by (name, label value); a service owns one."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], float] = {}

    def inc(self, name: str, label: str = "", amount: float = 1) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name!r}")
        key = (name, label)
        self.counts[key] = self.counts.get(key, 0) + amount

    def get(self, name: str, label: str = "") -> float:
        return self.counts.get((name, label), 0)

    def by_label(self, name: str) -> dict[str, float]:
        return {label: value for (n, label), value in self.counts.items() if n == name}


def stats_of(obj) -> Stats:
    """The L{Stats} of a service, or a throwaway one for objects without (test doubles)."""
    stats = getattr(obj, "stats", None)
    return stats if isinstance(stats, Stats) else Stats()
