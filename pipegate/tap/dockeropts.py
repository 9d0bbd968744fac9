"""
The Docker options shared by pipegate-provider and pipegate-gateway: C{--docker
[SOCKET]} (an optional value), C{--network}, C{--refresh}; see C{docs/docker.md}.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from pipegate.config import FALSE, TRUE, positive_float
from pipegate.ports.docker.host import parse_docker_host

DOCKER_PARAMETERS = [
    ["docker", None, None, "Docker mode: the Engine's socket (unix:/var/run/docker.sock when given without "
                           "a value, or DOCKER_HOST=unix://... when set)."],
    ["network", None, "pipegate", "Docker network whose containers are discovered / get helpers."],
    ["refresh", None, "20", "Seconds between two Docker refreshes (events trigger one sooner).",
     positive_float],
]


def optional_docker_value(args: list[str]) -> list[str]:
    """C{--docker} followed by nothing or by another option means C{--docker=} (the default socket)."""
    result = []
    for index, arg in enumerate(args):
        following = args[index + 1] if index + 1 < len(args) else None
        if arg == "--docker" and (following is None or following.startswith("-")):
            result.append("--docker=")
        else:
            result.append(arg)
    return result


class DockerOptionsMixin:
    """For an L{pipegate.config.EnvOptions} subclass that lists L{DOCKER_PARAMETERS}."""

    def parseOptions(self, options=None):
        if options is None:
            options = sys.argv[1:]
        self._docker_flag = any(a == "--docker" or a.startswith("--docker=") for a in options)
        return super().parseOptions(optional_docker_value(list(options)))

    def check_docker(self) -> None:
        """Sets C{self["docker-endpoint"]}: a client endpoint string, or C{None} when Docker mode is off."""
        value = self["docker"]
        self["docker-endpoint"] = None
        if value is None:
            return
        lowered = value.strip().lower()
        if lowered in FALSE and (value != "" or not getattr(self, "_docker_flag", False)):
            return  # PIPEGATE_DOCKER=false (or 0, no, off, empty): off
        if value == "" or lowered in TRUE:
            value = self.environ.get("DOCKER_HOST", "")
            source = "DOCKER_HOST"
        else:
            source = "--docker"
        try:
            self["docker-endpoint"] = parse_docker_host(value)
        except ValueError as e:
            raise usage.UsageError(f"{source}: {e}") from None
        if not self["network"] or any(c.isspace() for c in self["network"]):
            raise usage.UsageError(f"--network: expected a Docker network name, got {self['network']!r}")
