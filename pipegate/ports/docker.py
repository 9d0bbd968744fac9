"""
Docker discovery for the port plane (pure: no reactor, no sockets).

Everything here works on the JSON the Docker Engine API returns, already decoded: the
entries of C{GET /containers/json} ("listings") and the results of
C{GET /containers/{id}/json} ("inspects"), with the field names of Docker's Engine API
reference (C{Id}, C{Names}, C{State}, C{Labels}, C{Ports}, C{NetworkSettings.Networks};
C{Name}, C{Config.ExposedPorts}, C{Config.Labels}, C{State.Running}, ...).  The code that
talks to the Engine lives elsewhere and only feeds these functions.

Hypergate's Docker mode (C{hypergate.md} section 7), with its tagged bugs fixed:
  - labels C{pipegate.EXPOSE}, C{pipegate.UNEXPOSE} and C{pipegate.EXCLUDE}; the
    C{hypergate.*} spellings are accepted too, and for each label the C{pipegate.*} one
    wins when both are set (see L{LABEL_PREFIXES}); label keys are matched exactly;
  - a label with an invalid item is an error (L{DockerLabelError}) and the container is
    skipped and reported by L{discover}, instead of the item being silently dropped;
  - discovered services are merged with the static ones (L{merge_with_static}) instead
    of replacing them;
  - the helper container of a gateway (L{helper_spec}, L{helper_name}) is built from the
    routes the gateway learned, and is a plain forwarder to the gateway's gates that
    needs no router secret (Hypergate put it in the name and the environment).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from pipegate.ports.services import PROTOCOLS, Service

__all__ = [
    "DEFAULT_DOCKER_ENDPOINT",
    "DockerLabelError",
    "HELPER_NAME_PREFIX",
    "LABEL_PREFIXES",
    "UnexposeSpec",
    "container_name",
    "container_services",
    "discover",
    "find_label",
    "helper_name",
    "helper_spec",
    "merge_with_static",
    "parse_docker_host",
    "parse_expose_label",
    "parse_unexpose_label",
    "secret_free",
    "wants_inspect",
]

LABEL_PREFIXES = ("pipegate.", "hypergate.")
DEFAULT_DOCKER_ENDPOINT = "unix:/var/run/docker.sock"
HELPER_NAME_PREFIX = "pipegate-helper-"

TAGS_UNPUBLISHED = ("docker",)
TAGS_PUBLISHED = ("docker", "published")

# A helper name stays a valid DNS label (63 characters): prefix + 38 + "-" + 8 hex.
_HELPER_HOST_CHARS = 38
_HELPER_HASH_CHARS = 8
_HOSTNAME_CHARS = 63
_PORT_RE = re.compile(r"[0-9]{1,5}")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_ITEM_CHARS = 40

Log = Callable[[str], None]

#: Default --docker-max-ports: services one container may announce; the rest (highest
#: ports first) are dropped and reported.  One label could otherwise announce 5,000 ports.
MAX_PORTS_PER_CONTAINER = 100


class DockerLabelError(ValueError):
    """A C{pipegate.*}/C{hypergate.*} label cannot be parsed; the message is one line naming the bad item."""


@attrs.frozen
class UnexposeSpec:
    """
    What a C{UNEXPOSE} label removes: every unpublished port (C{all_ports}, from C{*}),
    or the listed C{(port, protocol)} pairs.
    """

    all_ports: bool = False
    ports: frozenset[tuple[int, str]] = attrs.field(default=frozenset(), converter=frozenset)

    def removes(self, port: int, protocol: str) -> bool:
        return self.all_ports or (port, protocol) in self.ports


# ---------------------------------------------------------------------------
# Labels


def _item_text(item: str) -> str:
    text = repr(item)
    return text if len(text) <= _ITEM_CHARS else text[: _ITEM_CHARS - 3] + "..."


def _label_port(text: str, item: str, what: str) -> int:
    text = text.strip()
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise DockerLabelError(f"bad item {_item_text(item)}: {what} must be an integer 1-65535")
    return int(text)


def _label_protocol(text: str, item: str) -> str:
    protocol = text.strip().lower()
    if protocol not in PROTOCOLS:
        raise DockerLabelError(f'bad item {_item_text(item)}: protocol must be "tcp" or "udp"')
    return protocol


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_expose_label(text: str) -> list[tuple[int, int | None, str]]:
    """
    C{"port[:public][/proto],..."} -> C{[(port, public or None, proto), ...]}, in order.

    C{port} is the container's (private) port and C{public} the gate port announced for
    it, in Hypergate's order (the reverse of C{docker run -p}): C{9000:19000/udp} is
    container port 9000, gate port 19000, udp.  The protocol is C{tcp} or C{udp} in any
    case, C{tcp} when missing.  Spaces around items and parts are ignored, and so are
    empty items (C{"80,"}).  Any other bad item raises L{DockerLabelError} naming it.
    """
    result: list[tuple[int, int | None, str]] = []
    for item in _items(text):
        ports, slash, protocol = item.partition("/")
        proto = _label_protocol(protocol, item) if slash else "tcp"
        private, colon, public = ports.partition(":")
        result.append((
            _label_port(private, item, "port"),
            _label_port(public, item, "public port") if colon else None,
            proto,
        ))
    return result


def parse_unexpose_label(text: str) -> UnexposeSpec:
    """
    C{"*"} or C{"port[/proto],..."} -> L{UnexposeSpec}.

    C{*} removes every unpublished port.  C{port/proto} removes that one port; a bare
    C{port} means C{port/tcp}, as in C{EXPOSE} labels and in a Dockerfile's C{EXPOSE}
    (Hypergate: "C{p/proto} or C{p} removes one"), so C{UNEXPOSE=53} leaves C{53/udp}
    alone.  Published ports (with a C{PublicPort} from Docker) are never removed; see
    L{container_services}.  A bad item raises L{DockerLabelError} naming it.
    """
    all_ports = False
    ports: set[tuple[int, str]] = set()
    for item in _items(text):
        if item == "*":
            all_ports = True
            continue
        port, slash, protocol = item.partition("/")
        proto = _label_protocol(protocol, item) if slash else "tcp"
        ports.add((_label_port(port, item, "port"), proto))
    return UnexposeSpec(all_ports, frozenset(ports))


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _labels(listing: Mapping, inspect: Mapping) -> dict[str, str]:
    labels: dict[str, str] = {}
    for source in (_dict(listing.get("Labels")), _dict(_dict(inspect.get("Config")).get("Labels"))):
        labels.update((k, v) for k, v in source.items() if isinstance(k, str) and isinstance(v, str))
    return labels


def find_label(labels: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """
    C{(key, value)} of label C{name} (C{"EXPOSE"}, ...) under the first of
    L{LABEL_PREFIXES} that is set, or C{None}.  Keys are matched exactly.
    """
    for prefix in LABEL_PREFIXES:
        key = prefix + name
        value = labels.get(key)
        if isinstance(value, str):
            return key, value
    return None


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


# ---------------------------------------------------------------------------
# Gateway helper containers


def helper_name(route_host: str) -> str:
    """
    The helper container's name for C{route_host}: C{pipegate-helper-} + the host when
    it is already lowercase letters, digits and inner dashes (at most 38), else a
    DNS-safe form of it plus 8 hex digits of its SHA-256, so that C{mysql.hyper} and
    C{mysql-hyper} get different helpers.  At most 63 characters.
    """
    safe = re.sub(r"[^a-z0-9]+", "-", route_host.lower()).strip("-")
    if safe != route_host or len(safe) > _HELPER_HOST_CHARS:
        digest = hashlib.sha256(route_host.encode("utf-8", "surrogatepass")).hexdigest()
        safe = "-".join(filter(None, [safe[:_HELPER_HOST_CHARS].rstrip("-"), digest[:_HELPER_HASH_CHARS]]))
    return HELPER_NAME_PREFIX + safe


def _hostname(route_host: str) -> str:
    if len(route_host) <= _HOSTNAME_CHARS:
        return route_host
    return route_host[:_HOSTNAME_CHARS].rstrip(".-") or helper_name(route_host)[:_HOSTNAME_CHARS]


def helper_spec(
    route_host: str,
    forwards: Iterable[tuple[int, str, int]],
    image: str,
    network: str,
    network_id: str | None,
    target: str,
) -> dict:
    """
    The JSON body of C{POST /containers/create?name=<helper_name(route_host)>} for the
    gateway-side helper of C{route_host}: a plain TCP/UDP forwarder inside the network,
    answering to the alias C{route_host} on each service port and forwarding to the
    gateway's gate port at C{target} (the gateway's address as seen from the network).

    C{forwards} are C{(service_port, protocol, gate_port)} triples: local containers
    connect to C{route_host:service_port}, as if the service were on their network, and
    the helper carries the connection (or datagrams) to C{target:gate_port}.

      - C{Image}: C{image};
      - C{Cmd}: C{pipegate forward --to <target> <port>/<proto>=<gate port> ...};
      - C{ExposedPorts}: C{{"<port>/<proto>": {}}} for the service ports;
      - C{Hostname}: C{route_host} (cut to 63 characters);
      - C{Labels}: C{pipegate.EXCLUDE=true} (discovery skips helpers),
        C{pipegate.helper=<route_host>} and C{pipegate.helper.network=<network>} (to find
        them again, also after a crash);
      - C{NetworkingConfig.EndpointsConfig[network]}: C{{"Aliases": [route_host],
        "NetworkID": network_id}}, without C{NetworkID} when it is C{None};
      - C{HostConfig.Sysctls}: C{net.ipv4.ip_unprivileged_port_start=0}, so that the
        image's unprivileged user may listen on a service port below 1024 (it is the
        helper's own network namespace);
      - no C{Env}, no published host ports.

    A forwarder needs no router secret at all, so none can leak through the name,
    labels, command line or environment that anyone allowed to inspect containers can
    read; the gate ports it reaches are the gateway's public gates, already guarded by
    the gateway's ingress policy.  Callers still check the final body with
    L{secret_free} before sending it.
    """
    if not route_host or any(c.isspace() for c in route_host):
        raise ValueError(f"helper route host must be a non-empty name without spaces, got {route_host!r}")
    if not target or any(c.isspace() for c in target):
        raise ValueError(f"helper target must be a host name or address without spaces, got {target!r}")
    exposed: dict[str, dict] = {}
    arguments: list[str] = []
    for port, protocol, gate_port in sorted(set(forwards)):
        for number in (port, gate_port):
            if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
                raise ValueError(f"helper port must be an integer 1-65535, got {number!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f'helper protocol must be "tcp" or "udp", got {protocol!r}')
        if f"{port}/{protocol}" in exposed:
            raise ValueError(f"helper port {port}/{protocol} is given twice")
        exposed[f"{port}/{protocol}"] = {}
        arguments.append(f"{port}/{protocol}={gate_port}")
    if not arguments:
        raise ValueError("a helper needs at least one port")
    endpoint: dict[str, Any] = {"Aliases": [route_host]}
    if network_id is not None:
        endpoint["NetworkID"] = network_id
    return {
        "Image": image,
        "Cmd": ["pipegate", "forward", "--to", target, *arguments],
        "ExposedPorts": exposed,
        "Hostname": _hostname(route_host),
        "Labels": {"pipegate.EXCLUDE": "true", "pipegate.helper": route_host, "pipegate.helper.network": network},
        "HostConfig": {"Sysctls": {"net.ipv4.ip_unprivileged_port_start": "0"}},
        "NetworkingConfig": {"EndpointsConfig": {network: endpoint}},
    }


def secret_free(spec: object, secret: str) -> bool:
    """
    True when no string in C{spec} (dict keys and values, list items, recursively; other
    scalars by their C{str}) contains C{secret}, compared without regard to case.
    An empty secret is a C{ValueError}: it would be in everything.
    """
    if not secret:
        raise ValueError("secret_free needs a non-empty secret")
    needle = secret.lower()
    stack: list[object] = [spec]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, bytes):
            if needle.encode("utf-8", "surrogatepass") in item.lower():
                return False
        elif item is not None and not isinstance(item, bool):
            if needle in str(item).lower():
                return False
    return True


# ---------------------------------------------------------------------------
# Engine address


def _escape_endpoint(text: str) -> str:
    return re.sub(r"([\\:=])", r"\\\1", text)


def parse_docker_host(value: str | None) -> str:
    """
    A Twisted client endpoint string for the Docker Engine socket.

    C{None} or an empty value -> C{unix:/var/run/docker.sock}; C{unix:///path} (as in
    C{DOCKER_HOST}), C{unix:/path} or a plain path -> C{unix:/path}, with C{:}, C{=} and
    C{\\} escaped for Twisted's endpoint parser.  Any other scheme (C{tcp://},
    C{ssh://}, C{npipe://}, ...) raises C{ValueError("only unix sockets are supported
    ...")}.
    """
    text = (value or "").strip()
    if not text:
        return DEFAULT_DOCKER_ENDPOINT
    lowered = text.lower()
    if lowered.startswith("unix://"):
        path = text[len("unix://"):]
    elif lowered.startswith("unix:"):
        path = text[len("unix:"):]
    elif _SCHEME_RE.match(text):
        scheme = text.split(":", 1)[0]
        raise ValueError(f"only unix sockets are supported, not {scheme}")
    else:
        path = text
    if not path:
        raise ValueError(f"no socket path in Docker host {text!r}")
    return "unix:" + _escape_endpoint(path)
