"""
The gateway's helper containers (pure): their names (L{helper_name}) and the body that
creates them (L{helper_spec}), built from the routes the gateway learned.  A helper is a
plain forwarder to the gateway's gates that needs no router secret (Hypergate put it in
the name and the environment); L{secret_free} checks a body before it is sent.  The
service that creates and removes them is L{pipegate.ports.docker.helpermanager}.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pipegate.ports.services import PROTOCOLS

__all__ = [
    "HELPER_NAME_PREFIX",
    "helper_name",
    "helper_spec",
    "secret_free",
]

HELPER_NAME_PREFIX = "pipegate-helper-"

# A helper name stays a valid DNS label (63 characters): prefix + 38 + "-" + 8 hex.
_HELPER_HOST_CHARS = 38
_HELPER_HASH_CHARS = 8
_HOSTNAME_CHARS = 63


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
