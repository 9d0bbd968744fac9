"""
Secrets stay secret (issue 7): the JWT secret and the router secret never cross the
wire and never reach a log.  Three captures:

- the HTTP plane through recording proxies (connector to relay, caller to relay);
- the mux plane's plaintext, recorded inside TLS by the link objects themselves, and
  its ciphertext through a recording proxy;
- the output of a full run of the four real twistd processes, including refused logins.
"""

from __future__ import annotations

import json
import signal

from twisted.application import internet
from twisted.internet import endpoints, protocol, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from pipegate import auth
from pipegate.http.connector import Connector
from pipegate.http.target import ConnectorConfig, Target
from pipegate.mux import frames, tls
from pipegate.mux.session import LinkConfig, LinkFactory, MuxLink
from pipegate.ports.services import Service
from tests.faultproxy import FaultProxy
from tests.support import (
    SECRET as JWT_SECRET, Loopback, TestApp, eventually, free_port, free_ports, raw_request, request,
    token_for,
)
from tests.test_ports_e2e import Client, Echo, PortPlane
from tests.test_processes import TWISTD, child_env, spawn

ROUTER = bytes.fromhex("5e" * 16 + "c7" * 16)


def forms(secret: bytes) -> list[bytes]:
    """The secret as raw bytes, hex (both cases) and base64: any of them is a leak."""
    import base64
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret),
            base64.urlsafe_b64encode(secret).rstrip(b"=")]


class LogCapture:
    def __init__(self, testcase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def text(self) -> bytes:
        out = []
        for event in self.events:
            try:
                out.append(formatEvent(event))
            except Exception:
                pass
            out.append(repr(event))
        return "\n".join(out).encode("utf-8", "replace")


class HTTPPlaneWire(unittest.TestCase):
    async def test_jwt_secret_never_on_the_wire_or_in_logs(self):
        logs = LogCapture(self)
        loop = Loopback(self)
        app_port = await loop.app(TestApp())
        relay, relay_port = await loop.relay(access_log=True)
        login_proxy = FaultProxy("127.0.0.1", relay_port.getHost().port)
        public_proxy = FaultProxy("127.0.0.1", relay_port.getHost().port)
        for proxy in (login_proxy, public_proxy):
            await proxy.listen()
            self.addCleanup(proxy.close)
        token = token_for("t1")
        connector = Connector(reactor, ConnectorConfig(Target.parse(f"http://127.0.0.1:{app_port.getHost().port}")),
                              f"ws://127.0.0.1:{login_proxy.listening.getHost().port}", token, "t1",
                              retry_policy=lambda attempt: 0.1)
        connector.startService()
        loop.services.append(connector)
        await connector.online
        agent = loop.agent()
        base = f"http://127.0.0.1:{public_proxy.listening.getHost().port}"
        for path in ("/t1/echo?token=caller-token", "/t1/x", "/nope/x", "/healthz"):
            response, _ = await request(agent, b"POST", base + path, body=b"payload " * 100)
            self.assertIn(response.code, (200, 404, 405))
        # A refused login with a token signed by another secret (its bytes cross the wire).
        wrong = auth.mint(auth.JWTSettings(secret="w" * 40), "t2", reactor.seconds())
        raw = await raw_request(public_proxy.listening, (
            b"GET /t2 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Protocol: pipegate.v1\r\nAuthorization: Bearer " + wrong.encode() + b"\r\n\r\n"))
        self.assertTrue(raw.startswith(b"HTTP/1.1 401"), raw[:80])
        wire = b"".join(bytes(p.recorded[d]) for p in (login_proxy, public_proxy) for d in ("up", "down"))
        self.assertIn(token.encode(), wire)              # the capture did see the login ...
        self.assertIn(b"payload payload", wire)          # ... and the traffic
        for form in forms(JWT_SECRET.encode()):
            self.assertFalse(form in wire, form)
        logged = logs.text()
        self.assertIn(b"POST /t1/echo?token=<redacted>", logged)
        self.assertFalse(JWT_SECRET.encode() in logged)
        self.assertFalse(token.encode() in logged)


class Recording(MuxLink):
    """A real link that also keeps every plaintext byte it sends and receives."""

    plaintext: bytearray

    def _write(self, frame) -> None:
        if not self.closed and self.transport is not None:
            self.plaintext += frames.encode(frame)
        super()._write(frame)

    def dataReceived(self, data: bytes) -> None:
        self.plaintext += data
        super().dataReceived(data)


class RecordingFactory(LinkFactory):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plaintext = bytearray()

    def buildProtocol(self, addr):
        link = Recording(self.node, self.config, self.clock, self.is_tls_client, owner=self)
        link.plaintext = self.plaintext
        link.factory = self
        return link


class MuxPlaneWire(PortPlane):
    async def test_router_secret_never_inside_or_outside_tls(self):
        logs = LogCapture(self)
        from pipegate.ports.gateway import Gateway, GatewayConfig
        from pipegate.ports.provider import Provider, ProviderConfig
        backend = await self.backend_echo()
        gw = Gateway(GatewayConfig(), reactor)
        gw.startService()
        self.cleanups.append(gw.stopService)
        gw_factory = RecordingFactory(gw, LinkConfig(secret=ROUTER, role=frames.ROLE_GATEWAY), reactor, False)
        mux = await self.listen_tcp(tls.server_factory(self.cert(), gw_factory))
        self.cleanups.append(lambda: self._drop_links(gw))
        proxy = FaultProxy("127.0.0.1", mux.getHost().port)
        await proxy.listen()
        self.cleanups.append(proxy.close)

        gate = free_port()
        prov = Provider(ProviderConfig(services=(Service(gate, "127.0.0.1", backend.getHost().port),)), reactor)
        prov.startService()
        prov_factory = RecordingFactory(prov, LinkConfig(secret=ROUTER, role=frames.ROLE_PROVIDER), reactor, True)
        client = internet.ClientService(
            tls.client_endpoint(reactor, f"tcp:127.0.0.1:{proxy.listening.getHost().port}"), prov_factory,
            retryPolicy=lambda n: 0.2, clock=reactor)
        client.startService()
        self.cleanups.append(client.stopService)
        self.cleanups.append(prov.stopService)
        self.cleanups.append(lambda: self._drop_links(prov))
        await self.open_tcp_gate(gw, gate)
        c = await self.connect(gate)
        c.transport.write(b"secret-free data " * 50)
        c.transport.loseWriteConnection()
        self.assertTrue((await c.closed).endswith(b"bye"))

        # A peer with another secret is refused; its attempt is captured too.
        intruder = RecordingFactory(prov, LinkConfig(secret=b"\x01" * 32, role=frames.ROLE_PROVIDER), reactor, True)
        link = await tls.client_endpoint(reactor, f"tcp:127.0.0.1:{proxy.listening.getHost().port}").connect(intruder)
        await eventually(lambda: link.closed)

        plaintext = bytes(gw_factory.plaintext + prov_factory.plaintext + intruder.plaintext)
        self.assertIn(b"secret-free data", plaintext)    # the capture saw the traffic in clear
        ciphertext = bytes(proxy.recorded["up"] + proxy.recorded["down"])
        self.assertNotIn(b"secret-free data", ciphertext)
        logged = logs.text()
        self.assertIn(b"admitted", logged)
        for form in forms(ROUTER):
            self.assertFalse(form in plaintext, form)
            self.assertFalse(form in ciphertext, form)
            self.assertFalse(form in logged, form)

    def cert(self):
        from tests.test_ports_e2e import CERT
        return CERT


class FullRunLogs(unittest.TestCase):
    """The four services as real processes; their whole output is scanned."""

    async def test_no_secret_in_any_process_output(self):
        router = ROUTER.hex()
        factory = protocol.Factory.forProtocol(Echo)
        factory.noisy = False
        backend = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(backend.stopListening)
        loop = Loopback(self)
        app_port = await loop.app(TestApp())
        relay_port, mux, gate = free_ports(3)
        relay = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-server", "--listen",
                                      f"tcp:{relay_port}:interface=127.0.0.1", "--access-log"],
                      child_env(PIPEGATE_JWT_SECRET=JWT_SECRET))
        gateway = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-gateway", "--mux",
                                        f"tcp:{mux}:interface=127.0.0.1", "--listen", "127.0.0.1"],
                        child_env(PIPEGATE_ROUTER=router))
        services = json.dumps([{"gatePort": gate, "serviceHost": "127.0.0.1",
                                "servicePort": backend.getHost().port, "protocol": "TCP"}])
        provider = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-provider", "--services", services,
                                         "--connect", f"tcp:127.0.0.1:{mux}"],
                         child_env(PIPEGATE_ROUTER=router))
        intruder = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-provider", "--services", services,
                                         "--connect", f"tcp:127.0.0.1:{mux}"],
                         child_env(PIPEGATE_ROUTER="ab" * 32))
        await eventually(lambda: b"listening" in relay.output.lower() or b"Site starting" in relay.output,
                         timeout=30)
        token = token_for("t1")
        connector = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-client", "--token", token,
                                          f"http://127.0.0.1:{app_port.getHost().port}",
                                          f"ws://127.0.0.1:{relay_port}"], child_env())
        await eventually(lambda: b"online at" in connector.output, timeout=30)
        agent = loop.agent()
        for path in (f"/t1/x?token={token}", "/t1/echo", "/missing/x"):
            await request(agent, b"GET", f"http://127.0.0.1:{relay_port}{path}")
        await eventually(lambda: b"gate %d/tcp open" % gate in gateway.output, timeout=30)
        c = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate), c)
        c.transport.write(b"hello")
        c.transport.loseWriteConnection()
        self.assertEqual(await c.closed, b"hellobye")
        await eventually(lambda: b"does not know the router secret" in gateway.output
                         or b"closed before admission" in gateway.output, timeout=30)
        for child in (connector, intruder, provider, gateway, relay):
            child.transport.signalProcess(signal.SIGTERM)
            await child.ended
        output = bytes(relay.output + gateway.output + provider.output + intruder.output + connector.output)
        self.assertIn(b"GET /t1/x?token=<redacted>", output)
        self.assertNotIn(b"Traceback", output)
        for secret in (JWT_SECRET.encode(), token.encode(), *forms(ROUTER), *forms(bytes.fromhex("ab" * 32))):
            self.assertFalse(secret in output, secret)

    test_no_secret_in_any_process_output.timeout = 120
