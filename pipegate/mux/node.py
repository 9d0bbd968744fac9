"""
Listening for and dialling mux links, shared by the provider and the gateway:
C{--mux} server endpoints and C{--connect} client endpoints (reconnecting with
jittered backoff), both wrapped in TLS, plus the options every port-plane service has.
"""

from __future__ import annotations

import os

from twisted.application import service, strports
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from pipegate.accept import ConnectionGate, EmfileGuard, listener
from pipegate.config import EnvOptions, check_server_endpoint, non_negative_float, non_negative_int, positive_float, positive_int
from pipegate.drain import AfterDrain, Drainer
from pipegate.mux import frames, tls
from pipegate.mux.hello import parse_router_secret
from pipegate.mux.session import LinkConfig, LinkFactory
from pipegate.core.budget import Budget, LogThrottle
from pipegate.dialer import Redialer, ReportingEndpoint, describe_connect_error
from pipegate.stats import stats_of


class MuxOptions(EnvOptions):
    """Options shared by pipegate-provider and pipegate-gateway."""

    optParameters = [
        ["router", None, None, "Router secret shared by providers and gateways: 64 hex characters "
                               "(`pipegate router-secret` makes one). Required."],
        ["tls-key", None, None, "PEM private key for this node's TLS certificate (default: a generated one)."],
        ["tls-cert", None, None, "PEM certificate matching --tls-key."],
        ["tls-verify", None, None, "Check the certificate of peers we dial against this host name."],
        ["tls-ca", None, None, "PEM CA certificate for --tls-verify (default: the system's trust store)."],
        ["max-frame-size", None, "1048576", "Largest mux frame accepted, in bytes.", positive_int],
        ["window", None, "262144", "Per-channel initial credit window, in bytes, each direction.",
         positive_int],
        ["max-window", None, str(frames.MAX_WINDOW),
         "Credit window a channel grows to while its socket keeps up, in bytes "
         "(at most --window: the window stays at --window).", positive_int],
        ["window-budget", None, str(frames.WINDOW_BUDGET),
         "Bytes by which all channels' windows together may grow beyond --window.", non_negative_int],
        ["ping-interval", None, "10", "Seconds between pings on a link.", positive_float],
        ["ping-deadline", None, "30", "A link silent for this many seconds is closed.", positive_float],
        ["handshake-timeout", None, "10", "Seconds a new link has to complete TLS and admission.",
         positive_float],
        ["max-channels", None, "10000", "Channels per link.", positive_int],
        ["udp-idle-timeout", None, "120", "Seconds after which an idle UDP flow is closed.", positive_float],
        ["drain-timeout", None, "30", "Seconds open channels may take to finish on SIGTERM before they are cut.",
         non_negative_float],
        ["metrics", None, None, "Server endpoint for /metrics (Prometheus) and /status (JSON), off unless "
                                "given, e.g. tcp:9100:interface=127.0.0.1."],
        ["udp-buffer", None, "2097152", "Kernel receive and send buffer of each UDP socket, in bytes.",
         positive_int],
        ["mux-max-conns-per-ip", None, "100", "Connections to --mux from one IP address (an IPv6 one by its "
                                              "/64), admitted or not; 0 = no cap.", non_negative_int],
        ["mux-max-conns", None, "2000", "Connections to --mux in all, admitted or not; 0 = no cap.",
         non_negative_int],
    ]
    optRepeatable = [
        ["mux", True, "Server endpoint to accept peer links on (e.g. tcp:7000); repeatable. TLS is added."],
        ["connect", True, "Client endpoint of a peer to dial (e.g. tcp:gw.example.com:7000); repeatable. "
                          "TLS is added."],
    ]

    def check(self) -> None:
        if not self["router"]:
            raise usage.UsageError("--router: the router secret is required (or PIPEGATE_ROUTER)")
        try:
            self["secret"] = parse_router_secret(self["router"])
        except ValueError as e:
            raise usage.UsageError(f"--router: {e}") from None
        if not self["mux"] and not self["connect"]:
            raise usage.UsageError("--mux or --connect: give at least one (where to meet peers)")
        from twisted.internet import reactor

        for value in self["mux"]:
            try:
                endpoints.serverFromString(reactor, value)
            except Exception as e:
                raise usage.UsageError(f"--mux: {value}: {e or type(e).__name__}") from None
        for value in self["connect"]:
            try:
                endpoints.clientFromString(reactor, value)
            except Exception as e:
                raise usage.UsageError(f"--connect: {value}: {e or type(e).__name__}") from None
        check_server_endpoint("metrics", self["metrics"])
        check_link_options(self)


def check_link_options(options, prefix: str = "") -> None:
    """
    The link options the ends and the hub share (the hub's carry the C{mux-} C{prefix}):
    TLS key and certificate together and readable, a frame limit that carries full DATA,
    a ping deadline longer than the interval.
    """
    key, cert = prefix + "tls-key", prefix + "tls-cert"
    if bool(options[key]) != bool(options[cert]):
        raise usage.UsageError(f"--{key} and --{cert} go together")
    for name in (key, cert, prefix + "tls-ca"):
        if options.get(name) and not os.path.isfile(options[name]):
            raise usage.UsageError(f"--{name}: no such file: {options[name]}")
    if options[prefix + "max-frame-size"] < frames.MIN_MAX_FRAME_SIZE:
        raise usage.UsageError(f"--{prefix}max-frame-size: must be at least {frames.MIN_MAX_FRAME_SIZE}")
    if options[prefix + "ping-deadline"] <= options[prefix + "ping-interval"]:
        raise usage.UsageError(f"--{prefix}ping-deadline: must be longer than --{prefix}ping-interval")


def link_config(options: MuxOptions, role: int) -> LinkConfig:
    return LinkConfig(
        secret=options["secret"], role=role, max_frame_size=options["max-frame-size"],
        window=options["window"], ping_interval=options["ping-interval"],
        ping_deadline=options["ping-deadline"], handshake_timeout=options["handshake-timeout"],
        max_channels=options["max-channels"],
    )


def link_services(node, config: LinkConfig, reactor, mux: list[str], connect: list[str], *,
                  certificate=None, verify_hostname=None, ca_file=None, retry_policy=None,
                  budget: Budget | None = None, guard: EmfileGuard | None = None) -> list:
    """
    Services that accept (--mux) and dial (--connect) links for C{node}.

    A stranger can reach a --mux listener before any secret is checked, so each one is held
    to C{budget} (connections per IP and in all, from accept until close, over all --mux
    listeners), listens with a deep backlog (L{accept.DEFAULT_BACKLOG} unless the endpoint
    names one), is paused by C{guard} on EMFILE, and logs links that end before admission at
    most once per 10 s.
    """
    certificate = certificate or tls.generated_certificate()
    services: list[service.Service] = []
    stats = stats_of(node)
    for description in mux:
        links = LinkFactory(node, config, reactor, False, unadmitted_log=LogThrottle())
        factory = tls.server_factory(certificate, links)
        if budget is not None:
            factory = ConnectionGate(factory, budget, reactor, what=f"--mux {description}",
                                     on_refused=lambda cap: stats.inc("admission_failures", "cap"))
        services.append(listener(description, factory, reactor, guard=guard))
    for description in connect:
        endpoint = tls.client_endpoint(reactor, description, verify_hostname, ca_file)
        # The delay grows over failed admissions (a wrong router secret), not only over
        # failed TCP connects, and resets once a link is admitted (core/redial.py).
        endpoint = ReportingEndpoint(endpoint, DialFailures(description))
        services.append(LinkFactory(node, config, reactor, True).dialer(endpoint, retry_policy))
    return services


class DialFailures:
    """Logs why a dial of C{description} failed, in the words of describe_connect_error."""

    log = Logger()

    def __init__(self, description: str) -> None:
        self.description = description

    def __call__(self, failure) -> None:
        self.log.warn("cannot connect to {peer}: {why}", peer=self.description,
                      why=describe_connect_error(failure.value))


def certificate_from(options: MuxOptions):
    if options["tls-key"]:
        return tls.load_certificate(options["tls-key"], options["tls-cert"])
    return None


def add_node(top: service.MultiService, node, options: MuxOptions, role: int, reactor,
             guard: EmfileGuard | None = None) -> None:
    """Add C{node} and its link listeners (capped, watched by C{guard}) and dialers to C{top}."""
    # Dialers stop only once the node has drained: stopping a ClientService cuts its link.
    later = AfterDrain(node) if isinstance(node, Drainer) else top
    budget = Budget(options["mux-max-conns-per-ip"], options["mux-max-conns"])   # all --mux listeners
    for svc in link_services(node, link_config(options, role), reactor, options["mux"], options["connect"],
                             certificate=certificate_from(options), verify_hostname=options["tls-verify"],
                             ca_file=options["tls-ca"], budget=budget, guard=guard):
        svc.setServiceParent(later if isinstance(svc, Redialer) else top)
    if later is not top:
        later.setServiceParent(top)
    # Added last so that it stops first: links get a GOAWAY before their listeners
    # and dialers go.
    node.setServiceParent(top)


def add_http(top: service.MultiService, description: str, root, reactor) -> None:
    """Serve C{root} (a small JSON API: resolver, /unlimited) on server endpoint C{description}."""
    from twisted.web import server

    site = server.Site(root)
    site.noisy = False
    strports.service(description, site, reactor=reactor).setServiceParent(top)
