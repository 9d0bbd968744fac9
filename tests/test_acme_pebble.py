"""
Automatic HTTPS against a real ACME server: the relay built by C{pipegate-server}'s own
C{makeService} on loopback, Pebble validating HTTP-01 on the relay's plain listener, and
a real TLS handshake with SNI (stdlib ssl, in a thread) that trusts only Pebble's
issuing root, so it passes only when the relay sends the whole chain.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat

from cryptography import x509
from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pipegate.tap import server as tap
from tests.pebble import Pebble
from tests.support import SECRET, Loopback, eventually, free_port, request

DOMAIN = "pipegate.test"


def handshake(port: int, server_name: str, cafile: str, payload: bytes | None = None):
    """(leaf certificate, chain length, response bytes) of a TLS connection with SNI; blocking."""
    context = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            chain = tls.get_verified_chain() if hasattr(tls, "get_verified_chain") else None
            data = b""
            if payload is not None:
                tls.sendall(payload)
                while True:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            return leaf, (len(chain) if chain is not None else None), data


def unverified_leaf(port: int, server_name: str) -> x509.Certificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def sent_chain(port: int, server_name: str) -> list[str]:
    """Subjects of the certificates the server sends for C{server_name} (pyOpenSSL; blocking)."""
    from OpenSSL import SSL

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.settimeout(None)   # pyOpenSSL wants a blocking socket; the server is ours and answers
        connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), raw)
        connection.set_tlsext_host_name(server_name.encode())
        connection.set_connect_state()
        connection.do_handshake()
        chain = [c.to_cryptography().subject.rfc4514_string() for c in connection.get_peer_cert_chain()]
        connection.shutdown()
        return chain


def names_of(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


class Events:
    """Log events of the test (messages formatted), to assert on what operators see."""

    def __init__(self, testcase) -> None:
        from twisted.logger import formatEvent

        self.lines: list[str] = []
        self._format = formatEvent
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event) -> None:
        self.lines.append(self._format(event))

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


class AcmeRelay(unittest.TestCase):
    """A relay with --acme-directory against Pebble."""

    validity: int | None = None
    timeout = 120

    def setUp(self):
        self.http_port = free_port()
        self.https_port = free_port()
        self.pebble = Pebble(self, os.path.abspath(self.mktemp()), self.http_port, self.validity)
        self.pebble.start()
        self.addCleanup(self.pebble.stop)
        self.state = os.path.abspath(self.mktemp())
        self.events = Events(self)
        self.loop = Loopback(self)

    def options(self, *extra: str, directory: str | None = None, listen: bool = True) -> tap.Options:
        options = tap.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": SECRET}
        args = ["--domain", DOMAIN,
                "--acme-directory", directory or self.pebble.url,
                "--acme-ca-file", self.pebble.ca_file,
                "--acme-state", self.state,
                "--https", f"tcp:{self.https_port}:interface=127.0.0.1",
                "--listen", f"tcp:{self.http_port if listen else free_port()}:interface=127.0.0.1",
                "--drain-timeout", "0"]
        options.parseOptions(args + list(extra))
        return options

    async def start(self, options: tap.Options):
        top = tap.makeService(options, reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(self._stop, top)
        self.manager = next(s for s in top if type(s).__name__ == "AcmeManager")
        self.relay = next(s for s in top if type(s).__name__ == "Relay")
        return top

    async def _stop(self, top):
        if top.running:
            await defer.maybeDeferred(top.stopService)
        await task.deferLater(reactor, 0.05, lambda: None)

    async def issued(self, name: str, timeout: float = 30.0):
        await eventually(lambda: name in self.manager.held, timeout)
        return self.manager.held[name]

    async def tls(self, name: str, payload: bytes | None = None):
        return await threads.deferToThread(handshake, self.https_port, name, self.pebble.root_file, payload)


class Issuance(AcmeRelay):
    async def test_domain_and_subdomain(self):
        """
        The domain is ordered at startup; a tunnel's subdomain when its connector logs
        in; HTTPS then serves each by SNI with the whole chain, and carries requests.
        """
        await self.start(self.options())
        stored = await self.issued(DOMAIN)
        leaf, chain, response = await self.tls(DOMAIN, b"GET /healthz HTTP/1.1\r\nHost: "
                                               + DOMAIN.encode() + b"\r\nConnection: close\r\n\r\n")
        self.assertEqual(names_of(leaf), [DOMAIN])
        self.assertEqual(leaf.serial_number, x509.load_pem_x509_certificate(stored.chain_pem).serial_number)
        if chain is not None:
            self.assertEqual(chain, 3)   # leaf, Pebble's intermediate, Pebble's root
        sent = await threads.deferToThread(sent_chain, self.https_port, DOMAIN)
        self.assertEqual(len(sent), 2, sent)                   # the leaf and Pebble's intermediate
        self.assertIn("Pebble Intermediate CA", sent[1])
        self.assertIn(b"200 OK", response)
        self.assertIn(b'"ok"', response)
        self.assertTrue(self.pebble.serial_valid(leaf.serial_number))
        # No connector yet: no order for the tunnel's name; SNI for it gets the fallback.
        self.assertNotIn(f"app1.{DOMAIN}", self.manager.scheduler.names)
        fallback = await threads.deferToThread(unverified_leaf, self.https_port, f"app1.{DOMAIN}")
        self.assertNotEqual(fallback.serial_number, leaf.serial_number)
        with self.assertRaises(ssl.SSLCertVerificationError):
            await self.tls(f"app1.{DOMAIN}")
        self.assertEqual(len(self.events.matching(f"no certificate for 'app1.{DOMAIN}' yet")), 1)

        app = await self.loop.app()
        await self.loop.connector(self.http_port, app, "app1")
        sub = await self.issued(f"app1.{DOMAIN}")
        leaf, _, response = await self.tls(
            f"app1.{DOMAIN}", f"GET /hello HTTP/1.1\r\nHost: app1.{DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        self.assertEqual(names_of(leaf), [f"app1.{DOMAIN}"])
        self.assertEqual(leaf.serial_number, x509.load_pem_x509_certificate(sub.chain_pem).serial_number)
        self.assertIn(b"200 OK", response)
        self.assertIn(b'["x-forwarded-proto", "https"]', response.lower())
        self.assertEqual(self.manager.stats.get("acme_orders"), 2)
        self.assertEqual(self.manager.stats.by_label("acme_failures"), {})
        self.assertTrue(self.events.matching(f"certificate for app1.{DOMAIN} issued, valid until"))

    async def test_state_files_and_modes(self):
        await self.start(self.options())
        await self.issued(DOMAIN)
        self.assertEqual(stat.S_IMODE(os.stat(self.state).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.state, "certs")).st_mode), 0o700)
        files = sorted(os.path.relpath(os.path.join(d, f), self.state)
                       for d, _, fs in os.walk(self.state) for f in fs)
        self.assertEqual(files, ["account.json", "account.key", f"certs/{DOMAIN}.pem"])
        for name in files:
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.state, name)).st_mode), 0o600, name)
        with open(os.path.join(self.state, "account.json")) as f:
            self.assertEqual(json.load(f)["directory"], self.pebble.url)

    async def test_restart_reuses_state(self):
        """A restart serves the stored certificate at once and orders nothing."""
        top = await self.start(self.options())
        first = await self.issued(DOMAIN)
        await defer.maybeDeferred(top.stopService)
        await self.start(self.options())
        self.assertIn(DOMAIN, self.manager.held)    # installed during startService
        leaf, _, _ = await self.tls(DOMAIN)
        self.assertEqual(leaf.serial_number, x509.load_pem_x509_certificate(first.chain_pem).serial_number)
        self.assertEqual(self.manager.stats.get("acme_orders"), 0)
        self.assertEqual(self.manager.scheduler.busy, 0)
        self.assertTrue(self.events.matching(f"certificate for {DOMAIN} loaded from the state directory"))

    async def test_metrics_and_status(self):
        metrics = free_port()
        await self.start(self.options("--metrics", f"tcp:{metrics}:interface=127.0.0.1"))
        stored = await self.issued(DOMAIN)
        agent = self.loop.agent()
        _, body = await request(agent, b"GET", f"http://127.0.0.1:{metrics}/status")
        rows = json.loads(body)["certificates"]
        self.assertEqual([(r["name"], r["expires"], r["state"]) for r in rows], [(DOMAIN, stored.expiry(), "valid")])
        _, body = await request(agent, b"GET", f"http://127.0.0.1:{metrics}/metrics")
        text = body.decode()
        self.assertIn("pipegate_acme_certificates 1.0", text)
        self.assertIn("pipegate_acme_orders_total 1.0", text)
        self.assertIn(f'pipegate_acme_certificate_expiry_days{{name="{DOMAIN}"}}', text)
        self.assertIn("pipegate_tunnels 0.0", text)    # the relay's own metrics are still there

    async def test_challenge_and_redirect_on_plain_listener(self):
        """--https-redirect: plain requests go to https, ACME challenges do not."""
        await self.start(self.options("--https-redirect"))
        await self.issued(DOMAIN)     # Pebble fetched its challenge through the redirect setting
        agent = self.loop.agent()
        response, _ = await request(agent, b"GET", f"http://127.0.0.1:{self.http_port}/app1/x?y=1",
                                    headers={b"host": f"app1.{DOMAIN}:8080".encode()})
        self.assertEqual(response.code, 308)
        self.assertEqual(response.headers.getRawHeaders(b"location"),
                         [f"https://app1.{DOMAIN}:{self.https_port}/app1/x?y=1".encode()])
        response, body = await request(agent, b"GET",
                                       f"http://127.0.0.1:{self.http_port}/.well-known/acme-challenge/nope")
        self.assertEqual((response.code, body), (404, b"no such challenge\n"))


class Failures(AcmeRelay):
    async def test_ca_down(self):
        """A CA that is down: the failure is logged and retried later; HTTP keeps working."""
        await self.start(self.options(directory=f"https://127.0.0.1:{free_port()}/dir"))
        await eventually(lambda: self.manager.stats.get("acme_failures", "unreachable") == 1, 15)
        state = self.manager.scheduler.names[DOMAIN]
        self.assertFalse(state.busy)
        self.assertEqual(state.due - reactor.seconds() > 30, True)
        self.assertTrue(self.events.matching(f"order for {DOMAIN} failed (unreachable)"))
        response, body = await request(self.loop.agent(), b"GET", f"http://127.0.0.1:{self.http_port}/healthz")
        self.assertEqual(response.code, 200)
        leaf = await threads.deferToThread(unverified_leaf, self.https_port, DOMAIN)
        self.assertEqual(leaf.issuer, leaf.subject)   # the self-signed fallback

    async def test_stalled_handshake_is_closed(self):
        """A stranger who opens --https and stalls mid-handshake is closed by --idle-timeout."""
        from twisted.internet import endpoints, protocol

        await self.start(self.options("--idle-timeout", "1", directory=f"https://127.0.0.1:{free_port()}/dir"))

        class Staller(protocol.Protocol):
            lost = False

            def connectionMade(self):
                self.transport.write(b"\x16\x03\x01\x02\x00")   # a ClientHello record header, then nothing

            def connectionLost(self, reason):
                Staller.lost = True

        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.https_port)
        client = await endpoint.connect(protocol.Factory.forProtocol(Staller))
        self.addCleanup(lambda: client.transport.abortConnection() if not Staller.lost else None)
        await eventually(lambda: Staller.lost, 30)   # idle timeout 1 s, then abort after at most 15 s

    async def test_failed_challenge(self):
        """Nothing answers HTTP-01 where Pebble looks: the CA's problem document is logged."""
        await self.start(self.options(listen=False))
        await eventually(lambda: self.manager.stats.get("acme_failures", "challenge") == 1, 30)
        lines = self.events.matching(f"order for {DOMAIN} failed (challenge)")
        self.assertEqual(len(lines), 1)
        self.assertIn("urn:ietf:params:acme:error:connection", lines[0])
        self.assertNotIn(DOMAIN, self.manager.held)
        self.assertFalse(os.path.exists(os.path.join(self.state, "certs", f"{DOMAIN}.pem")))


class Renewal(AcmeRelay):
    """Pebble issues 12-second certificates: renewal at two thirds, after 8 s."""

    validity = 12

    async def test_renewed_and_swapped_without_dropping_connections(self):
        await self.start(self.options())
        first = await self.issued(DOMAIN)
        self.assertLessEqual(abs(first.not_after - first.not_before - 12), 2)
        # A connection made before the renewal carries on with the old certificate.
        open_before = await threads.deferToThread(_open_tls, self.https_port, DOMAIN, self.pebble.root_file)
        self.addCleanup(open_before.close)
        await eventually(lambda: self.manager.held[DOMAIN].not_after > first.not_after, 40)
        second = self.manager.held[DOMAIN]
        self.assertGreaterEqual(second.not_before, first.not_before + 6)
        leaf, _, _ = await self.tls(DOMAIN)
        self.assertEqual(leaf.serial_number, x509.load_pem_x509_certificate(second.chain_pem).serial_number)
        self.assertEqual(self.manager.stats.get("acme_orders"), 2)
        response = await threads.deferToThread(
            _exchange, open_before, f"GET /healthz HTTP/1.1\r\nHost: {DOMAIN}\r\n\r\n".encode())
        self.assertIn(b"200 OK", response)


def _open_tls(port: int, name: str, cafile: str) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=cafile)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname=name)


def _exchange(tls: ssl.SSLSocket, payload: bytes) -> bytes:
    tls.sendall(payload)
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    return data





class Process(unittest.TestCase):
    """`twistd pipegate-server` as users run it, configured by PIPEGATE_* variables only."""

    timeout = 120

    def setUp(self):
        self.http_port, self.https_port = free_port(), free_port()
        self.pebble = Pebble(self, os.path.abspath(self.mktemp()), self.http_port)
        self.pebble.start()
        self.addCleanup(self.pebble.stop)
        self.state = os.path.abspath(self.mktemp())

    def relay(self):
        from tests.test_processes import TWISTD, child_env, spawn

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = child_env(
            PYTHONPATH=root, PIPEGATE_JWT_SECRET=SECRET, PIPEGATE_DOMAIN=DOMAIN,
            PIPEGATE_ACME_DIRECTORY=self.pebble.url, PIPEGATE_ACME_CA_FILE=self.pebble.ca_file,
            PIPEGATE_ACME_STATE=self.state, PIPEGATE_HTTPS=f"tcp:{self.https_port}:interface=127.0.0.1",
            PIPEGATE_LISTEN=f"tcp:{self.http_port}:interface=127.0.0.1", PIPEGATE_HTTPS_REDIRECT="true")
        return spawn(self, TWISTD + ["--nodaemon", "--pidfile=", "--logfile=-", "pipegate-server"], env)

    async def stop(self, child) -> str:
        import signal

        os.kill(child.transport.pid, signal.SIGTERM)
        await eventually(lambda: child.ended.called, 30)   # threads joined, nothing hangs the exit
        code = await child.ended
        out = child.output.decode("utf-8", "replace")
        # twistd ends itself with the signal it stopped on, after a clean shutdown
        self.assertTrue(code == 0 or child.signal == signal.SIGTERM, out)
        self.assertIn("Server Shut Down.", out)
        self.assertNotIn("Traceback", out)
        return out

    async def test_issue_then_restart_from_state(self):
        child = self.relay()
        await eventually(lambda: f"certificate for {DOMAIN} issued".encode() in child.output, 30)
        leaf, _, response = await threads.deferToThread(
            handshake, self.https_port, DOMAIN, self.pebble.root_file,
            f"GET /healthz HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        self.assertEqual(names_of(leaf), [DOMAIN])
        self.assertIn(b"200 OK", response)
        await self.stop(child)

        child = self.relay()
        await eventually(lambda: b"loaded from the state directory" in child.output, 30)
        again, _, _ = await threads.deferToThread(handshake, self.https_port, DOMAIN, self.pebble.root_file)
        self.assertEqual(again.serial_number, leaf.serial_number)
        out = await self.stop(child)
        self.assertNotIn("ordering a certificate", out)
