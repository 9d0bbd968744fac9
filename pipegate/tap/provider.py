"""twistd pipegate-provider: announce private TCP/UDP services to gateways."""

from __future__ import annotations

import urllib.request

from twisted.application import service
from twisted.python import usage

from pipegate.config import TopService, auto_or_non_negative_int, non_negative_int, positive_float
from pipegate.core.source import SourceError, load_source
from pipegate.fdlimit import default_caps, pick, raise_nofile
from pipegate.startup import log_node_start
from pipegate.mux import frames
from pipegate.opslistener import add_metrics_listener
from pipegate.accept import EmfileGuard, SiteLimits
from pipegate.mux.node import add_http, add_node
from pipegate.mux.options import MuxOptions
from pipegate.core.policy import PolicyError
from pipegate.core.policydoc import load_policy
from pipegate.ports.provider import Provider, ProviderConfig, service_route
from pipegate.ports.resolver import Records, ResolverResource
from pipegate.ports.services import merge_services, parse_service_spec, parse_services
from pipegate.tap.dockeropts import DOCKER_PARAMETERS, DockerOptionsMixin
from pipegate.heap import FrozenStartupHeap


def fetch(url: str) -> bytes:
    """Fetch a --services or --filter URL once, at startup (before the reactor runs)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read(16 * 1024 * 1024)


class Options(DockerOptionsMixin, MuxOptions):
    synopsis = "[options]"
    longdesc = (
        "Announce private services to gateways over TLS mux links and carry their TCP "
        "connections and UDP flows. Every option also reads PIPEGATE_<OPTION>; --mux, --connect and "
        "--service read space-separated lists from PIPEGATE_MUX, PIPEGATE_CONNECT and PIPEGATE_SERVICE, "
        "--services one source from PIPEGATE_SERVICES; flags given on the command line replace the "
        "variable."
    )
    optFlags = [
        ["resolver-open-listing", None, "Serve the resolver's /all (every client IP) without "
                                        "--resolver-basic-auth (off: /all answers 403)."],
    ]
    optParameters = MuxOptions.optParameters + [
        ["connect-timeout", None, "5", "Seconds to connect to a service before the gateway is told it failed.",
         positive_float],
        ["resolver", None, None, "Server endpoint for the fingerprint resolver HTTP API (off unless given), "
                                 "e.g. tcp:8080:interface=127.0.0.1."],
        ["resolver-basic-auth", None, None, "user:password required by /resolve and /all."],
        ["max-backends", None, "auto", "Sockets to services (TCP channels and UDP flows) held at once; past it "
                                       "an OPEN gets OPEN_FAIL and the gateway tries its next provider; "
                                       "auto = the fd budget less a reserve; 0 = no cap.",
         auto_or_non_negative_int],
        ["max-backends-per-ip", None, "auto", "Of those, what one client IP may hold; auto = half of "
                                              "--max-backends, at most 512 (a gateway's 256 TCP + 256 UDP "
                                              "per IP); 0 = no cap.", auto_or_non_negative_int],
        ["max-udp-backends", None, "auto", "Of those, how many may be UDP flows; auto = half of "
                                           "--max-backends, so a UDP flood leaves room for TCP; 0 = no cap.",
         auto_or_non_negative_int],
        ["docker-max-ports", None, "100", "Docker mode: services one container may announce (its lowest "
                                          "ports); 0 = no cap.", non_negative_int],
    ] + DOCKER_PARAMETERS
    optRepeatable = [
        ["service", True, "A service in short form, GATE_PORT:HOST:PORT with /udp after it for UDP "
                          "(e.g. 2222:127.0.0.1:22, 5353:192.168.1.10:53/udp); repeatable."],
        ["services", False, 'Services: inline JSON, a file or an http(s) URL; a list or {"services": [...]}; '
                            "repeatable."],
        ["ingress-policy", False, "Ingress policy shipped to gateways: inline JSON, a file or an http(s) URL; "
                                  "repeatable, merged."],
    ]

    def check(self) -> None:
        super().check()
        self.check_docker()
        if self["resolver-basic-auth"] is not None:
            user, colon, password = self["resolver-basic-auth"].partition(":")
            if not colon or not user:
                raise usage.UsageError("--resolver-basic-auth: expected user:password")
            self["resolver-auth"] = (user, password)
        else:
            self["resolver-auth"] = None
        if self["resolver"]:
            from twisted.internet import endpoints, reactor

            try:
                endpoints.serverFromString(reactor, self["resolver"])
            except Exception as e:
                raise usage.UsageError(f"--resolver: {e or type(e).__name__}") from None
        try:
            short = merge_services([[parse_service_spec(spec)] for spec in self["service"]])
        except SourceError as e:
            raise usage.UsageError(f"--service: {e}") from None
        try:
            lists = [parse_services(load_source(s, fetch), s) for s in self["services"]]
            self["service-list"] = merge_services([short] + lists)
            self["policy"] = load_policy(self["ingress-policy"], fetch)[1]
            frames.encode(frames.Routes(tuple(service_route(s, self["policy"]) for s in self["service-list"])))
        except PolicyError as e:
            raise usage.UsageError(f"--ingress-policy: {e}") from None
        except frames.FrameError as e:
            raise usage.UsageError(f"--services: cannot be announced: {e}") from None
        except SourceError as e:
            raise usage.UsageError(f"--services: {e}{_short_form_hint(self['services'])}") from None
        except OSError as e:
            raise usage.UsageError(f"--services: {e}") from None


def _short_form_hint(sources: list[str]) -> str:
    """For C{--services 2222:127.0.0.1:22}: a pointer to C{--service}."""
    for source in sources:
        try:
            parse_service_spec(source)
        except SourceError:
            continue
        return f" (for {source} as one service, write --service {source})"
    return ""


def makeService(options: Options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    top = TopService(options, reactor)
    FrozenStartupHeap(reactor).setServiceParent(top)
    records = Records() if options["resolver"] else None
    caps = backend_caps(options)
    provider = Provider(ProviderConfig(
        max_backends=caps["max-backends"], backends_per_source=caps["max-backends-per-ip"],
        max_udp_flows=caps["max-udp-backends"],
        services=tuple(options["service-list"]), policy=options["policy"], connect_timeout=options["connect-timeout"],
        udp_idle_timeout=options["udp-idle-timeout"], window=options["window"], max_window=options["max-window"],
        window_budget=options["window-budget"], drain_timeout=options["drain-timeout"],
        udp_buffer=options["udp-buffer"]), reactor, records)
    if records is not None:
        add_http(top, options["resolver"], ResolverResource(records, options["resolver-auth"],
                                                               bool(options["resolver-open-listing"])), reactor,
                 SiteLimits.of(options))
    add_metrics_listener(top, provider, "provider", options["metrics"], reactor, SiteLimits.of(options))
    guard = EmfileGuard(reactor)   # pauses the --mux listeners on EMFILE
    guard.setServiceParent(top)
    add_node(top, provider, options, frames.ROLE_PROVIDER, reactor, guard=guard)
    if options["docker-endpoint"]:
        add_discovery(top, provider, options, reactor)
    return top


#: The "auto" --max-backends-per-ip at most: a gateway's default --max-conns-per-ip (256 at
#: most) plus --max-flows-per-ip (256).
PER_IP_MAX = 512


def backend_caps(options: Options, budget=None) -> dict[str, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit, log the fd budget, size the "auto" caps from it."""
    from twisted.logger import Logger

    budget = budget or raise_nofile()
    total = pick(options["max-backends"], budget.usable())
    # Per IP: one client may hold a gateway's default 256 TCP connections and 256 UDP flows,
    # each a backend socket here, so the provider's cap must not bind before the gateway's:
    # 512, but never more than half of what this provider holds (half its fds at 1,024).
    per_ip, _ = default_caps(total or budget.usable(), share=2, per_source_max=PER_IP_MAX)
    caps = {
        "max-backends": total,
        "max-backends-per-ip": pick(options["max-backends-per-ip"], per_ip),
        "max-udp-backends": pick(options["max-udp-backends"], max(1, total // 2) if total else 0),
    }
    Logger(namespace="pipegate.provider").info(
        "fd budget: {soft} descriptors (soft limit was {before}, hard {hard}); backend sockets "
        "{total} in all, {per_ip} per client IP, {udp} of them UDP flows",
        soft=budget.soft, before=budget.before, hard=budget.hard, total=caps["max-backends"],
        per_ip=caps["max-backends-per-ip"], udp=caps["max-udp-backends"])
    log_node_start("provider", budget, {"max-backends": options["max-backends"] or 0}, options)
    return caps


def add_discovery(top: service.MultiService, provider: Provider, options: Options, reactor) -> None:
    """Docker mode: discovered services are merged with the --services ones on every change."""
    from twisted.logger import Logger

    from pipegate.ports.docker.containers import merge_with_static
    from pipegate.ports.docker.discovery import DockerDiscovery
    from pipegate.ports.engine import EngineClient

    log = Logger(namespace="pipegate.docker")
    static = list(options["service-list"])

    def publish(discovered):
        provider.set_services(merge_with_static(static, discovered, lambda m: log.warn("{m}", m=m)))

    engine = EngineClient(reactor, options["docker-endpoint"])
    DockerDiscovery(engine, options["network"], options["refresh"], publish, reactor,
                    max_ports=options["docker-max-ports"]).setServiceParent(top)
