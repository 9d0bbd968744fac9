"""twistd pipegate-server: the public HTTP relay."""

from __future__ import annotations

from twisted.application import service, strports
from twisted.internet import endpoints
from twisted.python import usage

from pipegate import auth
from pipegate.config import EnvOptions, non_negative_float, non_negative_int, positive_int
from pipegate.http.acme import ACME_CONVERTERS, ACME_FLAGS, ACME_PARAMETERS, AcmeOptions, acme_for
from pipegate.http.forwarded import parse_trusted_proxies
from pipegate.http.relay import Relay, RelayConfig, RelaySite
from pipegate.mux.hub import HUB_CONVERTERS, HUB_PARAMETERS, HubOptions, add_hub, hub_node
from pipegate.opslistener import add_metrics_listener
from pipegate.policy import PolicyError, load_policy
from pipegate.heap import FrozenStartupHeap


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
        ["max-body-bytes", None, "0", "Largest request body accepted, in bytes; 0 = unlimited (bodies stream). Larger -> 413."],
        ["max-in-flight", None, "100", "Requests in flight per tunnel; beyond it -> 503."],
        ["request-timeout", None, "300", "Seconds to wait for the local app's answer (and longest pause inside a body) before 504."],
        ["offline-grace", None, "0", "Seconds a request for a tunnel with no connector waits for one; 0 = answer 404 at once."],
        ["ping-interval", None, "20", "Seconds between WebSocket pings to connectors; a link that does not answer within it is closed. 0 = off."],
        ["idle-timeout", None, "60", "Seconds an idle public HTTP connection is kept open; 0 = forever."],
        ["tunnel-rate", None, "0", "Mbit/s each tunnel may move per direction (1 s of burst); 0 = unlimited."],
        ["jwt-algorithms", None, "HS256", "Accepted JWT algorithms: a JSON list or a comma list of HS256/HS384/HS512."],
        ["jwt-issuer", None, "pipegate", "Required JWT iss claim."],
        ["jwt-audience", None, "pipegate", "Required JWT aud claim."],
        ["drain-timeout", None, "30", "Seconds requests in flight may take to finish on SIGTERM before they are cut."],
        ["max-window", None, "4194304", "Credit window a response grows to while its caller keeps up, in bytes "
                                        "(at most 262144, the initial window: it stays there)."],
        ["window-budget", None, "8388608", "Bytes by which all responses' windows together may grow beyond "
                                            "the initial 262144."],
        ["metrics", None, None, "Server endpoint for /metrics (Prometheus) and /status (JSON), off unless "
                                "given, e.g. tcp:9100:interface=127.0.0.1."],
        ["tls-cert", None, None, "PEM certificate (chain) to serve TLS on --listen; reloaded on SIGHUP."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["revoked", None, None, "File of revoked token ids (jti) and connection ids, one a line, # comments; "
                                "re-read when it changes and on SIGHUP."],
    ] + HUB_PARAMETERS + ACME_PARAMETERS
    converters = {
        "max-body-bytes": non_negative_int,
        "max-in-flight": positive_int,
        "request-timeout": non_negative_float,
        "offline-grace": non_negative_float,
        "ping-interval": non_negative_float,
        "idle-timeout": non_negative_float,
        "tunnel-rate": non_negative_float,
        **HUB_CONVERTERS,
        **ACME_CONVERTERS,
        "drain-timeout": non_negative_float,
        "max-window": positive_int,
        "window-budget": non_negative_int,
    }

    def __init__(self) -> None:
        super().__init__()
        self["ingress-policy"] = []
        self["trusted-proxy"] = []
        self.init_hub()

    def opt_ingress_policy(self, value: str) -> None:
        """Ingress policy for public callers (deny -> 403): inline JSON, a file or a URL; repeatable."""
        self.append("ingress-policy", value)

    def opt_trusted_proxy(self, value: str) -> None:
        """Proxy whose X-Forwarded-For/-Proto the relay believes: IP, CIDR or comma list; repeatable."""
        self.append("trusted-proxy", value)

    def _apply_env(self) -> None:
        super()._apply_env()
        self.apply_hub_env()
        self.repeatable_from_env("ingress-policy")
        self.repeatable_from_env("trusted-proxy")   # one comma list

    def check(self) -> None:
        try:
            self["policy"] = load_policy(self["ingress-policy"], _fetch)[0]
        except PolicyError as e:
            raise usage.UsageError(f"--ingress-policy: {e}") from None
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
            raise usage.UsageError(f"--listen: {e or type(e).__name__}") from None
        if self["domain"] is not None and not self["domain"].strip("."):
            raise usage.UsageError("--domain: empty domain")
        self.check_hub()
        self.check_acme()
        from pipegate.mux.node import check_server_endpoint

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
                raise usage.UsageError(f"--tls-cert: {e}") from None


def relay_config(options: Options) -> RelayConfig:
    return RelayConfig(
        jwt=options["jwt"],
        domain=options["domain"].strip(".") if options["domain"] else None,
        max_body_bytes=options["max-body-bytes"],
        max_in_flight=options["max-in-flight"],
        request_timeout=options["request-timeout"],
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
    )


def makeService(options: Options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    FrozenStartupHeap(reactor).setServiceParent(top)
    relay = Relay(relay_config(options), reactor)
    reloads = []
    if options.get("revocations") is not None:
        watcher = options["revocations"]   # read by check(); polled from now on
        watcher.clock, watcher.on_change = reactor, relay.set_revocations
        relay.set_revocations(watcher.current)
        watcher.setServiceParent(top)
        reloads.append(watcher.reload)
    hub = hub_node(options)
    acme = acme_for(options, relay, reactor)   # None without --acme-directory
    add_metrics_listener(top, relay, "relay", options["metrics"], reactor, hub,
                         acme.manager if acme else None)
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
    # Added last so that it stops first: no new connections while the relay drains.
    listener = strports.service(options["listen"], factory, reactor=reactor)
    listener.setServiceParent(top)
    if acme is not None:
        acme.add_services(top, relay, reactor)
    add_hub(top, options, reactor, hub)
    return top
