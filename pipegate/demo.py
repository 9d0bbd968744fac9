"""
C{pipegate demo}: a relay, a connector and a small web app, all on 127.0.0.1 in one
process, so a newcomer sees a working tunnel with one command.
"""

from __future__ import annotations

import json
import secrets
import sys

from twisted.internet import endpoints, error
from twisted.logger import Logger
from twisted.web import resource, server

from pipegate import auth
from pipegate.http.connector import Connector
from pipegate.http.target import ConnectorConfig, Target
from pipegate.http.inspect.recorder import Recorder
from pipegate.http.inspect.web import Inspector, inspector_url
from pipegate.http.public import RelaySite
from pipegate.http.relay import Relay, RelayConfig

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


def start(reactor, port: int = 8000, inspect_port: int = 4040):
    """
    Start the three pieces and the request inspector; returns a Deferred firing with
    (relay_url, connector, relay, ports, inspector_url).
    """
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
        recorder = Recorder(reactor)
        connector = Connector(reactor, ConnectorConfig(Target.parse(app_url)), relay_url,
                              token, "demo", observer=recorder)
        connector.startService()
        inspector = Inspector(recorder, connector.agent, connector.config.target, reactor)
        inspector.startService()

        async def inspect():
            try:
                return await endpoints.TCP4ServerEndpoint(
                    reactor, inspect_port, interface="127.0.0.1").listen(inspector.site)
            except error.CannotListenError:
                if inspect_port != 4040:
                    raise
                # 4040 is taken (another tunnel's inspector?): any free port will do.
                return await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(inspector.site)

        async def ready():
            inspect_listener = await inspect()
            await connector.online
            return (f"http://127.0.0.1:{relay_port.getHost().port}/demo/", connector,
                    relay, [app_port, relay_port, inspect_listener], inspector_url(inspect_listener))

        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(ready())

    from twisted.internet.defer import gatherResults

    d = gatherResults([app_ep.listen(server.Site(DemoApp())), relay_ep.listen(RelaySite(relay))],
                      consumeErrors=True)
    return d.addCallback(started)


def run(port: int = 8000, inspect_port: int = 4040) -> int:
    from twisted.internet import reactor

    def ready(result):
        url, inspect_url = result[0], result[4]
        print(f"PipeGate demo: relay, connector and a demo app are running on 127.0.0.1.\n"
              f"Public URL: {url}\n"
              f"Try:        curl -s '{url}hello?name=world'\n"
              f"Inspector:  {inspect_url}  (every request through the tunnel, with replay)\n"
              f"Press Ctrl-C to stop.", flush=True)

    def failed(failure):
        print(f"pipegate demo: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()

    d = start(reactor, port, inspect_port)
    d.addCallbacks(ready, failed)
    reactor.run()
    return 0
