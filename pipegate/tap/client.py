"""twistd pipegate-client TARGET_URL SERVER_URL: the connector."""

from __future__ import annotations

import os
import sys
import time
from urllib.parse import parse_qs, urlsplit

from twisted.application import service
from twisted.python import usage

from pipegate import auth
from pipegate.accept import SiteLimits
from pipegate.config import (API_PARAMETERS, EX_NOPERM, EnvOptions, TopService, non_negative_float,
                             non_negative_int, positive_float, positive_int)
from pipegate.http.connector import Connector
from pipegate.http.target import ConnectorConfig, ConnectorError, Target
from pipegate.http.visitors import VisitorPolicy, VisitorPolicyError, parse_credentials, parse_network
from pipegate.heap import FrozenStartupHeap


def pasted_token(value: str | None) -> str | None:
    """A token as pasted: the spaces around it, a C{Bearer} or C{JWT Bearer:} label before it, dropped."""
    if value is None:
        return None
    words = value.split()
    return words[-1] if words and words[0].rstrip(":") in ("Bearer", "JWT") else value.strip()


class Options(EnvOptions):
    synopsis = "[options] TARGET_URL SERVER_URL"
    longdesc = (
        "Connect to a relay at SERVER_URL (ws://host:port[/<connection-id>] or wss://...) and "
        "forward its requests to the local web app at TARGET_URL (http://127.0.0.1:3000). "
        "The token comes from --token, PIPEGATE_TOKEN, ?token= in SERVER_URL, or is minted "
        "locally when PIPEGATE_JWT_SECRET is set."
    )
    optParameters = [
        ["token", "t", None, "JWT to log in with (sub = connection id)."],
        ["ca-file", None, None, "PEM file of the CA that signed the relay's certificate (wss://)."],
        ["max-streams", None, "256", "Requests handled at once; beyond it the relay gets 503.", positive_int],
        ["connect-timeout", None, "10", "Seconds to connect to the local app before 502.", positive_float],
        ["ping-interval", None, "20", "Seconds between WebSocket pings to the relay; 0 = off.",
         non_negative_float],
        ["max-window", None, "4194304", "Credit window a request body grows to while the local app keeps up, "
                                        "in bytes (at most 262144, the initial window: it stays there).",
         positive_int],
        ["window-budget", None, "8388608", "Bytes by which all request bodies' windows together may grow "
                                            "beyond the initial 262144.", non_negative_int],
        ["metrics", None, None, "Server endpoint for /metrics (Prometheus) and /status (JSON), off unless given."],
        ["inspect", None, None, "Server endpoint of the request inspector (page, API, replay), off unless given; "
                                "it shows bodies and headers: keep it on loopback (tcp:4040:interface=127.0.0.1)."],
        ["inspect-max", None, "500", "Requests the inspector keeps (the oldest are dropped).", positive_int],
        ["inspect-body-bytes", None, "65536", "Bytes of each request and response body the inspector keeps.",
         non_negative_int],
        ["drain-timeout", None, "30", "Seconds requests in flight may take to finish on SIGTERM before they are cut.",
         non_negative_float],
    ] + API_PARAMETERS
    optFlags = [
        ["shared", None, "Mint the token this connector makes for itself with shared=true (PIPEGATE_JWT_SECRET "
                         "set, no --token), so that several connectors may serve one tunnel."],
    ]
    optRepeatable = [   # (variables: space-separated lists)
        ["basic-auth", True, "USER:PASSWORD callers must give (HTTP basic auth, checked by the relay); repeatable."],
        ["allow", True, "Only callers from this IP or CIDR (IPv4/IPv6) may reach the tunnel; repeatable."],
        ["deny", True, "Callers from this IP or CIDR get 403 (beats --allow); repeatable."],
    ]

    def parseArgs(self, target_url=None, server_url=None):
        self["target-url"] = target_url or self.environ.get("PIPEGATE_TARGET_URL")
        self["server-url"] = server_url or self.environ.get("PIPEGATE_SERVER_URL")

    def check(self) -> None:
        if not self["target-url"] or not self["server-url"]:
            raise usage.UsageError("TARGET_URL and SERVER_URL are required")
        try:
            self["target"] = Target.parse(self["target-url"])
        except ConnectorError as e:
            raise usage.UsageError(str(e)) from None
        parts = urlsplit(self["server-url"])
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            hint = ""
            if parts.scheme in ("http", "https") and parts.hostname:
                websocket = parts._replace(scheme="ws" + parts.scheme[4:], query="", fragment="")
                hint = f" (the relay's WebSocket URL: {websocket.geturl()})"
            raise usage.UsageError(
                f"SERVER_URL: expected ws(s)://host[:port][/<connection-id>], got {parts.scheme}://...{hint}")
        try:
            parts.port
        except ValueError as e:
            raise usage.UsageError(f"SERVER_URL: {e}") from None
        from pipegate.config import check_server_endpoint

        check_server_endpoint("metrics", self["metrics"])
        check_server_endpoint("inspect", self["inspect"])
        if self["ca-file"] and not os.path.isfile(self["ca-file"]):
            raise usage.UsageError(f"--ca-file: no such file: {self['ca-file']}")
        from pipegate.config import check_pem_certificate

        check_pem_certificate("ca-file", self["ca-file"])
        segments = [segment for segment in parts.path.split("/") if segment]
        if len(segments) > 1:
            # The relay routes public traffic by the first path segment: behind a prefix
            # the public URL printed at login would not exist.
            raise usage.UsageError(
                f"SERVER_URL: a path prefix (/{'/'.join(segments[:-1])}) is not supported; the relay "
                "serves /<connection-id> at the root of its host: ws(s)://host[:port][/<connection-id>]")
        path_id = segments[-1] if segments else None
        token = pasted_token(self["token"] or self.environ.get("PIPEGATE_TOKEN"))
        if not token:
            token = (parse_qs(parts.query).get("token") or [None])[0]
        if not token:
            if not self.environ.get("PIPEGATE_JWT_SECRET"):
                raise usage.UsageError(
                    "--token: no token (give --token, PIPEGATE_TOKEN, ?token= in SERVER_URL, "
                    "or PIPEGATE_JWT_SECRET to mint one)")
            try:
                settings = auth.JWTSettings.from_environ(self.environ)
                cid = path_id or self.environ.get("PIPEGATE_CONNECTION_ID")
                if cid is None:
                    import uuid
                    cid = uuid.uuid4().hex
                token = auth.mint(settings, cid, time.time(), shared=bool(self["shared"]))
            except auth.ConfigError as e:
                raise usage.UsageError(str(e)) from None
        sub = auth.unverified_subject(token)
        if sub is None or not auth.valid_connection_id(sub):
            raise usage.UsageError("--token: not a PipeGate token (no valid sub claim)")
        if path_id is not None and path_id.lower() != sub.lower():
            raise usage.UsageError(
                f"SERVER_URL: connection id {path_id!r} differs from the token's {sub!r}")
        self["token"] = token
        self["tunnel-id"] = sub
        for name, parse in (("basic-auth", parse_credentials), ("allow", parse_network), ("deny", parse_network)):
            for value in self[name]:
                try:
                    parse(value)
                except VisitorPolicyError as e:
                    raise usage.UsageError(f"--{name}: {e}") from None
        try:
            self["visitor-policy"] = VisitorPolicy.from_options(sub, self["basic-auth"], self["allow"], self["deny"])
        except VisitorPolicyError as e:
            raise usage.UsageError(f"--basic-auth/--allow/--deny: {e}") from None
        # Never keep the token in the URL: it would reach logs.
        query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("token="))
        self["server-url"] = parts._replace(query=query).geturl()


def fatal_exit(reactor, message: str, code: int = 1) -> None:
    """Stop the reactor and leave the process with C{code} once it has stopped."""
    def leave():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    reactor.addSystemEventTrigger("after", "shutdown", leave)
    if reactor.running:
        reactor.stop()


def make_connector(options: Options, reactor, **kwargs) -> Connector:
    config = ConnectorConfig(
        target=options["target"], max_streams=options["max-streams"],
        connect_timeout=options["connect-timeout"], ping_interval=options["ping-interval"],
        max_window=options["max-window"], window_budget=options["window-budget"],
        drain_timeout=options["drain-timeout"],
    )
    return Connector(reactor, config, options["server-url"], options["token"],
                     options["tunnel-id"], ca_file=options["ca-file"],
                     visitor_policy=options["visitor-policy"], **kwargs)


def makeService(options: Options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    top = TopService(options, reactor)
    FrozenStartupHeap(reactor).setServiceParent(top)
    recorder = None
    if options["inspect"]:
        from pipegate.http.inspect.recorder import Recorder

        recorder = Recorder(reactor, options["inspect-max"], options["inspect-body-bytes"])
    connector = make_connector(
        options, reactor, on_fatal=lambda message: fatal_exit(reactor, message, EX_NOPERM), observer=recorder)
    connector.setServiceParent(top)
    if recorder is not None:
        from pipegate.http.inspect.web import Inspector

        Inspector(recorder, connector.agent, connector.config.target, reactor,
                  options["inspect"]).setServiceParent(top)
    if options["metrics"]:
        from pipegate.metrics import connector_collector
        from pipegate.status import add_ops, connector_status

        add_ops(top, options["metrics"], connector_collector(connector),
                lambda: connector_status(connector), reactor, limits=SiteLimits.of(options))
    return top
