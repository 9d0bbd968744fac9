"""
Running under systemd: socket activation (a listening socket handed over as fd 3 with
LISTEN_FDS/LISTEN_PID, as systemd does), JSON-lines logs through
`twistd --logger pipegate.logs.json`, and TLS on the relay with a certificate reloaded
on SIGHUP while existing connections carry on.  All with real twistd processes.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, endpoints, protocol, reactor, ssl
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial import unittest

from pipegate.logs import JSONLinesObserver, record
from tests.support import SECRET, eventually, free_port
from tests.test_processes import TWISTD, Child, child_env, spawn


def make_cert(common_name: str = "localhost") -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): self-signed for localhost, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class JSONLogs(unittest.TestCase):
    def test_record_fields(self):
        event = {"log_format": "tunnel {tunnel_id} up", "tunnel_id": "t1", "log_level": LogLevel.info,
                 "log_namespace": "pipegate.x", "log_time": 0.0, "count": 2, "obj": object()}
        got = record(event)
        self.assertEqual(got["message"], "tunnel t1 up")
        self.assertEqual((got["level"], got["namespace"], got["tunnel_id"], got["count"]),
                         ("info", "pipegate.x", "t1", 2))
        self.assertEqual(got["time"], "1970-01-01T00:00:00.000+00:00")
        self.assertNotIn("obj", got)

    def test_failure_has_a_traceback(self):
        import io

        out = io.StringIO()
        log = Logger(observer=JSONLinesObserver(out))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("oops {n}", Failure(), n=1)
        got = json.loads(out.getvalue())
        self.assertEqual(got["level"], "critical")
        self.assertIn("ZeroDivisionError", got["traceback"])


def activated(testcase, sock: socket.socket, argv: list[str], env: dict[str, str]) -> Child:
    """
    Start argv with C{sock} as fd 3, LISTEN_FDS=1, LISTEN_FDNAMES (systemd 227+ sets it to
    the socket unit's name) and LISTEN_PID = the child's own pid.
    """
    child = Child()
    env = dict(env, LISTEN_FDS="1", LISTEN_FDNAMES="pipegate-relay.socket")
    shim = "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[1], sys.argv[1:])"
    args = [sys.executable, "-c", shim] + argv
    process = reactor.spawnProcess(child, args[0], args, env=env, path=os.getcwd(),
                                   childFDs={0: "w", 1: "r", 2: "r", 3: sock.fileno()})

    async def stop():
        if not child.ended.called:
            process.signalProcess(signal.SIGKILL)
            await child.ended
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
    return child


class Fetch(protocol.Protocol):
    """Sends requests on one connection; collects what comes back."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: defer.Deferred = defer.Deferred()

    def get(self, path: str) -> None:
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(None)


class SocketActivation(unittest.TestCase):
    timeout = 60

    async def test_relay_on_a_handed_over_socket_with_json_logs(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        port = sock.getsockname()[1]
        metrics = free_port()
        relay = activated(self, sock, TWISTD + [
            "--nodaemon", "--pidfile=", "--logger", "pipegate.logs.json", "pipegate-server",
            "--listen", "systemd:domain=INET:index=0", "--metrics", f"tcp:{metrics}:interface=127.0.0.1"],
            child_env(PIPEGATE_JWT_SECRET=SECRET))
        sock.close()  # the child holds its own copy, as under systemd
        client = Fetch()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport.abortConnection())
        client.get("/healthz")
        try:
            await eventually(lambda: b'{"status": "ok"}' in client.received, timeout=20)
            await eventually(lambda: b"starting on %d" % metrics in relay.output, timeout=20)
        except AssertionError:
            self.fail(relay.output.decode()[-3000:])
        relay.transport.signalProcess(signal.SIGTERM)
        await relay.ended
        lines = [line for line in relay.output.decode().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        self.assertTrue(any("Received SIGTERM" in r["message"] for r in records))
        self.assertTrue(all({"time", "level", "namespace", "message"} <= set(r) for r in records))
        self.assertFalse(any("Traceback" in r["message"] or "traceback" in r for r in records))

    async def test_wrong_listen_pid_is_refused(self):
        """Without LISTEN_PID matching, nothing is inherited: startup stops with a message."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        self.addCleanup(sock.close)
        child = Child()
        env = child_env(PIPEGATE_JWT_SECRET=SECRET, LISTEN_FDS="1", LISTEN_FDNAMES="pipegate-relay.socket",
                        LISTEN_PID="1")
        argv = TWISTD + ["--nodaemon", "--pidfile=", "pipegate-server", "--listen", "systemd:domain=INET:index=0"]
        reactor.spawnProcess(child, argv[0], argv, env=env, path=os.getcwd(),
                             childFDs={0: "w", 1: "r", 2: "r", 3: sock.fileno()})
        code = await child.ended
        self.assertNotEqual(code, 0)
        self.assertIn(b"--listen: systemd:domain=INET:index=0: no such socket from systemd", child.output)


class SignalHandlerTiming(unittest.TestCase):
    """twistd listens in privilegedStartService; the reload handler must be in place by then."""

    def test_handler_is_installed_before_start_service(self):
        from pipegate.tlsreload import ReloadOnSignal

        calls = []

        class ThreadlessReactor:
            def callFromThread(self, f, *args):
                f(*args)

        before = signal.getsignal(signal.SIGUSR2)
        self.addCleanup(signal.signal, signal.SIGUSR2, before)
        svc = ReloadOnSignal(lambda: calls.append("reload"), ThreadlessReactor(), signal.SIGUSR2)
        svc.privilegedStartService()
        # Checked before the signal is sent: without a handler, SIGUSR2 would end trial itself.
        self.assertNotEqual(signal.getsignal(signal.SIGUSR2), before)
        os.kill(os.getpid(), signal.SIGUSR2)
        self.assertEqual(calls, ["reload"])
        svc.startService()  # installs nothing twice: stopping restores the original handler
        svc.stopService()
        self.assertEqual(signal.getsignal(signal.SIGUSR2), before)


class TLSReload(unittest.TestCase):
    timeout = 60

    async def connect(self, port: int, cert_pem: bytes) -> Fetch:
        options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(cert_pem))
        endpoint = endpoints.wrapClientTLS(options, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        client = Fetch()
        await endpoints.connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    async def test_sighup_serves_the_new_certificate_and_keeps_old_connections(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        first, second = make_cert(), make_cert()
        for path, data in ((cert_path, first[0]), (key_path, first[1])):
            with open(path, "wb") as f:
                f.write(data)
        port = free_port()
        relay = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-server", "--listen",
                                      f"tcp:{port}:interface=127.0.0.1", "--tls-cert", cert_path,
                                      "--tls-key", key_path], child_env(PIPEGATE_JWT_SECRET=SECRET))
        await eventually(lambda: b"starting on %d" % port in relay.output, timeout=20)

        old = await self.connect(port, first[0])
        old.get("/healthz")
        await eventually(lambda: b'{"status": "ok"}' in old.received)
        seen = old.transport.getPeerCertificate().to_cryptography()
        self.assertEqual(seen, x509.load_pem_x509_certificate(first[0]))

        # A broken pair is refused and the old certificate stays.
        with open(key_path, "wb") as f:
            f.write(second[1])
        relay.transport.signalProcess(signal.SIGHUP)
        await eventually(lambda: b"TLS reload failed" in relay.output, timeout=10)
        with open(cert_path, "wb") as f:
            f.write(second[0])
        relay.transport.signalProcess(signal.SIGHUP)
        await eventually(lambda: b"TLS certificate reloaded" in relay.output, timeout=10)

        new = await self.connect(port, second[0])  # verified against the second certificate only
        new.get("/healthz")
        await eventually(lambda: b'{"status": "ok"}' in new.received)
        seen = new.transport.getPeerCertificate().to_cryptography()
        self.assertEqual(seen, x509.load_pem_x509_certificate(second[0]))

        old.received.clear()
        old.get("/healthz")  # the connection made before the reload still works
        await eventually(lambda: b'{"status": "ok"}' in old.received)
        self.assertTrue(old.transport.connected)

        relay.transport.signalProcess(signal.SIGTERM)
        await relay.ended
        self.assertNotIn(b"Traceback", relay.output)

    async def test_bad_certificate_stops_startup(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        cert, key = make_cert()
        _, other_key = make_cert()
        paths = {}
        for name, data in (("cert", cert), ("key", other_key)):
            paths[name] = os.path.join(tmp, name)
            with open(paths[name], "wb") as f:
                f.write(data)
        child = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-server", "--listen", "tcp:0",
                                      "--tls-cert", paths["cert"], "--tls-key", paths["key"]],
                      child_env(PIPEGATE_JWT_SECRET=SECRET))
        self.assertNotEqual(await child.ended, 0)
        self.assertIn(b"--tls-cert: the key does not match the certificate", child.output)

    async def test_sighup_without_tls_keeps_the_relay_running(self):
        port = free_port()
        relay = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-server", "--listen",
                                      f"tcp:{port}:interface=127.0.0.1"], child_env(PIPEGATE_JWT_SECRET=SECRET))
        await eventually(lambda: b"starting on %d" % port in relay.output, timeout=20)
        relay.transport.signalProcess(signal.SIGHUP)
        await eventually(lambda: b"SIGHUP: nothing to reload (no --tls-cert, no --revoked)" in relay.output,
                         timeout=10)
        client = Fetch()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport.abortConnection())
        client.get("/healthz")
        await eventually(lambda: b'{"status": "ok"}' in client.received)
        self.assertFalse(relay.ended.called)
        relay.transport.signalProcess(signal.SIGTERM)
        await relay.ended
