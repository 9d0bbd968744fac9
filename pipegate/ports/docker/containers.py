"""
What containers offer (pure: no reactor, no sockets): the services of Docker
containers on one network, from the JSON the Docker Engine API returns, already
decoded: the entries of C{GET /containers/json} ("listings") and the results of
C{GET /containers/{id}/json} ("inspects"), with the field names of Docker's Engine API
reference (C{Id}, C{Names}, C{State}, C{Labels}, C{Ports}, C{NetworkSettings.Networks};
C{Name}, C{Config.ExposedPorts}, C{Config.Labels}, C{State.Running}, ...).  The code
that talks to the Engine (L{pipegate.ports.docker.discovery}) only feeds these
functions.

Unlike Hypergate, discovered services are merged with the static ones
(L{merge_with_static}) instead of replacing them, and a container with an invalid label
(L{pipegate.ports.docker.labels}) is skipped and reported.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pipegate.ports.docker.labels import (
    DockerLabelError, UnexposeSpec, find_label, parse_expose_label, parse_unexpose_label,
)
from pipegate.ports.services import PROTOCOLS, Service

__all__ = [
    "CLAIM_GRACE_REFRESHES",
    "MAX_PORTS_PER_CONTAINER",
    "container_name",
    "container_services",
    "discover",
    "merge_with_static",
    "wants_inspect",
]

TAGS_UNPUBLISHED = ("docker",)
TAGS_PUBLISHED = ("docker", "published")

_PORT_RE = re.compile(r"[0-9]{1,5}")

Log = Callable[[str], None]

#: Default --docker-max-ports: services one container may announce; the rest (highest
#: ports first) are dropped and reported.  One label could otherwise announce 5,000 ports.
MAX_PORTS_PER_CONTAINER = 100


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _labels(listing: Mapping, inspect: Mapping) -> dict[str, str]:
    labels: dict[str, str] = {}
    for source in (_dict(listing.get("Labels")), _dict(_dict(inspect.get("Config")).get("Labels"))):
        labels.update((k, v) for k, v in source.items() if isinstance(k, str) and isinstance(v, str))
    return labels


def _excluded(labels: Mapping[str, str]) -> bool:
    found = find_label(labels, "EXCLUDE")
    return found is not None and found[1].strip().lower() == "true"


# ---------------------------------------------------------------------------
# One container


def container_name(listing: Mapping, inspect: Mapping | None = None) -> str:
    """
    The container's name without the leading C{/}: the inspect result's C{Name}, else
    the first of the listing's C{Names} that is not a legacy link name (C{/a/b}), else
    the short id.
    """
    name = _dict(inspect).get("Name")
    if isinstance(name, str) and name.strip("/"):
        return name[1:] if name.startswith("/") else name
    names = [n for n in listing.get("Names") or () if isinstance(n, str) and n.strip("/")]
    for candidate in names:
        bare = candidate[1:] if candidate.startswith("/") else candidate
        if "/" not in bare:
            return bare
    if names:
        return names[0].lstrip("/")
    return _container_id(listing, inspect)[:12] or "?"


def _container_id(listing: Mapping, inspect: Mapping | None) -> str:
    for source in (listing, _dict(inspect)):
        value = source.get("Id")
        if isinstance(value, str) and value:
            return value
    return ""


def _running(listing: Mapping, inspect: Mapping) -> bool:
    """Running = some source says so and none says otherwise (paused and restarting are not running)."""
    verdicts: list[bool] = []
    state = listing.get("State")
    if isinstance(state, str):
        verdicts.append(state.lower() == "running")
    details = inspect.get("State")
    if isinstance(details, dict):
        if isinstance(details.get("Status"), str):
            verdicts.append(details["Status"].lower() == "running")
        if isinstance(details.get("Running"), bool):
            verdicts.append(details["Running"])
        if details.get("Paused") is True or details.get("Restarting") is True:
            verdicts.append(False)
    return bool(verdicts) and all(verdicts)


def _networks(source: Mapping) -> dict | None:
    settings = source.get("NetworkSettings")
    if not isinstance(settings, dict) or not isinstance(settings.get("Networks"), dict):
        return None
    return settings["Networks"]


def _endpoints(listing: Mapping, inspect: Mapping, network: str) -> list[dict]:
    """
    The container's endpoint on C{network} (empty when not attached): the inspect
    result decides when it has C{NetworkSettings.Networks}, else the listing; the
    listing's entry follows the inspect one as a second source of aliases.
    """
    inspected, listed = _networks(inspect), _networks(listing)
    primary = inspected if inspected is not None else listed
    if primary is None or not isinstance(primary.get(network), dict):
        return []
    found = [primary[network]]
    if primary is inspected and listed is not None and isinstance(listed.get(network), dict):
        found.append(listed[network])
    return found


def _service_host(listing: Mapping, inspect: Mapping, network: str) -> str:
    cid = _container_id(listing, inspect)
    for endpoint in _endpoints(listing, inspect, network):
        for alias in endpoint.get("Aliases") or ():
            if not isinstance(alias, str) or not alias.strip() or any(c.isspace() for c in alias):
                continue
            if cid and alias in (cid, cid[:12]):
                continue
            return alias
    return container_name(listing, inspect)


def _docker_port(value: object) -> int | None:
    if isinstance(value, str) and _PORT_RE.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        return None
    return value


def _port_key(text: object) -> tuple[int, str] | None:
    """C{"80/tcp"} -> C{(80, "tcp")}; C{None} for other protocols (sctp) or junk."""
    if not isinstance(text, str):
        return None
    port, _, protocol = text.partition("/")
    number = _docker_port(port)
    protocol = (protocol or "tcp").strip().lower()
    if number is None or protocol not in PROTOCOLS:
        return None
    return number, protocol


def _docker_ports(listing: Mapping, inspect: Mapping) -> dict[tuple[int, str], int | None]:
    """
    C{(private port, protocol) -> lowest public port or None}, from the listing's
    C{Ports}, the inspect result's C{NetworkSettings.Ports} and C{Config.ExposedPorts}.
    """
    ports: dict[tuple[int, str], int | None] = {}

    def add(key: tuple[int, str] | None, public: int | None) -> None:
        if key is None:
            return
        current = ports.get(key)
        if key not in ports or (public is not None and (current is None or public < current)):
            ports[key] = public

    for entry in listing.get("Ports") or ():
        if not isinstance(entry, dict):
            continue
        private = _docker_port(entry.get("PrivatePort"))
        protocol = entry.get("Type", "tcp")
        if private is None or not isinstance(protocol, str) or protocol.lower() not in PROTOCOLS:
            continue
        add((private, protocol.lower()), _docker_port(entry.get("PublicPort")))
    for name, bindings in _dict(_dict(inspect.get("NetworkSettings")).get("Ports")).items():
        key = _port_key(name)
        add(key, None)
        for binding in bindings if isinstance(bindings, list) else ():
            add(key, _docker_port(_dict(binding).get("HostPort")))
    for name in _dict(_dict(inspect.get("Config")).get("ExposedPorts")):
        add(_port_key(name), None)
    return ports


def _parsed_label(labels: Mapping[str, str], name: str, parse: Callable[[str], Any], container: str) -> Any:
    found = find_label(labels, name)
    if found is None:
        return None
    key, value = found
    try:
        return parse(value)
    except DockerLabelError as e:
        raise DockerLabelError(f"container {container}: label {key}: {e}") from None


def wants_inspect(listing: Mapping, network: str) -> bool:
    """
    Whether a C{GET /containers/json} entry may have services on C{network}, judged from
    the listing alone: running, not excluded by label, and on the network when the
    listing says which networks it is on.  Lets the caller skip useless inspects.
    """
    state = listing.get("State")
    if isinstance(state, str) and state.lower() != "running":
        return False
    if _excluded(_labels(listing, {})):
        return False
    networks = _networks(listing)
    return networks is None or isinstance(networks.get(network), dict)


def container_services(listing: Mapping, inspect: Mapping, network: str) -> list[Service]:
    """
    The services one container offers on Docker network C{network}, sorted by
    C{(service_port, protocol)}.

    None (an empty list) when the container is not running (C{State} of the listing,
    C{State.Status}/C{Running}/C{Paused}/C{Restarting} of the inspect result), is not
    attached to C{network} (C{NetworkSettings.Networks[network]}), or has the label
    C{EXCLUDE} set to C{true} in any case.

    Ports, as C{(private port, protocol)}: the listing's C{Ports} (which include EXPOSEd
    but unpublished ports), the inspect result's C{NetworkSettings.Ports} and
    C{Config.ExposedPorts}; other protocols than tcp and udp are ignored.  When a port
    is published more than once, the lowest public port counts.  Then C{UNEXPOSE}
    removes unpublished ports (see L{parse_unexpose_label}), and C{EXPOSE} adds ports:
    a C{(port, protocol)} the container already has only gets a missing public port
    filled in.

    One L{Service} per port: C{service_port} = the private port, C{gate_port} = the
    public port or else the private one, C{service_host} = the container's first alias
    on the network that is not its (short) id, else its name; tags C{docker published}
    with a public port (from Docker or from an C{EXPOSE} label), else C{docker}.

    An invalid C{EXPOSE} or C{UNEXPOSE} label raises L{DockerLabelError} naming the
    container and the label.
    """
    inspect = _dict(inspect)
    labels = _labels(listing, inspect)
    if not _running(listing, inspect) or not _endpoints(listing, inspect, network) or _excluded(labels):
        return []
    name = container_name(listing, inspect)
    unexpose = _parsed_label(labels, "UNEXPOSE", parse_unexpose_label, name) or UnexposeSpec()
    expose = _parsed_label(labels, "EXPOSE", parse_expose_label, name) or []

    ports = _docker_ports(listing, inspect)
    for key in [k for k, public in ports.items() if public is None and unexpose.removes(*k)]:
        del ports[key]
    for private, public, protocol in expose:
        key = (private, protocol)
        if ports.get(key) is None:
            ports[key] = public

    host = _service_host(listing, inspect, network)
    return [
        Service(
            gate_port=public if public is not None else private,
            service_host=host,
            service_port=private,
            protocol=protocol,
            tags=TAGS_PUBLISHED if public is not None else TAGS_UNPUBLISHED,
        )
        for (private, protocol), public in sorted(ports.items())
    ]


# ---------------------------------------------------------------------------
# All containers


def _quiet(message: str) -> None:
    pass


def _dns_alias(host: str) -> bool:
    """Is C{host} a name Docker's DNS resolves to containers (so one container could take it from another)?"""
    if not host or host.lower() == "localhost":
        return False
    try:
        ipaddress.ip_address(host.split("%")[0])
        return False
    except ValueError:
        return True


#: Refreshes a claim outlives its holder's absence: a container recreated (docker compose up
#: after a change: stopped, removed, created again under its name) is away for a moment, and a
#: refresh in that moment must not hand its gate port or alias to another container for good.
CLAIM_GRACE_REFRESHES = 3


def _created(listing: Mapping) -> float:
    value = listing.get("Created") if isinstance(listing, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("inf")


def discover(
    listings: Iterable[Mapping],
    inspects: Mapping[str, Mapping],
    network: str,
    log: Log | None = None,
    claims: dict | None = None,
    max_ports: int = MAX_PORTS_PER_CONTAINER,
) -> list[Service]:
    """
    The services of every container, for one refresh.

    C{listings} are C{GET /containers/json} entries and C{inspects} maps a container
    C{Id} to its C{GET /containers/{id}/json} result.  Containers are taken in name
    order.  A container whose labels are invalid is skipped as a whole (an invalid
    C{UNEXPOSE} must not publish what it meant to hide), and one without an inspect
    result is skipped when its listing says it might matter (see L{wants_inspect});
    both are reported through C{log(message)}.  Exact duplicates (scaled replicas
    sharing an alias) are kept once; when two containers claim the same
    C{(gate_port, protocol)} or the same alias (service host) differently, the container
    that claimed it first keeps it and the conflict is reported.  "First" is the holder
    in C{claims} (what the last refresh decided, updated here, so a claim is stable
    across refreshes), and otherwise the container created first (then name, then id);
    never the sort order of names alone.  A claim is held by the container's name, not its
    id, so a container recreated under its name (a new id) keeps its claims; a holder absent
    from a refresh keeps them, unserved, for L{CLAIM_GRACE_REFRESHES} refreshes.  A container offering more than C{max_ports}
    services keeps its lowest C{max_ports} ports (0 = no cap) and the rest is reported.
    """
    report = log or _quiet
    entries = []
    for listing in listings:
        cid = _container_id(listing, None)
        inspect = inspects.get(cid) if cid else None
        name = container_name(listing, inspect)
        if inspect is None:
            if wants_inspect(listing, network):
                report(f"docker: container {name}: no inspect result (removed meanwhile?); skipped")
            continue
        entries.append((_created(listing), name, cid, listing, inspect))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))

    offers: list[tuple[str, str, list[Service]]] = []
    for _, name, cid, listing, inspect in entries:
        try:
            services = container_services(listing, inspect, network)
        except DockerLabelError as e:
            report(f"docker: {e}; container skipped")
            continue
        if max_ports and len(services) > max_ports:
            report(f"docker: container {name} offers {len(services)} ports, more than --docker-max-ports "
                   f"({max_ports}); ports from {services[max_ports].service_port}/{services[max_ports].protocol}"
                   " on are ignored")
            services = services[:max_ports]
        # Claims follow the name (unique among a host's containers at any time), not the id,
        # which a recreated container does not keep.
        offers.append((name, name, services))

    previous = claims if claims is not None else {}
    ports: dict[tuple[int, str], tuple[str, str, Service | None]] = {}   # key -> (holder, name, service)
    aliases: dict[str, tuple[str, str]] = {}                             # service host -> (holder, name)
    # Holders gone from this refresh keep their claims, unserved, for a few refreshes.
    present = {holder for _, holder, _ in offers}
    absent: dict[str, int] = {}
    for kind_key, holder in previous.items():
        if kind_key[0] in ("port", "alias") and holder not in present:
            missed = previous.get(("absent", holder), 0) + 1
            if missed > CLAIM_GRACE_REFRESHES:
                continue
            absent[holder] = missed
            if kind_key[0] == "port":
                ports[kind_key[1]] = (holder, holder, None)
            else:
                aliases[kind_key[1]] = (holder, holder)
    # Claims held at the last refresh stay with their holder while it still offers them.
    for name, cid, services in offers:
        for service in services:
            if _dns_alias(service.service_host) and previous.get(("alias", service.service_host)) == cid:
                aliases.setdefault(service.service_host, (cid, name))
            if previous.get(("port", service.key)) == cid and service.key not in ports:
                ports[service.key] = (cid, name, service)
    result: list[Service] = []
    for name, cid, services in offers:
        for service in services:
            first = ports.get(service.key)
            alias = aliases.setdefault(service.service_host, (cid, name)) if _dns_alias(service.service_host) \
                else (cid, name)
            if alias[0] != cid and (first is None or first[2] != service):
                report(f"docker: alias {service.service_host} of container {name} ({service.describe()})"
                       f" is already used by container {alias[1]}; ignored")
                continue
            if first is None:
                ports[service.key] = first = (cid, name, service)
            if first[0] == cid and first[2] == service:
                if service not in result:
                    result.append(service)
            elif first[2] is None:
                report(
                    f"docker: gate port {service.gate_port}/{service.protocol} of container {name}"
                    f" ({service.describe()}) is held for container {first[1]}, gone since"
                    f" {absent[first[0]]} refresh(es) (recreated?); ignored"
                )
            elif first[2] != service:
                report(
                    f"docker: gate port {service.gate_port}/{service.protocol} of container {name}"
                    f" ({service.describe()}) is already taken by container {first[1]}"
                    f" ({first[2].describe()}); ignored"
                )
    if claims is not None:
        claims.clear()
        claims.update({("port", key): holder[0] for key, holder in ports.items()})
        claims.update({("alias", host): holder[0] for host, holder in aliases.items()})
        claims.update({("absent", holder): missed for holder, missed in absent.items()})
    return result


def merge_with_static(
    static: Iterable[Service], discovered: Iterable[Service], log: Log | None = None
) -> list[Service]:
    """
    The provider's service list after a refresh: every static service (from
    C{--services}), then the discovered ones that do not conflict.

    A discovered service on a C{(gate_port, protocol)} a static one already uses is
    dropped (silently when identical, reported through C{log} otherwise); so are later
    discovered services conflicting with earlier ones.  Static services are never
    dropped, whatever Docker returns.
    """
    report = log or _quiet
    merged = list(static)
    claimed: dict[tuple[int, str], tuple[str, Service]] = {}
    for service in merged:
        claimed.setdefault(service.key, ("--services", service))
    for service in discovered:
        first = claimed.get(service.key)
        if first is None:
            claimed[service.key] = ("docker", service)
            merged.append(service)
        elif first[1] != service:
            report(
                f"docker: {service.describe()} ignored: gate port {service.gate_port}/{service.protocol}"
                f" is already used by {first[0]} service {first[1].describe()}"
            )
    return merged

