"""
C{pipegate demo}: a relay, a connector and a small web app, all on 127.0.0.1 in one
process, so a newcomer sees a working tunnel with one command.
"""

from __future__ import annotations

import json
import secrets
import sys

from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.web import resource, server

from pipegate import auth
from pipegate.http.connector import Connector, ConnectorConfig, Target
from pipegate.http.relay import Relay, RelayConfig, RelaySite

log = Logger()


class DemoApp(resource.Resource):
    """Answers every path with what it received, so the tunnel's work is visible."""

    isLeaf = True

    def render(self, request):
        body = request.content.read()
        answer = {
            "message": "hello from the app behind the tunnel",
            "method": request.method.decode(),
            "path": request.uri.decode("latin-1"),
            "forwarded_for": (request.getHeader(b"x-forwarded-for") or b"").decode(),
            "forwarded_prefix": (request.getHeader(b"x-forwarded-prefix") or b"").decode(),
            "correlation_id": (request.getHeader(b"x-pipegate-correlation-id") or b"").decode(),
            "body_bytes": len(body),
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(answer, indent=2).encode() + b"\n"


def start(reactor, port: int = 8000):
    """Start the three pieces; returns a Deferred firing with (relay_url, connector)."""
    settings = auth.JWTSettings(secret=secrets.token_hex(32))
    relay = Relay(RelayConfig(jwt=settings), reactor)
    relay.startService()
    app_ep = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    relay_ep = endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")

    def started(ports):
        app_port, relay_port = ports
        app_url = f"http://127.0.0.1:{app_port.getHost().port}"
        relay_url = f"ws://127.0.0.1:{relay_port.getHost().port}"
        token = auth.mint(settings, "demo", reactor.seconds())
        connector = Connector(reactor, ConnectorConfig(Target.parse(app_url)), relay_url,
                              token, "demo")
        connector.startService()
        return connector.online.addCallback(
            lambda _: (f"http://127.0.0.1:{relay_port.getHost().port}/demo/", connector,
                       relay, [app_port, relay_port]))

    from twisted.internet.defer import gatherResults

    d = gatherResults([app_ep.listen(server.Site(DemoApp())), relay_ep.listen(RelaySite(relay))],
                      consumeErrors=True)
    return d.addCallback(started)


def run(port: int = 8000) -> int:
    from twisted.internet import reactor

    def ready(result):
        url = result[0]
        print(f"PipeGate demo: relay, connector and a demo app are running on 127.0.0.1.\n"
              f"Public URL: {url}\n"
              f"Try:        curl -s '{url}hello?name=world'\n"
              f"Press Ctrl-C to stop.", flush=True)

    def failed(failure):
        print(f"pipegate demo: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()

    d = start(reactor, port)
    d.addCallbacks(ready, failed)
    reactor.run()
    return 0
