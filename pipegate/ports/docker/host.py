"""
The Docker Engine's address (pure): C{--docker SOCKET} or C{DOCKER_HOST} as a Twisted
client endpoint string.  Only unix sockets are supported.
"""

from __future__ import annotations

import re

__all__ = [
    "DEFAULT_DOCKER_ENDPOINT",
    "parse_docker_host",
]

DEFAULT_DOCKER_ENDPOINT = "unix:/var/run/docker.sock"

_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _escape_endpoint(text: str) -> str:
    return re.sub(r"([\\:=])", r"\\\1", text)


def parse_docker_host(value: str | None) -> str:
    """
    A Twisted client endpoint string for the Docker Engine socket.

    C{None} or an empty value -> C{unix:/var/run/docker.sock}; C{unix:///path} (as in
    C{DOCKER_HOST}), C{unix:/path} or a plain path -> C{unix:/path}, with C{:}, C{=} and
    C{\\} escaped for Twisted's endpoint parser.  Any other scheme (C{tcp://},
    C{ssh://}, C{npipe://}, ...) raises C{ValueError("only unix sockets are supported
    ...")}.
    """
    text = (value or "").strip()
    if not text:
        return DEFAULT_DOCKER_ENDPOINT
    lowered = text.lower()
    if lowered.startswith("unix://"):
        path = text[len("unix://"):]
    elif lowered.startswith("unix:"):
        path = text[len("unix:"):]
    elif _SCHEME_RE.match(text):
        scheme = text.split(":", 1)[0]
        raise ValueError(f"only unix sockets are supported, not {scheme}")
    else:
        path = text
    if not path:
        raise ValueError(f"no socket path in Docker host {text!r}")
    return "unix:" + _escape_endpoint(path)
