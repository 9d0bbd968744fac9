"""
The port plane's option tables, apart from the machinery: L{MuxOptions} (what
pipegate-provider and pipegate-gateway share), L{check_link_options}, and the hub's
C{--mux-*} options of pipegate-server (L{HUB_PARAMETERS},
L{HubOptions}).  The relay parses these on every start; importing them must not load
the mux session, TLS and hub code (L{pipegate.mux.node}, L{pipegate.mux.hub}), which
only C{--mux} needs, nor the frame codec (L{pipegate.mux.frames}): the defaults it
shares with the codec are written out here (tests/test_lean_startup.py checks that they
agree), and the checks that need the codec import it when they run.
"""

from __future__ import annotations

import os

from twisted.internet import endpoints
from twisted.python import usage

from pipegate.core.budget import SourceRate
from pipegate.config import (
    API_PARAMETERS, EnvOptions, auto_or_positive_int, check_server_endpoint, endpoint_hint, non_negative_float, non_negative_int,
    positive_float, positive_int,
)


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
        ["max-window", None, "2097152",   # frames.MAX_WINDOW (tests/test_lean_startup.py checks)
         "Credit window a channel grows to while its socket keeps up, in bytes "
         "(at most --window: the window stays at --window).", positive_int],
        ["window-budget", None, "2097152",   # frames.WINDOW_BUDGET
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
                                              "/64), admitted or not (TLS handshakes count); 0 = no cap.",
         non_negative_int],
        ["mux-max-conns", None, "2000", "Connections to --mux in all, admitted or not; 0 = no cap.",
         non_negative_int],
        ["mux-conn-rate-per-ip", None, "10", "New connections a second to --mux from one IP address (each "
                                             "costs a TLS handshake), in bursts of --mux-max-conns-per-ip; "
                                             "0 = no limit.", non_negative_float],
    ] + API_PARAMETERS
    optRepeatable = [
        ["mux", True, "Server endpoint to accept peer links on (e.g. tcp:7000); repeatable. TLS is added."],
        ["connect", True, "Client endpoint of a peer to dial (e.g. tcp:gw.example.com:7000); repeatable. "
                          "TLS is added."],
    ]

    def check(self) -> None:
        from pipegate.mux.hello import parse_router_secret   # (with the frame codec: not at import)

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
                raise usage.UsageError(f"--mux: {value}: {e or type(e).__name__}{endpoint_hint(value)}") from None
        for value in self["connect"]:
            try:
                endpoints.clientFromString(reactor, value)
            except Exception as e:
                raise usage.UsageError(f"--connect: {value}: {e or type(e).__name__}{endpoint_hint(value)}") from None
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
    if options.get(prefix + "tls-ca"):
        from pipegate.config import check_pem_certificate

        check_pem_certificate(prefix + "tls-ca", options[prefix + "tls-ca"])
    if options[cert]:
        options[prefix + "tls-problem"] = _check_certificate(options[cert], options[key], prefix)
    from pipegate.mux import frames

    if options[prefix + "max-frame-size"] < frames.MIN_MAX_FRAME_SIZE:
        raise usage.UsageError(f"--{prefix}max-frame-size: must be at least {frames.MIN_MAX_FRAME_SIZE}")
    if options[prefix + "ping-deadline"] <= options[prefix + "ping-interval"]:
        raise usage.UsageError(f"--{prefix}ping-deadline: must be longer than --{prefix}ping-interval")


def _check_certificate(cert_path: str, key_path: str, prefix: str) -> str | None:
    """
    Load the pair as the links will: an unreadable file, a key that does not match, or a
    file that is not PEM stops the start with one line naming its option; returns what is
    wrong with the validity period, if anything (expired, not yet valid, expiring soon), for
    a warning once the service logs.
    """
    from twisted.internet import reactor

    from pipegate.tlsreload import CertificateError, certificate_problem, load_options

    try:
        tls = load_options(cert_path, key_path)
    except CertificateError as e:
        raise usage.UsageError(f"--{prefix}{e.option}: {e}") from None
    return certificate_problem(tls, reactor)


# --- options -----------------------------------------------------------------------

# The link options of pipegate-provider/-gateway, as --mux-<name> on pipegate-server
# (the --mux-max-conns* caps of the --mux listener are already named so: as they are).
_SHARED = ("tls-key", "tls-cert", "max-frame-size", "window", "max-window", "ping-interval", "ping-deadline",
           "handshake-timeout", "max-channels", "mux-max-conns-per-ip", "mux-max-conns", "mux-conn-rate-per-ip")
# The hub's --mux-max-window bounds what the ends may grant, so its default is the largest
# --max-window an end has had by default (4 MiB before the ends' default went to 2 MiB).
# ("4194304": frames.HUB_MAX_WINDOW)
_HUB_OWN = {"max-window": ["4194304", "The most credit per channel and direction an end "
                           "may grant, in bytes (at least the ends' --max-window)."]}
HUB_PARAMETERS = [[p[0] if p[0].startswith("mux-") else "mux-" + p[0], None,
                   *_HUB_OWN.get(p[0], [p[2], p[3].replace("--tls-key", "--mux-tls-key")]),
                   MuxOptions.converters.get(p[0])]
                  for p in MuxOptions.optParameters if p[0] in _SHARED] + [
    ["mux-max-peers", None, "1000", "Links the hub accepts at once (providers, gateways and observers).",
     positive_int],
    ["mux-max-peers-per-router", None, "auto", "Links of one router the hub accepts at once, so that one "
                                               "router's peers cannot lock out another's; auto = "
                                               "--mux-max-peers divided by the number of routers.",
     auto_or_positive_int],
]


class HubOptions:
    """C{--mux} and C{--mux-router}, repeatable, for an L{EnvOptions} that lists L{HUB_PARAMETERS}."""

    optRepeatable = [
        ["mux", True, "Server endpoint where providers and gateways meet (port plane hub, TLS added); "
                      "repeatable."],
        ["mux-router", True, "A router secret the hub admits (64 hex characters); repeatable, one router each."],
    ]

    def check_hub(self) -> None:
        if not self["mux"]:
            if self["mux-router"]:
                raise usage.UsageError("--mux-router: needs --mux (where providers and gateways meet)")
            return
        from pipegate.mux.hello import parse_router_secret   # (with the frame codec: only with --mux)

        if not self["mux-router"]:
            raise usage.UsageError("--mux-router: at least one router secret is required with --mux")
        secrets: list[bytes] = []
        for value in self["mux-router"]:
            try:
                secret = parse_router_secret(value)
            except ValueError as e:
                raise usage.UsageError(f"--mux-router: {e}") from None
            if secret not in secrets:
                secrets.append(secret)
        self["mux-secrets"] = tuple(secrets)
        from twisted.internet import reactor

        for value in self["mux"]:
            try:
                endpoints.serverFromString(reactor, value)
            except Exception as e:
                raise usage.UsageError(f"--mux: {value}: {e or type(e).__name__}{endpoint_hint(value)}") from None
        check_link_options(self, "mux-")


def mux_rate(options) -> SourceRate | None:
    """New connections per IP to the --mux listeners (C{--mux-conn-rate-per-ip}; the hub's has
    the same name), in bursts of C{--mux-max-conns-per-ip} (100 when that is 0); None when 0."""
    rate = options["mux-conn-rate-per-ip"]
    return SourceRate(rate, options["mux-max-conns-per-ip"] or 100) if rate else None
