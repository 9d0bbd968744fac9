"""
C{pipegate demo}: a relay, a connector and a small web app, all on 127.0.0.1 in one
process, so a newcomer sees a working tunnel with one command.  C{pipegate demo --ports}:
the port plane the same way, a gateway and a provider publishing the app's TCP port.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints, error
from twisted.internet.task import deferLater
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
    def announce(result):
        url, inspect_url = result[0], result[4]
        print(f"PipeGate demo: relay, connector and a demo app are running on 127.0.0.1.\n"
              f"Public URL: {url}\n"
              f"Try:        curl -s '{url}hello?name=world'\n"
              f"Inspector:  {inspect_url}  (every request through the tunnel, with replay)\n"
              f"Press Ctrl-C to stop.", flush=True)

    return _run(lambda reactor: start(reactor, port, inspect_port), announce, "--port")


def _run(start_demo, announce, option: str) -> int:
    """Run the reactor with a demo; a demo that cannot start prints one line and exits 1."""
    from twisted.internet import reactor
    from twisted.internet.defer import FirstError

    status = []

    def failed(failure):
        if failure.check(FirstError):
            failure = failure.value.subFailure
        hint = f" (another program has the port? try {option} N)" if failure.check(error.CannotListenError) else ""
        print(f"pipegate demo: {failure.getErrorMessage()}{hint}", file=sys.stderr, flush=True)
        status.append(1)
        reactor.stop()

    reactor.callWhenRunning(lambda: start_demo(reactor).addCallbacks(announce, failed))
    reactor.run()
    return status[0] if status else 0


def start_ports(reactor, gate_port: int = 7001, patience: float = 10.0):
    """
    The port plane on loopback: the demo app, a provider announcing it as gate
    C{gate_port}/tcp, and a gateway that opens that gate; their real TLS mux link between
    them.  Returns a Deferred firing with (gate_url, services) once the gateway opened the
    gate, or failing with a one-line reason after C{patience} seconds.
    """
    from pipegate.ports.gateway import Gateway
    from pipegate.tap import gateway, provider

    secret = secrets.token_hex(32)
    with socket.socket() as probe:   # a free port for the link (the gateway listens on it)
        probe.bind(("127.0.0.1", 0))
        mux = probe.getsockname()[1]
    services = MultiService()

    async def ready():
        app_port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(DemoApp()))
        services.addService(_Listening(app_port))
        tops = []
        # The gate listens on 127.0.0.1 only, for this machine's clients: no per-IP rate (a
        # loop of curls, or ab without keep-alive, opens more than 100 connections a second).
        for tap, argv in ((gateway, ["--mux", f"tcp:{mux}:interface=127.0.0.1", "--listen", "127.0.0.1",
                                     "--conn-rate-per-ip", "0"]),
                          (provider, ["--connect", f"tcp:127.0.0.1:{mux}",
                                      "--service", f"{gate_port}:127.0.0.1:{app_port.getHost().port}"])):
            options = tap.Options()
            options.environ = {"PIPEGATE_ROUTER": secret}
            options.parseOptions(argv)
            tops.append(tap.makeService(options, reactor))
            tops[-1].setServiceParent(services)
        services.startService()
        (node,) = [s for s in tops[0] if isinstance(s, Gateway)]
        deadline = reactor.seconds() + patience
        while (gate_port, "tcp") not in node.gates:   # (open once the provider's routes arrived)
            if reactor.seconds() > deadline:
                await services.stopService()
                raise RuntimeError(f"gate {gate_port}/tcp did not open within {patience:g} s"
                                   f" (is 127.0.0.1:{gate_port} taken? try --gate-port N)")
            await deferLater(reactor, 0.1, lambda: None)
        return f"http://127.0.0.1:{gate_port}/", services

    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(ready())


class _Listening(Service):
    """A listening port as a service of the demo's MultiService (stopped with it)."""

    def __init__(self, port) -> None:
        self.port = port

    def stopService(self):
        super().stopService()
        return self.port.stopListening()


def run_ports(gate_port: int = 7001) -> int:
    def announce(result):
        print(f"PipeGate demo, port plane: a gateway, a provider and a demo app are running on 127.0.0.1.\n"
              f"The provider publishes the app's TCP port; the gateway opened it as gate {gate_port}/tcp.\n"
              f"Try:        curl -s '{result[0]}hello'\n"
              f"Press Ctrl-C to stop.", flush=True)

    return _run(lambda reactor: start_ports(reactor, gate_port), announce, "--gate-port")
