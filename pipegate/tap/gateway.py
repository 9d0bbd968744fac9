"""twistd pipegate-gateway: open announced gate ports and forward them to providers."""

from __future__ import annotations

import ipaddress

from twisted.application import service
from twisted.python import usage

from pipegate.accept import EmfileGuard, SiteLimits
from pipegate.config import TopService, auto_or_non_negative_int, non_negative_float, positive_float, positive_int
from pipegate.core.source import SourceError, load_source
from pipegate.fdlimit import default_caps, pick, raise_nofile
from pipegate.startup import log_node_start
from pipegate.mux import frames
from pipegate.opslistener import add_metrics_listener
from pipegate.core.policy import PolicyError
from pipegate.core.policydoc import load_policy
from pipegate.mux.node import add_http, add_node
from pipegate.mux.options import MuxOptions
from pipegate.ports.gateway import Gateway, GatewayConfig, parse_port_ranges
from pipegate.ports.unlimited import MIN_SECRET_CHARS, UnlimitedGate, UnlimitedResource
from pipegate.ports.services import Exposure, parse_filters, parse_only_services
from pipegate.tap.dockeropts import DOCKER_PARAMETERS, DockerOptionsMixin
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
        ["open-timeout", None, "5", "Seconds a provider has to accept a channel before the next is tried.",
         positive_float],
        ["unlimited-secret", None, None, "Secret of /unlimited tokens; enables the /unlimited endpoint."],
        ["unlimited", None, "tcp:8091:interface=127.0.0.1", "Server endpoint of the /unlimited endpoint."],
        ["unlimited-grant", None, "1800", "Seconds an /unlimited grant lasts.", positive_float],
        ["unlimited-kdf-rate", None, "20", "Token checks (PBKDF2 derivations, ~6 ms each) per second, all "
                                           "callers together; past it /unlimited answers 503.",
         positive_float],
        ["tcp-idle-timeout", None, "900", "Seconds without a byte either way after which a TCP connection is closed; 0 = off.",
         non_negative_float],
        ["max-conns-per-ip", None, "auto", "TCP connections one client IP may hold on all gates together; "
                                           "auto = from the fd budget (at most 256); 0 = no cap.",
         auto_or_non_negative_int],
        ["max-conns", None, "auto", "TCP connections all clients may hold on the gates; auto = the fd "
                                    "budget less a reserve; 0 = no cap.", auto_or_non_negative_int],
        ["conn-rate-per-ip", None, "100", "New TCP connections a second one client IP may open on all gates "
                                          "together, in bursts of --max-conns-per-ip; 0 = no limit.",
         non_negative_float],
        ["max-flows-per-ip", None, "auto", "UDP flows one client IP may hold on all gates together; "
                                           "auto = 256; 0 = no cap.", auto_or_non_negative_int],
        ["max-flows", None, "auto", "UDP flows in the flow table; a full table closes its longest-idle "
                                    "flow (idle 5 s or more) or drops the new one; auto = 16384; 0 = no cap.",
         auto_or_non_negative_int],
        ["gate-ports", None, "any", "Gate ports announced routes may open: any, or ports and ranges such as "
                                    "80,443,1024-65535 (keep 22 or this host's own listeners out).",
         parse_port_ranges],
        ["gate-backlog", None, "1024", "listen() backlog of each TCP gate (the kernel caps it at somaxconn).",
         positive_int],
        ["udp-hold", None, "2500000", "Bytes of datagrams a new UDP flow keeps until its channel opens "
                                      "(1 Gbit/s for 20 ms), each datagram counted as its length + 64; "
                                      "more are dropped and counted.", positive_int],
        ["udp-hold-total", None, "67108864", "Bytes all new UDP flows together keep until their channels open.",
         positive_int],
        ["image", None, "pipegate", "Docker mode: image of the helper containers (runs `pipegate forward`)."],
        ["helper-target", None, None, "Docker mode: this gateway's address as helpers see it "
                                      "(default: the Docker network's gateway address)."],
    ] + DOCKER_PARAMETERS
    optRepeatable = [
        ["ingress-policy", False, "The operator's ingress policy (beats every provider's): inline JSON, a file "
                                  "or a URL; repeatable."],
    ]

    def check(self) -> None:
        super().check()
        self.check_docker()
        if self["docker-endpoint"] and (not self["image"] or any(c.isspace() for c in self["image"])):
            raise usage.UsageError(f"--image: expected an image name, got {self['image']!r}")
        if self["helper-target"] is not None and (not self["helper-target"] or
                                                  any(c.isspace() for c in self["helper-target"])):
            raise usage.UsageError(f"--helper-target: expected a host name or address, got {self['helper-target']!r}")
        secret = self["unlimited-secret"]
        if secret and len(secret) < MIN_SECRET_CHARS:
            raise usage.UsageError(
                f"--unlimited-secret: at least {MIN_SECRET_CHARS} characters are required (a short secret "
                "can be guessed offline from one token); make one with: openssl rand -hex 32")
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
            except (SourceError, OSError) as e:
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
    top = TopService(options, reactor)
    FrozenStartupHeap(reactor).setServiceParent(top)
    caps = gate_caps(options)
    guard = EmfileGuard(reactor)
    guard.setServiceParent(top)
    gateway = Gateway(GatewayConfig(
        tcp_per_source=caps["max-conns-per-ip"], tcp_total=caps["max-conns"],
        tcp_rate_per_source=options["conn-rate-per-ip"],
        udp_per_source=caps["max-flows-per-ip"], udp_total=caps["max-flows"],
        gate_backlog=options["gate-backlog"], gate_ports=options["gate-ports"], udp_hold=options["udp-hold"],
        udp_hold_total=options["udp-hold-total"],
        listen=options["listen"], exposure=options["exposure"], policy=options["policy"], open_timeout=options["open-timeout"],
        udp_idle_timeout=options["udp-idle-timeout"], tcp_idle_timeout=options["tcp-idle-timeout"],
        window=options["window"], max_window=options["max-window"],
        window_budget=options["window-budget"], drain_timeout=options["drain-timeout"],
        udp_buffer=options["udp-buffer"]), reactor, guard)
    if options["unlimited-secret"]:
        gate = UnlimitedGate(options["unlimited-secret"], grant_s=options["unlimited-grant"],
                             kdf_rate=options["unlimited-kdf-rate"])
        add_http(top, options["unlimited"], UnlimitedResource(gate, gateway.grants, reactor), reactor,
                 SiteLimits.of(options))
    add_metrics_listener(top, gateway, "gateway", options["metrics"], reactor, SiteLimits.of(options))
    add_node(top, gateway, options, frames.ROLE_GATEWAY, reactor, guard=guard)
    if options["docker-endpoint"]:
        add_helpers(top, gateway, options, reactor)
    return top


def gate_caps(options: Options, budget=None) -> dict[str, int]:
    """
    Raise the soft RLIMIT_NOFILE to the hard limit, log the fd budget, and size the caps
    left at "auto" from it: a gate's TCP connection costs this process one descriptor; a
    UDP flow costs none here (it shares its gate's socket) but one on the provider, which
    protects itself with its own caps.
    """
    from twisted.logger import Logger

    budget = budget or raise_nofile()
    per_ip, total = default_caps(budget.usable())
    caps = {
        "max-conns-per-ip": pick(options["max-conns-per-ip"], per_ip),
        "max-conns": pick(options["max-conns"], total),
        "max-flows-per-ip": pick(options["max-flows-per-ip"], 256),
        "max-flows": pick(options["max-flows"], 16384),
    }
    Logger(namespace="pipegate.gateway").info(
        "fd budget: {soft} descriptors (soft limit was {before}, hard {hard}); TCP connections "
        "{conns_ip} per IP, {conns} in all, {rate:g} new a second per IP (0 = no limit); UDP flows "
        "{flows_ip} per IP, {flows} in all",
        soft=budget.soft, before=budget.before, hard=budget.hard, conns_ip=caps["max-conns-per-ip"],
        conns=caps["max-conns"], rate=options["conn-rate-per-ip"], flows_ip=caps["max-flows-per-ip"],
        flows=caps["max-flows"])
    log_node_start("gateway", budget, {"max-conns": options["max-conns"] or 0}, options)
    return caps


def add_helpers(top: service.MultiService, gateway: Gateway, options: Options, reactor) -> None:
    """Docker mode: a helper container per learned service host, removed when the gateway stops."""
    from twisted.logger import Logger

    from pipegate.ports.docker.helpermanager import HelperManager
    from pipegate.ports.engine import EngineClient

    if ipaddress.ip_address(options["listen"].split("%")[0]).is_loopback:
        Logger(namespace="pipegate.docker").warn(
            "docker: gates listen on {listen}, which helper containers cannot reach; use --listen 0.0.0.0 "
            "or the network's gateway address", listen=options["listen"])
    engine = EngineClient(reactor, options["docker-endpoint"])
    HelperManager(engine, gateway, options["network"], options["image"], reactor,
                  target=options["helper-target"], secret=options["secret"],
                  period=options["refresh"]).setServiceParent(top)
