"""
Ingress policy: who may connect to a gate, with which labels and which bandwidth limit
(pure: no reactor, no sockets).  The rules and the decisions; a policy document is
parsed, merged and loaded by L{pipegate.core.policydoc}.

A policy document is Hypergate's (C{reference/hypergate.md} S{sect}4)::

    {"defaults": Rule?, "ips": {"<pattern>": Rule, ...}}     # the order of "ips" matters

with its tagged bugs fixed; C{docs/policy.md} is the user-facing description.  In short:

  - a matching rule without C{allow} inherits the C{allow} of its policy's C{defaults},
    which itself defaults to true (Hypergate refused it), and a rule that says nothing
    about bandwidth inherits the defaults' limit;
  - C{onlyPorts}/C{excludePorts} take C{[min, max]} or a list of C{{"from", "to"}}
    ranges (Hypergate silently ignored the second form);
  - anything invalid or unknown is an error naming the source and the place, never
    silently ignored (fail closed);
  - several policies are consulted in order by L{decide}: every C{ips} rule of every
    policy before any C{defaults}, so C{/unlimited} grants (L{Grants}) come first and
    expire on their own without touching any other rule.

Times are epoch milliseconds, passed in by the caller (C{now_ms}).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import attrs

__all__ = [
    "DEFAULT_DIRECTION",
    "DIRECTIONS",
    "EMPTY",
    "GRANT_LABEL",
    "BandwidthLimit",
    "Decision",
    "Grants",
    "Policy",
    "PolicyError",
    "Rule",
    "decide",
    "grant_rule",
    "normalize_ip",
    "parse_network",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DIRECTIONS = ("both", "upload", "download")
# What a bandwidthLimit without "direction" means: both directions, each with its own bucket
# (Hypergate shaped uploads only; our issue asks for both by default).
DEFAULT_DIRECTION = "both"
GRANT_LABEL = "gateway-unlimited"
GRANT_SECONDS = 1800
_VALUE_CHARS = 40
_PATTERN_CHARS = 60


class PolicyError(ValueError):
    """A policy cannot be loaded or is invalid; the message is one line naming the source and place."""


# ---------------------------------------------------------------------------
# Messages


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _show(value: Any, limit: int = _VALUE_CHARS) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(pattern: str) -> str:
    return _show(pattern, _PATTERN_CHARS) if isinstance(pattern, str) else _show(pattern)


# ---------------------------------------------------------------------------
# Model


def _finite_positive(name: str) -> Callable[[Any, Any, Any], None]:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if value is None and name == "burst_mbps":
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return check


def _check_direction(_instance: Any, _attribute: Any, value: Any) -> None:
    if value not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {value!r}")


@attrs.frozen
class BandwidthLimit:
    """
    A token-bucket limit: C{mbps} sustained (10**6 bits per second), a bucket of
    C{burst_mbps} (default C{mbps}) worth of one second, applied to C{direction}:
    C{"upload"} (client -> provider), C{"download"} (provider -> client) or C{"both"}
    (one bucket per direction, each at the full rate).
    """

    mbps: float = attrs.field(validator=_finite_positive("mbps"))
    burst_mbps: float | None = attrs.field(default=None, validator=_finite_positive("burst_mbps"))
    direction: str = attrs.field(default="both", validator=_check_direction)

    @property
    def rate(self) -> float:
        """Sustained rate in bytes per second."""
        return self.mbps * 1e6 / 8

    @property
    def burst(self) -> float:
        """Bucket capacity in bytes."""
        return (self.burst_mbps or self.mbps) * 1e6 / 8

    @property
    def shapes_upload(self) -> bool:
        """Whether client -> provider bytes are shaped."""
        return self.direction in ("both", "upload")

    @property
    def shapes_download(self) -> bool:
        """Whether provider -> client bytes are shaped."""
        return self.direction in ("both", "download")


def _port_ranges(value: Any) -> tuple[tuple[int, int], ...] | None:
    if value is None:
        return None
    return tuple((int(low), int(high)) for low, high in value)


def _optional_frozenset(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError("expected a collection of protocol names, not a string")
    return frozenset(p.lower() for p in value)


def _labels(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("expected a sequence of labels, not a string")
    return tuple(value)


def _in_ranges(port: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(low <= port <= high for low, high in ranges)


@attrs.frozen
class Rule:
    """
    One rule of C{defaults} or C{ips}.

    C{allow} None means "not said": inherited from the policy's defaults (L{decide}).
    C{limit} None with C{unlimited} False means "not said" too (inherit the defaults'
    limit); C{unlimited} True means explicitly no limit (C{bandwidthLimit: null} or
    C{mbps: 0}).  C{expire_at} is in epoch ms.
    """

    allow: bool | None = None
    limit: BandwidthLimit | None = None
    unlimited: bool = False
    labels: tuple[str, ...] = attrs.field(default=(), converter=_labels)
    expire_at: float | None = None
    desc: str = ""
    only_ports: tuple[tuple[int, int], ...] | None = attrs.field(default=None, converter=_port_ranges)
    exclude_ports: tuple[tuple[int, int], ...] | None = attrs.field(default=None, converter=_port_ranges)
    only_protocols: frozenset[str] | None = attrs.field(default=None, converter=_optional_frozenset)
    exclude_protocols: frozenset[str] | None = attrs.field(default=None, converter=_optional_frozenset)

    def __attrs_post_init__(self) -> None:
        if self.unlimited and self.limit is not None:
            raise ValueError("a rule cannot be unlimited and have a limit")

    @property
    def says_bandwidth(self) -> bool:
        """Whether the rule sets its own bandwidth (a limit, or explicitly none)."""
        return self.unlimited or self.limit is not None

    @property
    def qualified(self) -> bool:
        """Whether the rule has a port or protocol qualifier."""
        return any(q is not None for q in (
            self.only_ports, self.exclude_ports, self.only_protocols, self.exclude_protocols))

    def applies(self, port: int, protocol: str) -> bool:
        """Whether the port and protocol qualifiers let this rule apply to C{port}/C{protocol}."""
        protocol = protocol.lower()
        if self.only_ports is not None and not _in_ranges(port, self.only_ports):
            return False
        if self.exclude_ports is not None and _in_ranges(port, self.exclude_ports):
            return False
        if self.only_protocols is not None and protocol not in self.only_protocols:
            return False
        if self.exclude_protocols is not None and protocol in self.exclude_protocols:
            return False
        return True

    def expired(self, now_ms: float) -> bool:
        """True from the moment C{now_ms} reaches C{expire_at} (equal counts as expired)."""
        return self.expire_at is not None and self.expire_at <= now_ms


def normalize_ip(text: str) -> Address:
    """
    The address C{text} names: surrounding space and an IPv6 zone (C{%eth0}) removed,
    and an IPv4-mapped IPv6 address (C{::ffff:a.b.c.d}) turned into IPv4.  Raises
    L{PolicyError} if it is not an IP address.
    """
    if not isinstance(text, str):
        raise PolicyError(f"not an IP address: {_show(text)}")
    try:
        return _address(text.strip().split("%", 1)[0])
    except ValueError:
        raise PolicyError(f"not an IP address: {_show(text)}") from None


@functools.lru_cache(maxsize=1024)   # once per connection or flow (L{decide}); clients come back
def _address(text: str) -> Address:
    """L{normalize_ip}'s parse of a stripped address (ValueError if it is none; not cached)."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(pattern: str) -> Network | None:
    """None for C{*}, else the network the pattern covers; ValueError if invalid."""
    text = pattern.strip()
    if text == "*":
        return None
    if not text:
        raise ValueError("empty")
    if "/" in text:
        base, prefix = text.rsplit("/", 1)
        base = base.split("%", 1)[0]
        if not (prefix.isascii() and prefix.isdigit()):
            raise ValueError("bad prefix")
        network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    else:
        network = ipaddress.ip_network(normalize_ip(text))
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _compile_patterns(ips: tuple[tuple[str, Rule], ...]) -> tuple[Network | None, ...]:
    networks = []
    for pattern, _rule in ips:
        try:
            networks.append(parse_network(pattern))
        except (ValueError, TypeError, AttributeError):
            raise PolicyError(
                f"ips[{_key(pattern)}]: invalid pattern: expected \"*\", an IP address or a CIDR"
            ) from None
    return tuple(networks)


@attrs.frozen
class Policy:
    """
    A parsed policy document: C{defaults} and the C{ips} rules as C{(pattern, rule)}
    pairs in written order.  Patterns are checked when the policy is built.
    """

    defaults: Rule | None = None
    ips: tuple[tuple[str, Rule], ...] = attrs.field(default=(), converter=lambda v: tuple(map(tuple, v)))
    _networks: tuple[Network | None, ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_networks", _compile_patterns(self.ips))

    @property
    def empty(self) -> bool:
        return self.defaults is None and not self.ips

    def matches(self, address: Address) -> list[tuple[str, Rule]]:
        """The C{(pattern, rule)} pairs whose pattern covers C{address}, in order (no other check)."""
        return [
            entry for entry, network in zip(self.ips, self._networks)
            if network is None or (network.version == address.version and address in network)
        ]

    def live_defaults(self, now_ms: float) -> Rule | None:
        """C{defaults}, unless absent or expired at C{now_ms}."""
        if self.defaults is None or self.defaults.expired(now_ms):
            return None
        return self.defaults


EMPTY = Policy()
Policy.EMPTY = EMPTY  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# Decisions


@attrs.frozen
class Decision:
    """
    The outcome for one connection or flow.  C{matched} is the C{ips} pattern, C{"defaults"},
    or None when no policy said anything.  C{limit} is the effective limit (None = unlimited,
    always None when C{allow} is False); C{rule} is the rule as written.
    """

    allow: bool
    labels: tuple[str, ...] = ()
    limit: BandwidthLimit | None = None
    rule: Rule | None = None
    matched: str | None = None


def decide(policies: Sequence[Policy | None], ip: str, port: int, protocol: str,
           now_ms: float) -> Decision:
    """
    Decide for client C{ip} reaching gate C{port}/C{protocol} at C{now_ms}.

    The C{ips} rules of C{policies[0]} in written order, then those of C{policies[1]}, and
    so on: the first whose pattern covers the IP, that has not expired and whose qualifiers
    apply, wins.  Only if none does, the first unexpired C{defaults} in policy order
    applies.  Otherwise the client is admitted with no limit.  None entries are skipped.
    Raises L{PolicyError} if C{ip} is not an IP address.
    """
    address = normalize_ip(ip)
    protocol = protocol.lower()
    present = [p for p in policies if p is not None]
    for policy in present:
        for pattern, rule in policy.matches(address):
            if rule.expired(now_ms) or not rule.applies(port, protocol):
                continue
            return _decision(rule, pattern, policy.live_defaults(now_ms))
    for policy in present:
        defaults = policy.live_defaults(now_ms)
        if defaults is not None:
            return _decision(defaults, "defaults", None)
    return Decision(allow=True)


def _decision(rule: Rule, matched: str, defaults: Rule | None) -> Decision:
    allow = rule.allow
    if allow is None:
        allow = defaults.allow if defaults is not None and defaults.allow is not None else True
    if not allow:
        return Decision(allow=False, labels=rule.labels, limit=None, rule=rule, matched=matched)
    if rule.says_bandwidth or defaults is None:
        limit = rule.limit
    else:
        limit = defaults.limit
    return Decision(allow=True, labels=rule.labels, limit=limit, rule=rule, matched=matched)


# ---------------------------------------------------------------------------
# /unlimited grants


def grant_rule(now_ms: float, duration_s: float = GRANT_SECONDS) -> Rule:
    """The rule an accepted C{/unlimited} token installs: admitted, unlimited, for C{duration_s}."""
    return Rule(allow=True, unlimited=True, labels=(GRANT_LABEL,), desc=GRANT_LABEL,
                expire_at=now_ms + duration_s * 1000)


@attrs.define
class Grants:
    """
    The gateway's live C{/unlimited} grants, one per client IP (pure, mutable).

    Pass C{grants.policy(now)} first to L{decide}: a grant beats every operator and
    provider rule, and when it expires only the grant goes away.
    """

    _expiry: dict[str, float] = attrs.field(factory=dict)

    def grant(self, ip: str, now_ms: float, duration_s: float = GRANT_SECONDS) -> float:
        """Grant (or extend) C{ip} until C{now_ms + duration_s}; return that expiry in epoch ms."""
        if isinstance(duration_s, bool) or not isinstance(duration_s, (int, float)) \
                or not math.isfinite(duration_s) or duration_s <= 0:
            raise PolicyError(f"grant duration must be a finite number of seconds > 0, got {duration_s!r}")
        key = str(normalize_ip(ip))
        self._prune(now_ms)
        expire_at = max(now_ms + duration_s * 1000, self._expiry.get(key, 0.0))
        self._expiry[key] = expire_at
        return expire_at

    def expiry(self, ip: str, now_ms: float) -> float | None:
        """When C{ip}'s grant ends (epoch ms), or None if it has none at C{now_ms}."""
        expire_at = self._expiry.get(str(normalize_ip(ip)))
        return expire_at if expire_at is not None and expire_at > now_ms else None

    def policy(self, now_ms: float) -> Policy:
        """The grants live at C{now_ms} as an ips-only policy of exact-IP rules; expired grants are dropped."""
        self._prune(now_ms)
        if not self._expiry:
            return EMPTY   # (the usual case, once per connection: no Policy built)
        return Policy(ips=tuple(
            (ip, Rule(allow=True, unlimited=True, labels=(GRANT_LABEL,), desc=GRANT_LABEL,
                      expire_at=expire_at))
            for ip, expire_at in self._expiry.items()
        ))

    def __len__(self) -> int:
        return len(self._expiry)

    def _prune(self, now_ms: float) -> None:
        for ip in [ip for ip, expire_at in self._expiry.items() if expire_at <= now_ms]:
            del self._expiry[ip]
