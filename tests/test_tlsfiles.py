"""
The relay's --tls-cert/--tls-key files as an operator meets them: a missing key names
--tls-key, an expired (or not yet valid) certificate gives one warning line naming
--tls-cert at startup and on reload (pipegate/tlsreload.py).
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import task
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from pipegate.tlsreload import ReloadingServerTLS, validity_problem
from tests.support import SECRET

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def cert_files(testcase, not_before: datetime.datetime, not_after: datetime.datetime) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(not_before).not_valid_after(not_after).sign(key, hashes.SHA256()))
    tmp = testcase.mktemp()
    os.makedirs(tmp)
    paths = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    with open(paths[0], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


def clock_at(when: datetime.datetime) -> task.Clock:
    clock = task.Clock()
    clock.advance(when.timestamp())
    return clock


class Validity(unittest.TestCase):
    def test_valid(self):
        self.assertIsNone(validity_problem(NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=60), NOW))

    def test_expired(self):
        problem = validity_problem(NOW - datetime.timedelta(days=90), NOW - datetime.timedelta(days=1), NOW)
        self.assertEqual(problem, "the certificate expired on 2026-12-06T12:00:00+00:00; clients will refuse it")

    def test_not_yet_valid(self):
        problem = validity_problem(NOW + datetime.timedelta(hours=2), NOW + datetime.timedelta(days=90), NOW)
        self.assertEqual(problem, "the certificate is not valid before 2026-12-07T14:00:00+00:00 "
                                  "(check the clock); clients will refuse it")

    def test_expires_soon(self):
        problem = validity_problem(NOW - datetime.timedelta(days=80), NOW + datetime.timedelta(days=3), NOW)
        self.assertEqual(problem, "the certificate expires on 2026-12-10T12:00:00+00:00, in 3.0 days")


class Files(unittest.TestCase):
    def test_expired_certificate_is_reported(self):
        cert, key = cert_files(self, NOW - datetime.timedelta(days=90), NOW - datetime.timedelta(days=1))
        tls = ReloadingServerTLS(cert, key, clock=clock_at(NOW))
        self.assertEqual(tls.problem, "the certificate expired on 2026-12-06T12:00:00+00:00; clients will refuse it")

    def test_reload_of_an_expired_certificate_warns(self):
        cert, key = cert_files(self, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=60))
        clock = clock_at(NOW)
        tls = ReloadingServerTLS(cert, key, clock=clock)
        self.assertIsNone(tls.problem)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock.advance(61 * 86400)
        self.assertTrue(tls.reload())
        warnings = [e for e in events if e["log_level"] == LogLevel.warn and "tls_problem" in e]
        self.assertEqual(len(warnings), 1)
        self.assertIn("expired", warnings[0]["tls_problem"])
        self.assertEqual(warnings[0]["path"], cert)

    def test_missing_key_names_tls_key(self):
        from pipegate.tap.server import Options

        cert, key = cert_files(self, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=600))
        options = Options()
        options.environ = {"PIPEGATE_JWT_SECRET": SECRET}
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--tls-cert", cert,
                                  "--tls-key", key + ".missing"])
        self.assertEqual(str(caught.exception), f"--tls-key: {key}.missing: No such file or directory")

    def test_missing_certificate_names_tls_cert(self):
        from pipegate.tap.server import Options

        cert, key = cert_files(self, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=600))
        options = Options()
        options.environ = {"PIPEGATE_JWT_SECRET": SECRET}
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--tls-cert", cert + ".missing",
                                  "--tls-key", key])
        self.assertEqual(str(caught.exception), f"--tls-cert: {cert}.missing: No such file or directory")


class LinkCertificates(unittest.TestCase):
    """The gateway's and provider's --tls-cert/--tls-key (mux links): a key that does not match
    was a VerifyError traceback at startup; an expired certificate went unmentioned."""

    def parse(self, *argv: str):
        from pipegate.tap.gateway import Options

        options = Options()
        options.environ = {"PIPEGATE_ROUTER": "ab" * 32}
        options.parseOptions(["--mux", "tcp:7000:interface=127.0.0.1", *argv])
        return options

    def test_mismatched_key(self):
        cert, _ = cert_files(self, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=600))
        _, other_key = cert_files(self, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=600))
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--tls-cert", cert, "--tls-key", other_key)
        self.assertEqual(str(caught.exception), "--tls-cert: the key does not match the certificate")

    def test_not_a_certificate(self):
        _, key = cert_files(self, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=600))
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--tls-cert", key, "--tls-key", key)
        self.assertTrue(str(caught.exception).startswith("--tls-cert: cannot read the certificate or key"),
                        str(caught.exception))

    def test_expired_certificate_warns(self):
        from pipegate.tap.gateway import gate_caps
        from pipegate.fdlimit import FdBudget

        long_ago = datetime.datetime(2020, 1, 1, tzinfo=UTC)
        cert, key = cert_files(self, long_ago, long_ago + datetime.timedelta(days=30))
        options = self.parse("--tls-cert", cert, "--tls-key", key)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        gate_caps(options, FdBudget(1024, 1024, 1024))
        from twisted.logger import formatEvent

        self.assertIn(f"--tls-cert {cert}: the certificate expired on 2020-01-31T00:00:00+00:00; clients will "
                      "refuse it", [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn])


class TrustFiles(unittest.TestCase):
    """--ca-file (connector) and --tls-ca (provider, gateway) naming a file that is not a PEM
    certificate (a key, say): an OpenSSL 'no start line' traceback at startup."""

    def test_connector_ca_file(self):
        from pipegate.tap.client import Options

        _, key = cert_files(self, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=600))
        options = Options()
        options.environ = {"PIPEGATE_TOKEN": "x"}
        with self.assertRaises((usage.UsageError, SystemExit)) as caught:
            options.parseOptions(["--ca-file", key, "http://127.0.0.1:3000", "wss://relay.example.com/my-app"])
        self.assertIn(f"--ca-file: {key}: not a PEM certificate", str(caught.exception))

    def test_provider_tls_ca(self):
        import json

        from pipegate.tap.provider import Options

        _, key = cert_files(self, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=600))
        services = self.mktemp()
        with open(services, "w") as f:
            json.dump({"services": [{"gatePort": 2222, "serviceHost": "127.0.0.1", "servicePort": 22}]}, f)
        options = Options()
        options.environ = {"PIPEGATE_ROUTER": "ab" * 32}
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--services", services, "--connect", "tcp:127.0.0.1:7000",
                                  "--tls-verify", "gw.example.com", "--tls-ca", key])
        self.assertEqual(str(caught.exception), f"--tls-ca: {key}: not a PEM certificate")


class HubCertificate(unittest.TestCase):
    def test_expired_hub_certificate_warns(self):
        from twisted.logger import formatEvent

        from tests.test_startup import relay_service

        long_ago = datetime.datetime(2020, 1, 1, tzinfo=UTC)
        cert, key = cert_files(self, long_ago, long_ago + datetime.timedelta(days=30))
        events = relay_service(self, "--listen", "tcp:8000:interface=127.0.0.1", "--mux",
                               "tcp:7000:interface=127.0.0.1", "--mux-router", "ab" * 32,
                               "--mux-tls-cert", cert, "--mux-tls-key", key)
        self.assertIn(f"--mux-tls-cert {cert}: the certificate expired on 2020-01-31T00:00:00+00:00; clients "
                      "will refuse it", [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn])
