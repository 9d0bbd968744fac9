"""
Where the connector sends requests and with what bounds: L{Target} (the local app's
URL, and the path a tunnel target maps to under it) and L{ConnectorConfig}.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import urlsplit

import attrs

from pipegate.http import frames


class ConnectorError(ValueError):
    """A connector setting is unusable; one line naming it."""



@attrs.frozen
class Target:
    """Where the local app lives: C{http://127.0.0.1:3000/base}."""

    scheme: bytes
    host: bytes
    port: int
    base: bytes

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectorError(f"TARGET_URL: expected http(s)://host[:port][/path], got {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = parts.hostname.encode("idna")
        except (ValueError, UnicodeError) as e:
            raise ConnectorError(f"TARGET_URL: {e}") from None
        return cls(parts.scheme.encode(), host, port, parts.path.rstrip("/").encode())

    @property
    def authority(self) -> bytes:
        host = b"[" + self.host + b"]" if b":" in self.host else self.host
        default = 443 if self.scheme == b"https" else 80
        return host if self.port == default else host + b":%d" % self.port

    def url(self, target: bytes) -> bytes:
        return self.scheme + b"://" + self.authority + self.path(target)

    def path(self, target: bytes) -> bytes:
        """
        The base path joined with the tunnel target, dot segments kept inside the tunnel.
        Bytes an HTTP/1.1 request target may not hold (raw UTF-8 a caller sent unencoded)
        are percent-encoded: the app gets C{/caf%C3%A9} for C{/café}.
        """
        return _joined(self.base, target)


@functools.lru_cache(maxsize=1024)  # callers ask for the same few paths again and again
def _joined(base: bytes, target: bytes) -> bytes:
    path, sep, query = target.partition(b"?")
    return _OUTSIDE_TARGET.sub(_percent, base + safe_path(path) + sep + query)


_OUTSIDE_TARGET = re.compile(rb"[^\x21-\x7e]")


def _percent(match: re.Match) -> bytes:
    return b"%%%02X" % match.group()[0]


def _is_dot(segment: bytes, dots: bytes) -> bool:
    return segment.lower().replace(b"%2e", b".") == dots


def safe_path(path: bytes) -> bytes:
    """
    Resolve C{.} and C{..} segments (also percent-encoded ones) without ever rising
    above the root, leaving every other byte, percent-escapes included, as it is.
    """
    out: list[bytes] = []
    segments = path.split(b"/")[1:] if path.startswith(b"/") else path.split(b"/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if _is_dot(segment, b"."):
            if last:
                out.append(b"")
        elif _is_dot(segment, b".."):
            if out:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)


@attrs.frozen
class ConnectorConfig:
    target: Target
    max_streams: int = 256
    connect_timeout: float = 10.0
    ping_interval: float = 20.0
    max_window: int = frames.MAX_WINDOW        # credit a request body's window may grow to
    window_budget: int = frames.WINDOW_BUDGET  # growth shared by all request bodies in flight
    drain_timeout: float = 30.0                # seconds requests in flight may take on stop
