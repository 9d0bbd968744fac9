"""
C{pipegate scan}: dial a peer as an observer, print its role and the routes it
announces (a provider) or holds (a gateway), and exit.
"""

from __future__ import annotations

import sys

from twisted.internet import defer, task

from pipegate.mux import frames, tls
from pipegate.mux.hello import parse_router_secret
from pipegate.mux.session import ROLE_NAMES, LinkConfig, LinkFactory


class Observer:
    def __init__(self) -> None:
        self.result: defer.Deferred = defer.Deferred()
        self.links: set = set()

    def link_admitted(self, link) -> None:
        self.links.add(link)

    def refused(self, reason: str) -> None:
        """The link ended before admission: say so at once instead of waiting out the timeout."""
        if not self.result.called:
            self.result.errback(ConnectionRefusedError(f"admission refused (wrong router secret?): {reason}"))

    def link_lost(self, link) -> None:
        self.links.discard(link)
        if not self.result.called:
            self.result.errback(ConnectionError("the link closed before the peer announced its routes"))

    def link_frame(self, link, frame) -> None:
        if isinstance(frame, frames.Routes) and not self.result.called:
            self.result.callback((link.peer_role, link.peer_name, frame.routes))


def format_routes(role: int, peer: str, routes) -> str:
    lines = [f"peer {peer}: {ROLE_NAMES.get(role, role)}, {len(routes)} route(s)"]
    for r in routes:
        tags = f" [{' '.join(r.tags)}]" if r.tags else ""
        lines.append(f"  {r.gate_port}/{r.protocol} -> {r.service_host}:{r.service_port}{tags}")
    return "\n".join(lines) + "\n"


async def scan(reactor, secret: bytes, description: str, timeout: float = 15.0,
               verify_hostname: str | None = None, ca_file: str | None = None) -> str:
    observer = Observer()
    config = LinkConfig(secret=secret, role=frames.ROLE_OBSERVER, handshake_timeout=timeout)
    endpoint = tls.client_endpoint(reactor, description, verify_hostname, ca_file)
    link = await endpoint.connect(LinkFactory(observer, config, reactor, True, on_refused=observer.refused))
    timer = reactor.callLater(timeout, lambda: observer.result.called or observer.result.errback(
        TimeoutError(f"no answer within {timeout:g} s (wrong router secret?)")))
    try:
        role, peer, routes = await observer.result
    finally:
        if timer.active():
            timer.cancel()
        if not link.closed:
            link.go_away("scan done")
    return format_routes(role, peer, routes)


def main(secret_text: str, description: str, timeout: float) -> int:
    try:
        secret = parse_router_secret(secret_text)
    except ValueError as e:
        print(f"pipegate scan: --router: {e}", file=sys.stderr)
        return 2
    outcome = {}

    async def run(reactor):
        try:
            outcome["text"] = await scan(reactor, secret, description, timeout)
        except Exception as e:
            outcome["error"] = str(e) or type(e).__name__

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    except SystemExit:
        pass
    if "error" in outcome:
        print(f"pipegate scan: {outcome['error']}", file=sys.stderr)
        return 1
    sys.stdout.write(outcome["text"])
    return 0
