"""
The fingerprint resolver: a small HTTP API on the provider that tells a backend who
the real client of a connection is, given the connection's address tuple as the
backend sees it (nginx: C{$remote_addr $remote_port $server_addr $server_port}).
"""

from __future__ import annotations

import base64
import hmac
import json
import uuid

from twisted.web import resource

from pipegate.core.policy import normalize_ip


def tuple_key(protocol: str, remote_addr: str, remote_port: int | str, local_addr: str,
              local_port: int | str) -> str:
    """The lookup key, as seen from the backend: remote = the provider's socket."""
    def ip(text: str) -> str:
        try:
            return str(normalize_ip(text))
        except ValueError:
            return text.lower()
    return f"{protocol.lower()}|{ip(remote_addr)}|{int(remote_port)}|{ip(local_addr)}|{int(local_port)}"


class Records:
    """Live channel records, keyed by the backend-side address tuple."""

    def __init__(self) -> None:
        self._records: dict[str, dict] = {}

    def add(self, key: str, *, protocol: str, gate_port: int, channel_port: int, client: tuple[str, int],
            labels: tuple[str, ...], now_ms: float) -> None:
        self._records[key] = {
            "key": key,
            "id": uuid.uuid4().hex,
            "openedAt": int(now_ms),
            "protocol": protocol,
            "gatePort": gate_port,
            "channelPort": channel_port,
            "source": {"ip": client[0], "port": client[1]},
            "ingressLabels": list(labels),
        }

    def remove(self, key: str) -> None:
        self._records.pop(key, None)

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def all(self) -> list[dict]:
        return list(self._records.values())


def _param(request, *names: str) -> str | None:
    for name in names:
        values = request.args.get(name.encode())
        if values:
            return values[0].decode("utf-8", "replace")
    return None


class ResolverResource(resource.Resource):
    isLeaf = True

    def __init__(self, records: Records, basic_auth: tuple[str, str] | None = None,
                 open_listing: bool = False) -> None:
        super().__init__()
        self.records = records
        self.basic_auth = basic_auth
        # /all lists every client IP: it needs basic auth, or the operator's explicit
        # opt-in (--resolver-open-listing); /resolve answers one known tuple.
        self.open_listing = open_listing

    def _json(self, request, code: int, body) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _authorized(self, request) -> bool:
        if self.basic_auth is None:
            return True
        header = request.getHeader(b"authorization") or b""
        if not header[:6].lower() == b"basic ":
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        want_user, want_password = self.basic_auth
        return hmac.compare_digest(user.encode(), want_user.encode()) & hmac.compare_digest(
            password.encode(), want_password.encode())

    def render(self, request):
        if request.method not in (b"GET", b"POST"):
            return self._json(request, 405, {"error": "method_not_allowed"})
        path = request.path
        if path == b"/health":
            return self._json(request, 200, {"ok": True})
        if path not in (b"/resolve", b"/all"):
            return self._json(request, 404, {"error": "not_found"})
        if not self._authorized(request):
            request.setHeader(b"www-authenticate", b'Basic realm="pipegate-fingerprint-resolver"')
            return self._json(request, 401, {"error": "unauthorized"})
        if path == b"/all":
            if self.basic_auth is None and not self.open_listing:
                return self._json(request, 403, {
                    "error": "listing_disabled",
                    "detail": "/all needs --resolver-basic-auth or --resolver-open-listing"})
            return self._json(request, 200, self.records.all())
        protocol = _param(request, "proto", "protocol") or "tcp"
        remote_addr = _param(request, "remote_addr", "remoteAddr")
        remote_port = _param(request, "remote_port", "remotePort")
        local_addr = _param(request, "server_addr", "local_addr", "localAddr")
        local_port = _param(request, "server_port", "local_port", "localPort")
        if None in (remote_addr, remote_port, local_addr, local_port):
            return self._json(request, 400, {"error": "missing_tuple_params"})
        try:
            key = tuple_key(protocol, remote_addr, remote_port, local_addr, local_port)
        except ValueError:
            return self._json(request, 400, {"error": "missing_tuple_params"})
        record = self.records.get(key)
        if record is None:
            return self._json(request, 404, {"error": "not_found", "key": key})
        return self._json(request, 200, record)
