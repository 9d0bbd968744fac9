"""
Ingress policy documents (pure: no reactor, no sockets): parsing a decoded JSON document
into a L{pipegate.core.policy.Policy}, deep-merging several sources, loading them
(L{pipegate.core.source}) and the compact bytes a provider ships to gateways in its
routes.  C{docs/policy.md} describes the format; anything invalid or unknown is a
L{PolicyError} naming the source and the place, never silently ignored (fail closed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

# _key, _one_line and _show shape values in messages the same way in both halves of the policy.
from pipegate.core.policy import (
    DEFAULT_DIRECTION, DIRECTIONS, EMPTY, BandwidthLimit, Policy, PolicyError, Rule, _key, _one_line,
    _show, parse_network,
)
from pipegate.core.source import Fetch, SourceError, load_source, source_label

__all__ = [
    "MAX_POLICY_BYTES",
    "load_policy",
    "merge_documents",
    "parse_policy",
    "policy_from_bytes",
]

PROTOCOLS = ("tcp", "udp")
# The merged document travels in a ROUTES frame as a str16 field (docs/protocol.md 2.3.2).
MAX_POLICY_BYTES = 0xFFFF
# Keys dropped at every level when merging (prototype pollution in Hypergate's JavaScript).
FORBIDDEN_KEYS = frozenset({"__proto__", "prototype", "constructor"})
# A valid policy is at most 5 levels deep; anything much deeper is refused before merging.
_MAX_DEPTH = 32

_TOP_FIELDS = ("defaults", "ips")
_RULE_FIELDS = (
    "allow", "bandwidthLimit", "labels", "expireAt", "desc",
    "onlyPorts", "excludePorts", "onlyProtocols", "excludeProtocols",
)
_QUALIFIERS = ("onlyPorts", "excludePorts", "onlyProtocols", "excludeProtocols")
_LIMIT_FIELDS = ("mbps", "burstMbps", "direction")
_RANGE_FIELDS = ("from", "to")


# ---------------------------------------------------------------------------
# Parsing


def _place(path: Sequence[str | int]) -> str:
    """C{("ips", "10.0.0.0/8", "onlyPorts", 1, "from")} -> C{ips["10.0.0.0/8"]: onlyPorts[1]: from}."""
    parts: list[str] = []
    for index, item in enumerate(path):
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
        elif index == 1 and path[0] == "ips":
            parts[-1] += f"[{_key(item)}]"
        else:
            parts.append(item)
    return ": ".join(parts)


class _Invalid(Exception):
    """An invalid value at C{path}; becomes C{<source>: <place>: <message>}."""

    def __init__(self, path: Sequence[str | int], message: str,
                 blame: Sequence[str | int] | None = None) -> None:
        super().__init__(message)
        self.path = tuple(path)
        self.message = message
        # Where to look for the source to name, when it differs from the place shown.
        self.blame = self.path if blame is None else tuple(blame)

    def text(self, label: str) -> str:
        place = _place(self.path)
        return f"{label}: {place}: {self.message}" if place else f"{label}: {self.message}"


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_fields(value: Any, path: tuple, known: tuple[str, ...], what: str) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(path, f"must be {what}, got {_show(value)}")
    for name in value:
        if name not in known:
            raise _Invalid(path, f"unknown field {_show(name)} (known: {', '.join(known)})",
                           blame=path + (name,))
    return value


def _port_number(value: Any, path: tuple) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _Invalid(path, f"must be an integer 1-65535, got {_show(value)}")
    return value


def _parse_ports(value: Any, path: tuple) -> tuple[tuple[int, int], ...]:
    forms = 'expected [min, max] or a list of {"from": min, "to": max}'
    if not isinstance(value, list) or not value:
        raise _Invalid(path, f"{forms}, got {_show(value)}")
    if all(not isinstance(item, dict) for item in value):
        if len(value) != 2:
            raise _Invalid(path, f"{forms}, got {_show(value)}")
        low = _port_number(value[0], path + (0,))
        high = _port_number(value[1], path + (1,))
        if low > high:
            raise _Invalid(path, f"min {low} is greater than max {high}")
        return ((low, high),)
    ranges = []
    for index, item in enumerate(value):
        where = path + (index,)
        if not isinstance(item, dict):
            raise _Invalid(where, f"{forms}, got {_show(item)}")
        _check_fields(item, where, _RANGE_FIELDS, 'an object {"from": min, "to": max}')
        for name in _RANGE_FIELDS:
            if name not in item:
                raise _Invalid(where + (name,), "missing")
        low = _port_number(item["from"], where + ("from",))
        high = _port_number(item["to"], where + ("to",))
        if low > high:
            raise _Invalid(where, f"from {low} is greater than to {high}")
        ranges.append((low, high))
    return tuple(ranges)


def _parse_protocols(value: Any, path: tuple, allow_empty: bool) -> frozenset[str]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise _Invalid(path, f'expected a non-empty list of "tcp" / "udp", got {_show(value)}')
    protocols = set()
    for index, item in enumerate(value):
        if not isinstance(item, str) or item.lower() not in PROTOCOLS:
            raise _Invalid(path + (index,), f'must be "tcp" or "udp", got {_show(item)}')
        protocols.add(item.lower())
    return frozenset(protocols)


def _parse_labels(value: Any, path: tuple) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(path, f"expected a list of strings, got {_show(value)}")
    labels: dict[str, None] = {}
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item or "," in item:
            raise _Invalid(path + (index,), f"must be a non-empty string without commas, got {_show(item)}")
        labels[item] = None
    return tuple(labels)


def _parse_limit(value: Any, path: tuple) -> tuple[BandwidthLimit | None, bool]:
    """C{(limit, unlimited)} for a C{bandwidthLimit} value."""
    if value is None:
        return None, True
    _check_fields(value, path, _LIMIT_FIELDS, 'an object {"mbps": n, "burstMbps": n?, "direction": s?} or null')
    if "mbps" not in value:
        raise _Invalid(path + ("mbps",), "missing")
    mbps = value["mbps"]
    if not _is_number(mbps) or mbps < 0:
        raise _Invalid(path + ("mbps",), f"must be a finite number >= 0 (0 = unlimited), got {_show(mbps)}")
    burst = value.get("burstMbps")
    if burst is not None and (not _is_number(burst) or burst <= 0):
        raise _Invalid(path + ("burstMbps",), f"must be a finite number > 0, got {_show(burst)}")
    direction = value.get("direction")
    if direction is None:
        direction = DEFAULT_DIRECTION
    elif not isinstance(direction, str) or direction.lower() not in DIRECTIONS:
        raise _Invalid(path + ("direction",),
                       f'must be "both", "upload" or "download", got {_show(direction)}')
    if mbps == 0:
        return None, True
    return BandwidthLimit(mbps=mbps, burst_mbps=burst, direction=direction.lower()), False


def _parse_rule(value: Any, path: tuple, is_defaults: bool = False) -> Rule:
    rule = _check_fields(value, path, _RULE_FIELDS, "an object")
    if is_defaults:
        for name in _QUALIFIERS:
            if rule.get(name) is not None:
                raise _Invalid(path + (name,), 'not allowed in defaults (use an ips rule with "*")')
    fields: dict[str, Any] = {}
    allow = rule.get("allow")
    if allow is not None:
        if not isinstance(allow, bool):
            raise _Invalid(path + ("allow",), f"must be true or false, got {_show(allow)}")
        fields["allow"] = allow
    if "bandwidthLimit" in rule:
        fields["limit"], fields["unlimited"] = _parse_limit(rule["bandwidthLimit"], path + ("bandwidthLimit",))
    if rule.get("labels") is not None:
        fields["labels"] = _parse_labels(rule["labels"], path + ("labels",))
    expire_at = rule.get("expireAt")
    if expire_at is not None:
        if not _is_number(expire_at):
            raise _Invalid(path + ("expireAt",), f"must be a number (epoch milliseconds), got {_show(expire_at)}")
        fields["expire_at"] = expire_at
    desc = rule.get("desc")
    if desc is not None:
        if not isinstance(desc, str):
            raise _Invalid(path + ("desc",), f"must be a string, got {_show(desc)}")
        fields["desc"] = desc
    for name, attr in (("onlyPorts", "only_ports"), ("excludePorts", "exclude_ports")):
        if rule.get(name) is not None:
            fields[attr] = _parse_ports(rule[name], path + (name,))
    for name, attr in (("onlyProtocols", "only_protocols"), ("excludeProtocols", "exclude_protocols")):
        if rule.get(name) is not None:
            fields[attr] = _parse_protocols(rule[name], path + (name,), allow_empty=name.startswith("exclude"))
    return Rule(**fields)


def _parse(doc: Any) -> Policy:
    top = _check_fields(doc, (), _TOP_FIELDS, "a JSON object")
    defaults = None
    if top.get("defaults") is not None:
        defaults = _parse_rule(top["defaults"], ("defaults",), is_defaults=True)
    ips: list[tuple[str, Rule]] = []
    raw_ips = top.get("ips")
    if raw_ips is not None:
        if not isinstance(raw_ips, dict):
            raise _Invalid(("ips",), f"must be an object of pattern: rule, got {_show(raw_ips)}")
        for pattern, rule in raw_ips.items():
            path = ("ips", pattern)
            try:
                parse_network(pattern)
            except (ValueError, PolicyError):
                raise _Invalid(path, 'invalid pattern: expected "*", an IP address or a CIDR') from None
            if rule is None:
                continue  # a later source deleted this rule
            ips.append((pattern, _parse_rule(rule, path)))
    return Policy(defaults=defaults, ips=tuple(ips))


def parse_policy(doc: object, source: str) -> Policy:
    """
    The L{Policy} of a decoded JSON document; C{source} names it in messages.  Anything
    invalid or unknown raises L{PolicyError}.
    """
    try:
        return _parse(doc)
    except _Invalid as e:
        raise PolicyError(e.text(_one_line(source))) from None


# ---------------------------------------------------------------------------
# Merging, loading


def _clean(value: Any, path: tuple, depth: int = 0) -> Any:
    """A copy of C{value} with the forbidden keys dropped at every level."""
    if depth > _MAX_DEPTH:
        raise _Invalid(path, f"nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        return {k: _clean(v, path + (k,), depth + 1) for k, v in value.items() if k not in FORBIDDEN_KEYS}
    if isinstance(value, list):
        return [_clean(v, path + (i,), depth + 1) for i, v in enumerate(value)]
    return value


def _merge_into(target: dict, source: dict) -> None:
    for key, value in source.items():
        if isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                target[key] = {}
            _merge_into(target[key], value)
        else:
            target[key] = value


def _merge_clean(docs: Sequence[dict]) -> dict:
    merged: dict = {}
    for doc in docs:
        _merge_into(merged, doc)
    return merged


def merge_documents(docs: Sequence[object]) -> dict:
    """
    Deep-merge JSON objects left to right: objects merge, later scalars, arrays and
    nulls replace; C{__proto__}, C{prototype} and C{constructor} are dropped at every
    level; keys keep their first-appearance order.  The inputs are not modified.
    """
    return _merge_clean([_cleaned(doc, f"document {index}", "a JSON object") for index, doc in enumerate(docs)])


def _cleaned(doc: object, label: str, expected: str) -> dict:
    """C{doc} (from C{label}) without its dropped keys; not an object: L{PolicyError}."""
    if not isinstance(doc, dict):
        raise PolicyError(f"{label}: expected {expected}, got {_show(doc)}")
    try:
        return _clean(doc, ())
    except _Invalid as e:
        raise PolicyError(e.text(label)) from None


def _depth_in(doc: Any, path: tuple) -> int:
    """How many leading elements of C{path} exist in C{doc}."""
    depth = 0
    for item in path:
        if isinstance(item, str) and isinstance(doc, dict) and item in doc:
            doc = doc[item]
        elif isinstance(item, int) and isinstance(doc, list) and 0 <= item < len(doc):
            doc = doc[item]
        else:
            break
        depth += 1
    return depth


def _blame(labels: Sequence[str], docs: Sequence[dict], path: tuple) -> str:
    """
    How to name the source of an error in the merged document at C{path}: the last source
    that reaches deepest into C{path}, with its position when there are several.
    """
    best, best_depth = len(labels) - 1, -1
    for index, doc in enumerate(docs):
        depth = _depth_in(doc, path)
        if depth >= best_depth:
            best, best_depth = index, depth
    if len(labels) == 1:
        return labels[0]
    return f"{labels[best]} (source {best + 1} of {len(labels)}, merged)"


def _encode(merged: dict) -> bytes:
    return json.dumps(merged, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def load_policy(sources: Sequence[str], fetch: Fetch | None = None) -> tuple[Policy, bytes]:
    """
    Load every source (inline JSON, an http(s) URL read with C{fetch}, or a file; see
    L{load_source}), merge them left to right, and parse the result.

    Returns the L{Policy} and the merged document as compact UTF-8 JSON for shipping to
    gateways.  No sources: C{(EMPTY, b"")}.  Any failure, in any source, raises
    L{PolicyError} naming the source: nothing is skipped.
    """
    if not sources:
        return EMPTY, b""
    labels: list[str] = []
    docs: list[dict] = []
    for source in sources:
        label = source_label(source)
        try:
            doc = load_source(source, fetch)
        except SourceError as e:
            raise PolicyError(str(e)) from None
        docs.append(_cleaned(doc, label, 'a JSON object {"defaults": ..., "ips": ...}'))
        labels.append(label)
    merged = _merge_clean(docs)
    try:
        policy = _parse(merged)
    except _Invalid as e:
        raise PolicyError(e.text(_blame(labels, docs, e.blame))) from None
    data = _encode(merged)
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(
            f"{', '.join(labels)}: merged policy is {len(data)} bytes; routes carry at most {MAX_POLICY_BYTES}"
        )
    return policy, data


def policy_from_bytes(data: bytes, source: str) -> Policy:
    """
    The L{Policy} of shipped bytes (as L{load_policy} returns them); empty bytes give
    L{EMPTY}.  Invalid UTF-8, JSON or content raises L{PolicyError} naming C{source}.
    """
    label = _one_line(source)
    if not data:
        return EMPTY
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PolicyError(f"{label}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise PolicyError(f"{label}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:
        raise PolicyError(f"{label}: invalid JSON: {_one_line(str(e))}") from None
    return parse_policy(doc, label)
