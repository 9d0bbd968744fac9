"""
Service lists and gateway filters for the port plane (pure: no reactor, no sockets).

A provider's C{--services} SOURCE (or C{--service} in short form, L{parse_service_spec})
and a gateway's C{--filter} SOURCE are either inline
JSON (starting with C{[} or C{{}), an C{http(s)://} URL read through a caller-supplied
C{fetch(url) -> bytes}, or a file path (read by L{pipegate.core.source}).  The JSON follows Hypergate's C{services.json}:
a list of entries, or C{{"services": [...]}} with any other top-level keys ignored.

Differences from Hypergate, on purpose:
  - an invalid entry stops loading with one line naming the source, the entry index
    (0-based, as in C{services[2]}) and the field, instead of being logged and skipped;
  - an unknown protocol is an error instead of silently meaning tcp; unknown fields
    are errors too;
  - two different services on the same (gatePort, protocol) are an error;
  - gateway filters are ORed (a service needs to match one of them), and the
    C{only_*} restrictions of L{Exposure} apply with or without filters.

Every L{ServiceError} message is a single line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import attrs

from pipegate.core.source import Fetch, SourceError, load_source, source_label

__all__ = [
    "Exposure",
    "Filter",
    "Service",
    "ServiceError",
    "load_filters",
    "load_services",
    "merge_services",
    "parse_filters",
    "parse_only_services",
    "parse_service_spec",
    "parse_services",
]

PROTOCOLS = ("tcp", "udp")
# Hypergate's wire encoding, also accepted in JSON: 0 is tcp, 1 is udp.
_PROTOCOL_NUMBERS = {0: "tcp", 1: "udp"}
_FIELDS = ("gatePort", "serviceHost", "servicePort", "protocol", "tags")
_VALUE_CHARS = 40


class ServiceError(SourceError):
    """A service or filter source cannot be loaded or is invalid; the message is one line."""


@attrs.frozen
class Service:
    """One advertised service: clients of gateway port C{gate_port} reach C{service_host:service_port}."""

    gate_port: int
    service_host: str
    service_port: int
    protocol: str = "tcp"
    tags: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    proxy_protocol: str | None = None  # "v1" or "v2": send a PROXY header to the backend (TCP)

    @property
    def key(self) -> tuple[int, str]:
        """What a gateway listens on: C{(gate_port, protocol)}."""
        return (self.gate_port, self.protocol)

    def describe(self) -> str:
        """C{8080/tcp -> localhost:80 [web]}, for messages and logs."""
        text = f"{self.gate_port}/{self.protocol} -> {self.service_host}:{self.service_port}"
        if self.tags:
            text += f" [{' '.join(self.tags)}]"
        return text


@attrs.frozen
class Filter:
    """
    One gateway filter: every field that is set must match, and every tag in C{tags}
    must be among the service's tags.  An empty filter matches everything.
    """

    gate_port: int | None = None
    service_host: str | None = None
    service_port: int | None = None
    protocol: str | None = None
    tags: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def matches(self, service: Service) -> bool:
        if self.gate_port is not None and service.gate_port != self.gate_port:
            return False
        if self.service_host is not None and service.service_host != self.service_host:
            return False
        if self.service_port is not None and service.service_port != self.service_port:
            return False
        if self.protocol is not None and service.protocol.lower() != self.protocol.lower():
            return False
        return set(self.tags).issubset(service.tags)


@attrs.frozen
class Exposure:
    """
    Which advertised services a gateway opens ports for.

    With C{filters}, a service must match at least one of them.  Independently of the
    filters, a non-empty C{only_services} requires C{service_host} to be listed,
    C{only_published} requires the tag C{published} and C{only_docker} the tag
    C{docker}.  With nothing set, everything is exposed.
    """

    filters: tuple[Filter, ...] = attrs.field(default=(), converter=tuple)
    only_services: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    only_published: bool = False
    only_docker: bool = False

    def exposes(self, service: Service) -> bool:
        if self.filters and not any(f.matches(service) for f in self.filters):
            return False
        if self.only_services and service.service_host not in self.only_services:
            return False
        if self.only_published and "published" not in service.tags:
            return False
        if self.only_docker and "docker" not in service.tags:
            return False
        return True


def parse_only_services(csv: str) -> frozenset[str]:
    """C{"a, b,,c"} -> C{{"a", "b", "c"}}: a comma list, items stripped, empty items ignored."""
    return frozenset(item.strip() for item in csv.split(",") if item.strip())


# ---------------------------------------------------------------------------
# Sources


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _short(value: Any, limit: int = _VALUE_CHARS) -> str:
    text = _one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load(source: str, fetch: Fetch | None) -> object:
    """L{load_source}, with its failures as L{ServiceError}s."""
    try:
        return load_source(source, fetch)
    except ServiceError:
        raise
    except SourceError as e:
        raise ServiceError(str(e)) from None


# ---------------------------------------------------------------------------
# Entries


class _FieldError(Exception):
    """One invalid entry; the message goes after C{<source>: entry <n>: }."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)


def _port(entry: dict, field: str) -> int:
    value = entry[field]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _FieldError(field, f"must be an integer 1-65535, got {_short(value)}")
    return value


def _host(entry: dict, field: str) -> str:
    value = entry[field]
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise _FieldError(field, f"must be a non-empty host name without spaces, got {_short(value)}")
    return value


def _protocol(entry: dict, field: str) -> str:
    value = entry[field]
    if isinstance(value, str) and value.lower() in PROTOCOLS:
        return value.lower()
    if not isinstance(value, bool) and isinstance(value, int) and value in _PROTOCOL_NUMBERS:
        return _PROTOCOL_NUMBERS[value]
    raise _FieldError(field, f'must be "tcp" or "udp" (or 0 / 1), got {_short(value)}')


def _tags(entry: dict, field: str) -> tuple[str, ...]:
    value = entry[field]
    if not isinstance(value, str):
        raise _FieldError(field, f"must be a string of space-separated words, got {_short(value)}")
    return tuple(dict.fromkeys(value.split()))


def _check_fields(entry: object, known: tuple[str, ...] = _FIELDS) -> dict:
    if not isinstance(entry, dict):
        raise _FieldError(None, f"must be an object, got {_short(entry)}")
    unknown = [name for name in entry if name not in known]
    if unknown:
        raise _FieldError(None, f"unknown field {_short(unknown[0])} (known: {', '.join(known)})")
    return entry


def _proxy_protocol(entry: dict, field: str) -> str | None:
    value = entry[field]
    if value is None:
        return None
    if value not in ("v1", "v2"):
        raise _FieldError(field, f'must be "v1", "v2" or null, got {_short(value)}')
    if str(entry.get("protocol", "tcp")).lower() not in ("tcp", "0"):
        raise _FieldError(field, "is supported for tcp services only")
    return value


def _entries(doc: object, label: str, what: str) -> list:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        if "services" not in doc:
            raise ServiceError(f'{label}: expected a list of {what} or an object with a "services" list')
        entries = doc["services"]
        if not isinstance(entries, list):
            raise ServiceError(f'{label}: "services" must be a list, got {_short(entries)}')
        return entries
    raise ServiceError(
        f'{label}: expected a list of {what} or an object with a "services" list, got {_short(doc)}'
    )


def _parse_service(entry: object) -> Service:
    entry = _check_fields(entry, _FIELDS + ("proxyProtocol",))
    for name in ("gatePort", "serviceHost", "servicePort"):
        if name not in entry:
            raise _FieldError(name, "missing")
    return Service(
        gate_port=_port(entry, "gatePort"),
        service_host=_host(entry, "serviceHost"),
        service_port=_port(entry, "servicePort"),
        protocol=_protocol(entry, "protocol") if "protocol" in entry else "tcp",
        tags=_tags(entry, "tags") if "tags" in entry else (),
        proxy_protocol=_proxy_protocol(entry, "proxyProtocol") if "proxyProtocol" in entry else None,
    )


def parse_services(doc: object, source: str) -> list[Service]:
    """
    The services of a parsed C{services.json} document, in order, exact duplicates dropped.

    C{source} names the document in messages (see L{source_label}).  Any invalid entry,
    or two different services on one C{(gatePort, protocol)}, raises L{ServiceError}.
    """
    label = _one_line(source)
    services: list[Service] = []
    claimed: dict[tuple[int, str], tuple[int, Service]] = {}
    for index, entry in enumerate(_entries(doc, label, "services")):
        try:
            service = _parse_service(entry)
        except _FieldError as e:
            raise ServiceError(f"{label}: entry {index}: {e}") from None
        if service.key in claimed:
            first_index, first = claimed[service.key]
            if first == service:
                continue
            raise ServiceError(
                f"{label}: entry {index}: gatePort {service.gate_port}/{service.protocol} is ambiguous:"
                f" entry {first_index} already maps it to {first.service_host}:{first.service_port}"
                f"{_tag_note(first)}"
            )
        claimed[service.key] = (index, service)
        services.append(service)
    return services


_SPEC = re.compile(r"(?P<gate>\d{1,5}):(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]/]+))"
                   r":(?P<port>\d{1,5})(?:/(?P<protocol>[Tt][Cc][Pp]|[Uu][Dd][Pp]))?")


def parse_service_spec(spec: str) -> Service:
    """
    One service in the short form of C{--service}: C{GATE_PORT:HOST:PORT}, C{/udp} after it
    for UDP (C{2222:127.0.0.1:22}, C{5353:192.168.1.10:53/udp}, C{8080:[::1]:80}), as
    C{ssh -R} writes a forwarding; L{ServiceError} names what is wrong.
    """
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        raise ServiceError(f"{_short(spec)}: expected GATE_PORT:HOST:PORT, with /udp after it for UDP"
                           " (e.g. 2222:127.0.0.1:22 or 5353:192.168.1.10:53/udp)")
    entry = {"gatePort": int(match["gate"]), "serviceHost": match["v6"] or match["host"],
             "servicePort": int(match["port"]), "protocol": match["protocol"] or "tcp"}
    try:
        return _parse_service(entry)
    except _FieldError as e:
        raise ServiceError(f"{_short(spec)}: {e}") from None


def _tag_note(service: Service) -> str:
    return f" [{' '.join(service.tags)}]" if service.tags else ""


def merge_services(lists: Iterable[Iterable[Service]]) -> list[Service]:
    """
    Concatenate service lists (e.g. one per C{--services}), keeping order and dropping
    exact duplicates; two different services on one C{(gate_port, protocol)} raise
    L{ServiceError}.
    """
    merged: list[Service] = []
    claimed: dict[tuple[int, str], Service] = {}
    for services in lists:
        for service in services:
            first = claimed.get(service.key)
            if first is None:
                claimed[service.key] = service
                merged.append(service)
            elif first != service:
                raise ServiceError(
                    f"gatePort {service.gate_port}/{service.protocol} is ambiguous:"
                    f" {first.describe()} and {service.describe()}"
                )
    return merged


def _parse_filter(entry: object) -> Filter:
    entry = _check_fields(entry)
    return Filter(
        gate_port=_port(entry, "gatePort") if "gatePort" in entry else None,
        service_host=_host(entry, "serviceHost") if "serviceHost" in entry else None,
        service_port=_port(entry, "servicePort") if "servicePort" in entry else None,
        protocol=_protocol(entry, "protocol") if "protocol" in entry else None,
        tags=_tags(entry, "tags") if "tags" in entry else (),
    )


def parse_filters(doc: object, source: str) -> list[Filter]:
    """
    The gateway filters of a parsed document: a list, or C{{"services": [...]}}.

    Every field is optional and validated as in L{parse_services}; an invalid entry or
    an unknown field raises L{ServiceError} naming C{source} and the entry index.
    """
    label = _one_line(source)
    filters: list[Filter] = []
    for index, entry in enumerate(_entries(doc, label, "filters")):
        try:
            filters.append(_parse_filter(entry))
        except _FieldError as e:
            raise ServiceError(f"{label}: entry {index}: {e}") from None
    return filters


def load_services(source: str, fetch: Fetch | None = None) -> list[Service]:
    """L{load_source} then L{parse_services}, with messages naming the source."""
    return parse_services(_load(source, fetch), source_label(source))


def load_filters(source: str, fetch: Fetch | None = None) -> list[Filter]:
    """L{load_source} then L{parse_filters}, with messages naming the source."""
    return parse_filters(_load(source, fetch), source_label(source))
