"""
Listening for and dialling mux links, shared by the provider and the gateway:
C{--mux} server endpoints and C{--connect} client endpoints (reconnecting with
jittered backoff), both wrapped in TLS.  The options every port-plane service has are in
L{pipegate.mux.options}.
"""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger

from pipegate.accept import ConnectionGate, EmfileGuard, SiteLimits, listener, small_site
from pipegate.drain import AfterDrain, Drainer
from pipegate.mux import tls
from pipegate.mux.options import MuxOptions, mux_rate
from pipegate.mux.session import LinkConfig, LinkFactory
from pipegate.core.budget import Budget, LogThrottle, SourceRate
from pipegate.dialer import Redialer, ReportingEndpoint, describe_connect_error
from pipegate.stats import stats_of


def link_config(options: MuxOptions, role: int) -> LinkConfig:
    return LinkConfig(
        secret=options["secret"], role=role, max_frame_size=options["max-frame-size"],
        window=options["window"], ping_interval=options["ping-interval"],
        ping_deadline=options["ping-deadline"], handshake_timeout=options["handshake-timeout"],
        max_channels=options["max-channels"],
    )


def link_services(node, config: LinkConfig, reactor, mux: list[str], connect: list[str], *,
                  certificate=None, verify_hostname=None, ca_file=None, retry_policy=None,
                  budget: Budget | None = None, guard: EmfileGuard | None = None,
                  rate: SourceRate | None = None) -> list:
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
            factory = ConnectionGate(factory, budget, reactor, what=f"--mux {description}", rate=rate,
                                     on_refused=lambda cap: stats.inc("admission_failures", "cap"))
        services.append(listener(description, factory, reactor, guard=guard))
    for description in connect:
        endpoint = tls.client_endpoint(reactor, description, verify_hostname, ca_file)
        # The delay grows over failed admissions (a wrong router secret), not only over
        # failed TCP connects, and resets once a link is admitted (core/redial.py).
        failures = DialFailures(description)
        links = LinkFactory(node, config, reactor, True)
        dialer = links.dialer(ReportingEndpoint(endpoint, failures), retry_policy)
        dialer.on_retry = failures.next_attempt
        services.append(dialer)
    return services


class DialFailures:
    """
    One line per failed dial of C{description}: why (in the words of describe_connect_error,
    when TCP or the name lookup failed) and the delay before the next attempt.
    """

    log = Logger()

    def __init__(self, description: str) -> None:
        self.description = description
        self._why: str | None = None

    def __call__(self, failure) -> None:
        """ReportingEndpoint: the connection attempt failed (the retry policy runs next)."""
        self._why = describe_connect_error(failure.value)

    def next_attempt(self, delay: float) -> None:
        """Redialer.on_retry: the retry policy picked C{delay}."""
        why, self._why = self._why, None
        if why is not None:
            self.log.warn("cannot connect to {peer}: {why}; next attempt in {delay:.1f} s",
                          peer=self.description, why=why, delay=delay)
        else:   # the link closed, or ended before admission (its own line said why)
            self.log.info("link to {peer} down; next attempt in {delay:.1f} s",
                          peer=self.description, delay=delay)


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
                             ca_file=options["tls-ca"], budget=budget, guard=guard, rate=mux_rate(options)):
        svc.setServiceParent(later if isinstance(svc, Redialer) else top)
    if later is not top:
        later.setServiceParent(top)
    # Added last so that it stops first: links get a GOAWAY before their listeners
    # and dialers go.
    node.setServiceParent(top)


def add_http(top: service.MultiService, description: str, root, reactor, limits: SiteLimits) -> None:
    """Serve C{root} (a small JSON API: resolver, /unlimited) on server endpoint C{description}."""
    from twisted.web import server

    site = server.Site(root, reactor=reactor)
    site.noisy = False
    small_site(description, site, reactor, description, limits).setServiceParent(top)
