"""twistd pipegate-gateway: open announced gate ports and forward them to providers."""

from __future__ import annotations

import ipaddress

from twisted.application import service
from twisted.python import usage

from pipegate.config import non_negative_float, positive_float
from pipegate.mux import frames
from pipegate.opslistener import add_metrics_listener
from pipegate.policy import PolicyError, load_policy
from pipegate.mux.node import MuxOptions, add_http, add_node
from pipegate.ports.gateway import Gateway, GatewayConfig
from pipegate.ports.unlimited import UnlimitedGate, UnlimitedResource
from pipegate.ports.services import (
    Exposure, ServiceError, load_source, parse_filters, parse_only_services,
)
from pipegate.tap.dockeropts import DOCKER_CONVERTERS, DOCKER_PARAMETERS, DockerOptionsMixin
from pipegate.tap.provider import fetch
from pipegate.heap import FrozenStartupHeap


class Options(DockerOptionsMixin, MuxOptions):
    synopsis = "[options]"
    longdesc = (
        "Open a public gate for every route that providers announce and carry each TCP "
        "connection or UDP flow to a provider over TLS mux links. Every option also reads "
        "PIPEGATE_<OPTION>."
    )
    optFlags = [
        ["expose-only-published", None, "Expose only routes tagged 'published'."],
        ["expose-only-docker", None, "Expose only routes tagged 'docker'."],
    ]
    optParameters = MuxOptions.optParameters + [
        ["listen", None, "127.0.0.1", "Address the gate ports bind to (0.0.0.0, ::, or one address)."],
        ["filter", None, None, "Routes to expose: inline JSON, a file or an http(s) URL; a list of "
                               "filters, a route matching every field of at least one is exposed."],
        ["expose-only-services", None, None, "Comma list of serviceHost names to expose."],
        ["open-timeout", None, "5", "Seconds a provider has to accept a channel before the next is tried."],
        ["unlimited-secret", None, None, "Secret of /unlimited tokens; enables the /unlimited endpoint."],
        ["unlimited", None, "tcp:8091:interface=127.0.0.1", "Server endpoint of the /unlimited endpoint."],
        ["unlimited-grant", None, "1800", "Seconds an /unlimited grant lasts."],
        ["tcp-idle-timeout", None, "0", "Seconds without a byte either way after which a TCP connection is closed; 0 = off."],
        ["image", None, "pipegate", "Docker mode: image of the helper containers (runs `pipegate forward`)."],
        ["helper-target", None, None, "Docker mode: this gateway's address as helpers see it "
                                      "(default: the Docker network's gateway address)."],
    ] + DOCKER_PARAMETERS
    converters = {**MuxOptions.converters, "open-timeout": positive_float, "unlimited-grant": positive_float,
                  "tcp-idle-timeout": non_negative_float, **DOCKER_CONVERTERS}

    def __init__(self) -> None:
        super().__init__()
        self["ingress-policy"] = []

    def opt_ingress_policy(self, value: str) -> None:
        """The operator's ingress policy (beats every provider's): inline JSON, a file or a URL; repeatable."""
        self.append("ingress-policy", value)

    def check(self) -> None:
        super().check()
        self.check_docker()
        if self["docker-endpoint"] and (not self["image"] or any(c.isspace() for c in self["image"])):
            raise usage.UsageError(f"--image: expected an image name, got {self['image']!r}")
        if self["helper-target"] is not None and (not self["helper-target"] or
                                                  any(c.isspace() for c in self["helper-target"])):
            raise usage.UsageError(f"--helper-target: expected a host name or address, got {self['helper-target']!r}")
        try:
            self["policy"] = load_policy(self["ingress-policy"], fetch)[0]
        except PolicyError as e:
            raise usage.UsageError(f"--ingress-policy: {e}") from None
        try:
            ipaddress.ip_address(self["listen"].split("%")[0])
        except ValueError:
            raise usage.UsageError(f"--listen: not an IP address: {self['listen']!r}") from None
        filters = ()
        if self["filter"]:
            try:
                filters = tuple(parse_filters(load_source(self["filter"], fetch), self["filter"]))
            except (ServiceError, OSError) as e:
                raise usage.UsageError(f"--filter: {e}") from None
        self["exposure"] = Exposure(
            filters=filters,
            only_services=parse_only_services(self["expose-only-services"] or ""),
            only_published=bool(self["expose-only-published"]),
            only_docker=bool(self["expose-only-docker"]),
        )


def makeService(options: Options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    FrozenStartupHeap(reactor).setServiceParent(top)
    gateway = Gateway(GatewayConfig(
        listen=options["listen"], exposure=options["exposure"], policy=options["policy"], open_timeout=options["open-timeout"],
        udp_idle_timeout=options["udp-idle-timeout"], tcp_idle_timeout=options["tcp-idle-timeout"],
        window=options["window"], max_window=options["max-window"],
        window_budget=options["window-budget"], drain_timeout=options["drain-timeout"],
        udp_buffer=options["udp-buffer"]), reactor)
    if options["unlimited-secret"]:
        gate = UnlimitedGate(options["unlimited-secret"], grant_s=options["unlimited-grant"])
        add_http(top, options["unlimited"], UnlimitedResource(gate, gateway.grants, reactor), reactor)
    add_metrics_listener(top, gateway, "gateway", options["metrics"], reactor)
    add_node(top, gateway, options, frames.ROLE_GATEWAY, reactor)
    if options["docker-endpoint"]:
        add_helpers(top, gateway, options, reactor)
    return top


def add_helpers(top: service.MultiService, gateway: Gateway, options: Options, reactor) -> None:
    """Docker mode: a helper container per learned service host, removed when the gateway stops."""
    from twisted.logger import Logger

    from pipegate.ports.dockermode import HelperManager
    from pipegate.ports.engine import EngineClient

    if ipaddress.ip_address(options["listen"].split("%")[0]).is_loopback:
        Logger(namespace="pipegate.docker").warn(
            "docker: gates listen on {listen}, which helper containers cannot reach; use --listen 0.0.0.0 "
            "or the network's gateway address", listen=options["listen"])
    engine = EngineClient(reactor, options["docker-endpoint"])
    HelperManager(engine, gateway, options["network"], options["image"], reactor,
                  target=options["helper-target"], secret=options["secret"],
                  period=options["refresh"]).setServiceParent(top)
