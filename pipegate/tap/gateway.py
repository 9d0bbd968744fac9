"""twistd pipegate-gateway: the port plane gateway (being built; see docs/configuration.md)."""

from __future__ import annotations

from twisted.application import service
from twisted.python import usage

from pipegate.config import EnvOptions


class Options(EnvOptions):
    synopsis = "[options]"
    longdesc = (
        "The port plane gateway. Not available in this release yet: the plugin is registered so "
        "that deployments can be prepared; starting it stops with a one-line message."
    )
    optParameters = [
        ["router", None, None, "Router secret shared by providers and gateways (64 hex chars)."],
    ]

    def check(self) -> None:
        raise usage.UsageError("pipegate-gateway: the port plane is not available in this release yet")


def makeService(options: Options, reactor=None) -> service.MultiService:
    raise usage.UsageError("pipegate-gateway: the port plane is not available in this release yet")
