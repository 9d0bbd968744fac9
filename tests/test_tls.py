"""
wss:// end to end: the relay behind a real `ssl:` endpoint with a certificate from a
private CA, and a connector that verifies it (service_identity) with --ca-file.
"""

from __future__ import annotations

import datetime
import json
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import endpoints, reactor
from twisted.trial import unittest

from pipegate.http.connector import Connector
from pipegate.http.target import ConnectorConfig, Target
from pipegate.http.public import RelaySite
from pipegate.http.relay import Relay, RelayConfig
from tests.support import SETTINGS, Loopback, eventually, request, token_for


def make_ca_and_cert(directory, hostname: str = "localhost"):
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "PipeGate test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_path = directory.child("relay.key")
    key_path.setContent(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))
    cert_path = directory.child("relay.crt")
    cert_path.setContent(cert.public_bytes(pem))
    ca_path = directory.child("ca.crt")
    ca_path.setContent(ca.public_bytes(pem))
    return key_path.path, cert_path.path, ca_path.path


class SecureWebSocket(unittest.TestCase):
    async def setUp(self):
        from twisted.python.filepath import FilePath

        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.key, self.cert, self.ca = make_ca_and_cert(directory)
        self.loop = Loopback(self)
        self.app_port = await self.loop.app()
        self.relay = Relay(RelayConfig(jwt=SETTINGS), reactor)
        self.relay.startService()
        self.loop.services.append(self.relay)
        endpoint = endpoints.serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}")
        # Not wrapped in the Loopback's WrappingFactory: Autobahn must see the TLS transport
        # itself (it binds the WebSocket to the TLS channel).
        self.port = await endpoint.listen(RelaySite(self.relay))
        self.loop.ports.append(self.port)

    def connector(self, ca_file):
        connector = Connector(
            reactor, ConnectorConfig(Target.parse(f"http://127.0.0.1:{self.app_port.getHost().port}")),
            f"wss://localhost:{self.port.getHost().port}", token_for("t1"), "t1",
            ca_file=ca_file, retry_policy=lambda attempt: 0.2)
        connector.startService()
        self.loop.services.append(connector)
        return connector

    async def test_verified_wss(self):
        connector = self.connector(self.ca)
        await connector.online
        self.assertEqual(connector.public_url, f"https://localhost:{self.port.getHost().port}/t1/")
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
        from twisted.internet import ssl

        with open(self.ca, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.loop.pools.append(pool)
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool)
        response, body = await request(agent, b"GET", f"https://localhost:{self.port.getHost().port}/t1/s?x=1")
        self.assertEqual(response.code, 200)
        seen = json.loads(body)
        self.assertEqual(seen["uri"], "/s?x=1")
        self.assertIn(["X-Forwarded-Proto", "https"], seen["headers"])

    async def test_unknown_ca_never_logs_in(self):
        connector = self.connector(None)  # system trust store: the private CA is unknown
        from twisted.internet import task

        await task.deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(connector.links, [])
        self.assertEqual(self.relay.tunnels, {})
        await connector.stopService()
        self.flushLoggedErrors()

    async def failure_line(self, url: str, ca_file=None) -> str:
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        from pipegate.core.redial import Redial

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connector = Connector(
            reactor, ConnectorConfig(Target.parse(f"http://127.0.0.1:{self.app_port.getHost().port}")),
            url, token_for("t1"), "t1", ca_file=ca_file, retry_policy=Redial(initial=0.05, rng=lambda: 1.0))
        connector.startService()
        self.loop.services.append(connector)
        await eventually(lambda: len([e for e in events if "why" in e]) >= 2, timeout=20)
        await connector.stopService()
        whys = [e for e in events if "why" in e]
        self.assertEqual([e["delay"] for e in whys[:2]], [0.05, 0.1])  # growing
        self.assertEqual(self.relay.tunnels, {})
        return whys[0]["why"]

    async def test_untrusted_certificate_names_ca_file_and_ssl_cert_file(self):
        # Issue 18 item 5: the certificate error did not say how to trust the relay.
        why = await self.failure_line(f"wss://localhost:{self.port.getHost().port}/t1")
        self.assertTrue(why.startswith("TLS: the relay's certificate is not trusted "
                                       "(certificate verify failed)"), why)
        self.assertIn("--ca-file", why)
        self.assertIn("SSL_CERT_FILE", why)
        self.flushLoggedErrors()

    async def test_ssl_cert_file_is_a_trust_store_too(self):
        # Issue 18 item 5: it worked but was not documented; now docs and the error say so.
        import os

        before = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = self.ca  # OpenSSL reads the process environment
        self.addCleanup(lambda: os.environ.pop("SSL_CERT_FILE") if before is None
                        else os.environ.__setitem__("SSL_CERT_FILE", before))
        connector = self.connector(None)
        await connector.online
        self.assertEqual(list(self.relay.tunnels), ["t1"])

    async def test_ws_to_a_tls_port_says_wss(self):
        why = await self.failure_line(f"ws://localhost:{self.port.getHost().port}/t1")
        self.assertIn("a TLS port needs wss://, not ws://", why)


class OversizedLineOverTLS(unittest.TestCase):
    """
    A 414 on a TLS listener: the TLS transport passes a half-close straight to the TCP
    socket under it (no close_notify), and when the idle timeout then closed the connection
    its send BIO was gone (an AttributeError logged per connection).  Over TLS the relay
    closes the connection after the answer instead.
    """

    async def test_414_and_a_clean_close_while_the_caller_keeps_its_socket(self):
        import socket
        import ssl as stdlib_ssl

        from twisted.internet import threads
        from twisted.python.filepath import FilePath

        directory = FilePath(self.mktemp())
        directory.makedirs()
        key, cert, ca = make_ca_and_cert(directory)
        relay = Relay(RelayConfig(jwt=SETTINGS, idle_timeout=0.5), reactor)
        relay.startService()
        self.addCleanup(relay.stopService)
        port = await endpoints.serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}").listen(RelaySite(relay))
        self.addCleanup(port.stopListening)

        def caller():   # reads to the end, then keeps its socket past the idle timeout
            context = stdlib_ssl.create_default_context(cafile=ca)
            with context.wrap_socket(socket.create_connection(("127.0.0.1", port.getHost().port)),
                                     server_hostname="localhost") as s:
                s.settimeout(10)
                s.sendall(b"GET /t1/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                try:
                    while chunk := s.recv(65536):
                        answer += chunk
                except (OSError, stdlib_ssl.SSLError):
                    pass
                time.sleep(1.5)
            return answer

        answer = await threads.deferToThread(caller)
        self.assertTrue(answer.startswith(b"HTTP/1.1 414 URI Too Long\r\n"), answer[:60])
        self.assertEqual(self.flushLoggedErrors(), [])


class SilentRelay(unittest.TestCase):
    """A relay URL whose server accepts TCP and never answers (a firewall, a stuck proxy)."""

    async def test_stopping_during_a_pending_wss_login_does_not_wait_for_its_timeout(self):
        # Ctrl-C on a connector whose wss:// login hung (a plain port, a stuck proxy) used to
        # wait out Autobahn's 30 s opening-handshake timeout: closing a TLS connection whose
        # handshake never completes waits for the handshake.  Now the pending login is cut.
        from twisted.internet.protocol import Factory, Protocol

        class Silent(Protocol):
            def connectionLost(self, reason):
                lost.append(reason)

        lost: list = []
        loop = Loopback(self)
        app = await loop.app()
        port = await loop.listen(Factory.forProtocol(Silent))
        connector = Connector(
            reactor, ConnectorConfig(Target.parse(f"http://127.0.0.1:{app.getHost().port}")),
            f"wss://localhost:{port.getHost().port}", token_for("t1"), "t1", retry_policy=lambda attempt: 0.2)
        connector.startService()
        await eventually(lambda: loop.wrappers[-1].protocols)
        stopped = connector.stopService()
        # Cut at once (abortConnection), not after the 30 s handshake timeout; 10 s is
        # eventually()'s default patience.
        await eventually(lambda: lost and stopped.called)
        self.assertEqual(connector.links, [])


class TLSClientAtThePlainPort(unittest.TestCase):
    """
    A wss:// connector (or an https:// browser) at the relay's plain port: the relay used
    to hold the ClientHello until its 60 s idle timeout, so the connector said why only
    after its own 30 s handshake timeout.  A TLS record cannot start an HTTP request, so
    the relay closes such a connection at once and the connector's next line says
    "a plain port needs ws://, not wss://".
    """

    def relay_listener(self, *args):
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from pipegate.tap import server

        options = server.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": "tls-plain-port-secret-0123456789abcdef"}
        options.parseOptions(["--listen", "tcp:8000:interface=127.0.0.1", *args])
        clock = MemoryReactorClock()
        top = server.makeService(options, clock)
        top.privilegedStartService()
        [(_port, factory, _backlog, _interface)] = clock.tcpServers

        def connect():
            protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
            protocol.makeConnection(transport)
            self.addCleanup(lambda: protocol.connectionLost(None) if not transport.disconnected else None)
            return protocol, transport
        return connect

    def test_a_client_hello_is_cut_at_once(self):
        connect = self.relay_listener()
        protocol, transport = connect()
        protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x07" * 32)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.value(), b"")

    def test_http_still_served(self):
        connect = self.relay_listener()
        protocol, transport = connect()
        protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value())
        self.assertFalse(transport.disconnected)
