"""twistd pipegate-provider: announce private TCP/UDP services to gateways."""

from __future__ import annotations

import urllib.request

from twisted.application import service
from twisted.python import usage

from pipegate.config import positive_float
from pipegate.mux import frames
from pipegate.mux.node import MuxOptions, certificate_from, link_config, link_services
from pipegate.ports.provider import Provider, ProviderConfig, service_route
from pipegate.ports.services import ServiceError, load_source, merge_services, parse_services


def fetch(url: str) -> bytes:
    """Fetch a --services or --filter URL once, at startup (before the reactor runs)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read(16 * 1024 * 1024)


class Options(MuxOptions):
    synopsis = "[options]"
    longdesc = (
        "Announce private services to gateways over TLS mux links and carry their TCP "
        "connections and UDP flows. Every option also reads PIPEGATE_<OPTION>; --mux, --connect "
        "and --services read space-separated lists from PIPEGATE_MUX, PIPEGATE_CONNECT and "
        "PIPEGATE_SERVICES."
    )
    optParameters = MuxOptions.optParameters + [
        ["connect-timeout", None, "5", "Seconds to connect to a service before the gateway is told it failed."],
    ]
    converters = {**MuxOptions.converters, "connect-timeout": positive_float}

    def __init__(self) -> None:
        super().__init__()
        self["services"] = []

    def opt_services(self, value: str) -> None:
        """Services: inline JSON, a file or an http(s) URL; a list or {"services": [...]}; repeatable."""
        self["services"].append(value)

    def _apply_env(self) -> None:
        super()._apply_env()
        value = self.environ.get("PIPEGATE_SERVICES")
        if value:
            self["services"] = [value]

    def check(self) -> None:
        super().check()
        try:
            lists = [parse_services(load_source(s, fetch), s) for s in self["services"]]
            self["service-list"] = merge_services(lists)
            frames.encode(frames.Routes(tuple(service_route(s) for s in self["service-list"])))
        except frames.FrameError as e:
            raise usage.UsageError(f"--services: cannot be announced: {e}") from None
        except ServiceError as e:
            raise usage.UsageError(f"--services: {e}") from None
        except OSError as e:
            raise usage.UsageError(f"--services: {e}") from None


def makeService(options: Options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    top = service.MultiService()
    provider = Provider(ProviderConfig(
        services=tuple(options["service-list"]), connect_timeout=options["connect-timeout"],
        udp_idle_timeout=options["udp-idle-timeout"], window=options["window"]), reactor)
    for svc in link_services(provider, link_config(options, frames.ROLE_PROVIDER), reactor,
                             options["mux"], options["connect"], certificate=certificate_from(options),
                             verify_hostname=options["tls-verify"], ca_file=options["tls-ca"]):
        svc.setServiceParent(top)
    # Added last so that it stops first: links get a GOAWAY before their listeners
    # and dialers go.
    provider.setServiceParent(top)
    return top
