"""twistd pipegate-server: the public HTTP relay."""

from __future__ import annotations

from twisted.application import service
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from pipegate import auth
from pipegate.config import (API_PARAMETERS, EnvOptions, TopService, endpoint_hint, non_negative_float,
                             non_negative_int, positive_float, positive_int)
from pipegate.http.acmeoptions import ACME_FLAGS, ACME_PARAMETERS, AcmeOptions, acme_for
from pipegate.http.public import RelaySite
from pipegate.http.relay import Relay, RelayConfig
from pipegate.mux.options import HUB_PARAMETERS, HubOptions
from pipegate.opslistener import add_metrics_listener
from pipegate.heap import FrozenStartupHeap
from pipegate.accept import ConnectionGate, EmfileGuard, SiteLimits, listener as guarded_listener
from pipegate.core.budget import Budget, SourceRate
from pipegate.fdlimit import default_caps, overcommitted, raise_nofile
from pipegate.startup import relay_line


def _fetch(url: str) -> bytes:
    from pipegate.tap.provider import fetch

    return fetch(url)


class Options(AcmeOptions, HubOptions, EnvOptions):
    synopsis = "[options]"
    longdesc = (
        "Run the public HTTP relay. Connectors log in over a WebSocket with a JWT; public "
        "callers reach /<connection-id>/<path>. Every option also reads PIPEGATE_<OPTION> "
        "(for example PIPEGATE_MAX_IN_FLIGHT); a flag beats the variable. The JWT secret comes "
        "from PIPEGATE_JWT_SECRET."
    )
    optFlags = [
        ["access-log", None, "Write an access log line per request (tokens are redacted)."],
    ] + ACME_FLAGS
    optParameters = [
        ["listen", "l", "tcp:8000", "Server endpoint to listen on (tcp:PORT, ssl:..., systemd:..., unix:...)."],
        ["domain", None, None, "Also route Host: <id>.<domain> to tunnel <id>."],
        ["max-body-bytes", None, "0", "Largest request body accepted, in bytes; 0 = unlimited (bodies stream). Larger -> 413.",
         non_negative_int],
        ["max-in-flight", None, "100", "Requests in flight per tunnel; beyond it -> 503.", positive_int],
        ["request-timeout", None, "300", "Seconds to wait for the local app's answer (and longest pause inside a body) before 504.",
         non_negative_float],
        ["min-body-rate", None, "500", "Bytes a second a request body must average after --body-grace "
                                       "(time the relay does not read is not counted); slower -> 408. 0 = off.",
         non_negative_float],
        ["body-grace", None, "20", "Seconds a request body may take before --min-body-rate applies.",
         positive_float],
        ["min-download-rate", None, "500", "Bytes a second a caller must take an answer at, on average over the time "
                                           "its connection pushes back, after --download-grace; slower is cut. 0 = off.",
         non_negative_float],
        ["download-grace", None, "20", "Seconds a caller may push back on an answer before --min-download-rate applies.",
         positive_float],
        ["offline-grace", None, "0", "Seconds a request for a tunnel with no connector waits for one; 0 = answer 404 at once.",
         non_negative_float],
        ["ping-interval", None, "20", "Seconds between WebSocket pings to connectors; a link that does not answer within it is closed. 0 = off.",
         non_negative_float],
        ["idle-timeout", None, "60", "Seconds an idle public HTTP connection is kept open; 0 = forever.",
         non_negative_float],
        ["tunnel-rate", None, "0", "Mbit/s each tunnel may move per direction (1 s of burst); 0 = unlimited.",
         non_negative_float],
        ["jwt-algorithms", None, "HS256", "Accepted JWT algorithms: a JSON list or a comma list of HS256/HS384/HS512."],
        ["jwt-issuer", None, "pipegate", "Required JWT iss claim."],
        ["jwt-audience", None, "pipegate", "Required JWT aud claim."],
        ["drain-timeout", None, "30", "Seconds requests in flight may take to finish on SIGTERM before they are cut.",
         non_negative_float],
        ["max-window", None, "4194304", "Credit window a response grows to while its caller keeps up, in bytes "
                                        "(at most 262144, the initial window: it stays there).",
         positive_int],
        ["window-budget", None, "8388608", "Bytes by which all responses' windows together may grow beyond "
                                            "the initial 262144.", non_negative_int],
        ["metrics", None, None, "Server endpoint for /metrics (Prometheus) and /status (JSON), off unless "
                                "given, e.g. tcp:9100:interface=127.0.0.1."],
        ["tls-cert", None, None, "PEM certificate (chain) to serve TLS on --listen; reloaded on SIGHUP."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["revoked", None, None, "File of revoked token ids (jti) and connection ids, one a line, # comments; "
                                "re-read when it changes and on SIGHUP."],
        # The public edge against hostile callers (issue 17; docs/reliability.md "Abuse")
        ["upgrade-idle-timeout", None, "300", "Seconds an upgraded (101) passthrough connection may carry "
                                              "no byte either way before it is closed; 0 = forever.",
         non_negative_float],
        ["caller-share", None, "50", "Percent of a tunnel's in-flight slots (see max-in-flight) that requests from one "
                                     "caller IP may hold while waiting for their answer (and as upgraded "
                                     "pipes); beyond it -> 503.", positive_int],
        ["max-connections", None, "0", "Public connections open at once, all callers together; past it new "
                                       "ones are refused. 0 = derived from the fd budget.", non_negative_int],
        ["max-connections-per-ip", None, "0", "Public connections open at once from one IP (--trusted-proxy "
                                              "peers are exempt); 0 = derived from the fd budget.",
         non_negative_int],
        ["conn-rate-per-ip", None, "50", "New public connections a second from one IP (--trusted-proxy peers are "
                                         "exempt), in bursts of --max-connections-per-ip; 0 = no limit.",
         non_negative_float],
        ["backlog", None, "1024", "Listen backlog of the public listener when its endpoint string names none "
                                  "(tcp:, ssl:, unix:).", positive_int],
        ["status-token", None, None, "Bearer token that /status on --metrics requires; without it /status "
                                     "answers loopback peers only."],
    ] + HUB_PARAMETERS + ACME_PARAMETERS + API_PARAMETERS
    optRepeatable = [
        ["ingress-policy", False, "Ingress policy for public callers (deny -> 403): inline JSON, a file or a URL; "
                                  "repeatable."],
        ["trusted-proxy", False, "Proxy whose X-Forwarded-For/-Proto the relay believes: IP, CIDR or comma "
                                 "list; repeatable."],   # (the variable: one comma list)
    ]

    def check(self) -> None:
        # The policy and proxy code loads only for the options that need it, and then here,
        # at startup, so that a broken module stops the relay at once (tests/test_lean_startup.py).
        self["policy"] = None   # (no --ingress-policy: every caller is let in, unshaped)
        if self["ingress-policy"]:
            from pipegate.core.policy import PolicyError
            from pipegate.core.policydoc import load_policy

            try:
                self["policy"] = load_policy(self["ingress-policy"], _fetch)[0]
            except PolicyError as e:
                raise usage.UsageError(f"--ingress-policy: {e}") from None
        self["trusted-proxies"] = None   # (no --trusted-proxy: no forwarding header is believed)
        if self["trusted-proxy"]:
            from pipegate.http.forwarded import parse_trusted_proxies

            try:
                self["trusted-proxies"] = parse_trusted_proxies(",".join(self["trusted-proxy"]))
            except ValueError as e:
                raise usage.UsageError(f"--trusted-proxy: {e}") from None
        try:
            self["jwt"] = auth.JWTSettings.from_values(
                self.environ.get("PIPEGATE_JWT_SECRET"), self["jwt-algorithms"],
                self["jwt-issuer"], self["jwt-audience"])
        except auth.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        from twisted.internet import reactor

        try:
            endpoints.serverFromString(reactor, self["listen"])
        except (IndexError, KeyError) if self["listen"].startswith("systemd:") else ():
            raise usage.UsageError(
                f"--listen: {self['listen']}: no such socket from systemd (LISTEN_FDS, LISTEN_FDNAMES, "
                "LISTEN_PID)") from None
        except Exception as e:  # endpoint parsers raise many kinds; all mean a bad value
            raise usage.UsageError(f"--listen: {e or type(e).__name__}{endpoint_hint(self['listen'])}") from None
        if self["caller-share"] > 100:
            raise usage.UsageError("--caller-share: a percentage, 1 to 100")
        if self["domain"] is not None and not self["domain"].strip("."):
            raise usage.UsageError("--domain: empty domain")
        self.check_hub()
        self.check_acme()
        from pipegate.config import check_server_endpoint

        check_server_endpoint("metrics", self["metrics"])
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        self["revocations"] = None
        if self["revoked"]:
            from pipegate.http.revocation import RevocationWatcher

            # Read once now: a missing or unreadable file stops startup (later, it keeps the last list).
            watcher = RevocationWatcher(self["revoked"], None, lambda revocations: None)
            try:
                watcher.load()
            except (OSError, UnicodeError) as e:
                raise usage.UsageError(f"--revoked: {e}") from None
            self["revocations"] = watcher
        self["tls"] = None
        if self["tls-cert"]:
            from pipegate.tlsreload import CertificateError, ReloadingServerTLS

            try:
                self["tls"] = ReloadingServerTLS(self["tls-cert"], self["tls-key"])
            except CertificateError as e:
                raise usage.UsageError(f"--{e.option}: {e}") from None


def relay_config(options: Options) -> RelayConfig:
    return RelayConfig(
        jwt=options["jwt"],
        domain=options["domain"].strip(".") if options["domain"] else None,
        max_body_bytes=options["max-body-bytes"],
        max_in_flight=options["max-in-flight"],
        request_timeout=options["request-timeout"],
        min_body_rate=options["min-body-rate"],
        body_grace=options["body-grace"],
        min_download_rate=options["min-download-rate"],
        download_grace=options["download-grace"],
        offline_grace=options["offline-grace"],
        ping_interval=options["ping-interval"],
        idle_timeout=options["idle-timeout"],
        access_log=bool(options["access-log"]),
        policy=options["policy"],
        tunnel_rate=options["tunnel-rate"] * 1e6 / 8,
        drain_timeout=options["drain-timeout"],
        max_window=options["max-window"],
        window_budget=options["window-budget"],
        trusted_proxies=options["trusted-proxies"],
        upgrade_idle_timeout=options["upgrade-idle-timeout"],
        caller_share=options["caller-share"],
    )


class _TrustedPeers:
    """The peers --trusted-proxy names (None: nobody), as a set of IPs for L{Budget.exempt}."""

    def __init__(self, trusted) -> None:
        self.trusted = trusted

    def __contains__(self, ip) -> bool:
        if not self.trusted or not isinstance(ip, str):
            return False
        return self.trusted.trusts_peer(ip)


log = Logger(namespace="pipegate.tap.server")


def connection_caps(options: Options, usable: int) -> tuple[int, int]:
    """(per IP, total) public connections: the options, or what the fd budget allows."""
    _, total = default_caps(usable, per_unit=1)
    total = options["max-connections"] or total
    # A quarter of the total actually in force (documented so), never above 256: a per-IP
    # cap above --max-connections would let one stranger hold every connection.
    return options["max-connections-per-ip"] or max(1, min(256, total // 4)), total


def connection_rate(options: Options, per_ip: int) -> SourceRate | None:
    """
    New public connections per IP over time (C{--conn-rate-per-ip}), in bursts of the per-IP
    cap in force: what that cap cannot stop is one address opening and closing connections
    one after another, each a TLS handshake (about a millisecond of CPU) on an https listener.
    """
    rate = options["conn-rate-per-ip"]
    return SourceRate(rate, per_ip) if rate else None


def behind_proxy(description: str) -> bool:
    """
    True for a C{haproxy:} listener: at accept the peer is the proxy and the caller is known
    only from the PROXY header, so its connections meet the total cap, not the per-IP one.
    """
    return description.lower().startswith("haproxy:")


def makeService(options: Options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    top = TopService(options, reactor)
    FrozenStartupHeap(reactor).setServiceParent(top)
    fds = raise_nofile()
    usable = fds.usable()
    if options["mux"]:  # the hub's links come out of the same budget: keep up to half for them
        usable -= min(usable // 2, options["mux-max-peers"])
    per_ip, total = connection_caps(options, usable)
    rate = connection_rate(options, per_ip)
    log.info("file descriptors: soft limit {soft} (was {before}), hard {hard}; public connections capped "
             "at {per_ip} per IP and {total} in total; new ones at {rate:g} a second per IP "
             "(0 = no limit)", soft=fds.soft, before=fds.before, hard=fds.hard, per_ip=per_ip, total=total,
             rate=options["conn-rate-per-ip"])
    warning = overcommitted(fds, {"max-connections": options["max-connections"]})
    if warning:
        log.warn("{problem}", problem=warning)
    log.info("{line}", line=relay_line(options, per_ip, total))
    if options.get("tls") is not None:
        options["tls"].warn_problem()
    if options.get("mux-tls-problem"):   # the hub's certificate (check_link_options)
        log.warn("--mux-tls-cert {path}: {tls_problem}", path=options["mux-tls-cert"],
                 tls_problem=options["mux-tls-problem"])
    relay = Relay(relay_config(options), reactor)
    reloads = []
    if options.get("revocations") is not None:
        watcher = options["revocations"]   # read by check(); polled from now on
        watcher.clock, watcher.on_change = reactor, relay.tunnels.set_revocations
        relay.tunnels.set_revocations(watcher.current)
        watcher.setServiceParent(top)
        reloads.append(watcher.reload)
    hub = None
    if options["mux"]:   # the hub's machinery (mux sessions, TLS) loads only when it is asked for
        from pipegate.mux.hub import add_hub, hub_node

        hub = hub_node(options)
    acme = acme_for(options, relay, reactor)   # None without --acme-directory
    add_metrics_listener(top, relay, "relay", options["metrics"], reactor, SiteLimits.of(options), hub,
                         acme.manager if acme else None, status_token=options["status-token"])
    relay.setServiceParent(top)
    factory = RelaySite(relay) if acme is None else acme.plain_site(relay)
    tls = options.get("tls")
    if tls is not None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(tls, False, factory)
    # SIGHUP (systemctl reload) reloads the certificate and the --revoked file; without
    # either it must not kill the relay.
    from pipegate.tlsreload import ReloadOnSignal, nothing_to_reload

    if tls is not None:
        reloads.insert(0, tls.reload)

    def reload_all() -> None:
        for reload in reloads:
            reload()

    ReloadOnSignal(reload_all if reloads else nothing_to_reload, reactor).setServiceParent(top)
    budget = Budget(per_source=per_ip, total=total, exempt=_TrustedPeers(options["trusted-proxies"]))
    factory = ConnectionGate(factory, budget, reactor, what="relay", per_source=not behind_proxy(options["listen"]),
                             rate=rate, on_refused=lambda cap: relay.stats.inc("connections_refused", cap),
                             plain_http=tls is None)   # a wss:// client at a plain port is cut at once
    guard = EmfileGuard(reactor, on_pause=lambda: relay.stats.inc("connections_refused", "emfile"))
    guard.setServiceParent(top)
    # Added last so that it stops first: no new connections while the relay drains.
    listener = guarded_listener(options["listen"], factory, reactor, backlog=options["backlog"], guard=guard)
    listener.setServiceParent(top)
    if acme is not None:
        # The --https listener shares the public listener's connection budget, EMFILE
        # guard and backlog: one caller's connections count once, whichever port.
        def https_listener(description: str, https_factory):
            gated = ConnectionGate(https_factory, budget, reactor, what="relay https",
                                   per_source=not behind_proxy(description), rate=rate,
                                   on_refused=lambda cap: relay.stats.inc("connections_refused", cap))
            return guarded_listener(description, gated, reactor, backlog=options["backlog"], guard=guard)
        acme.add_services(top, relay, reactor, https_listener)
    if hub is not None:
        add_hub(top, options, reactor, hub)
    return top
