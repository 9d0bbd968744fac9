"""
What an operator reads in the journal when a service starts: one line saying what it
listens on, its bounds and its TLS/ACME state (pipegate/startup.py), and a warning when
the configured connection caps need more descriptors than LimitNOFILE gives.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from pipegate.fdlimit import FdBudget, overcommitted
from tests.support import SECRET

ROUTER = "ab" * 32


def captured(testcase) -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def lines(events, level=None) -> list[str]:
    return [formatEvent(e) for e in events if level is None or e["log_level"] == level]


def started(testcase, tap, environ: dict, argv) -> list:
    """The events of C{tap}'s makeService (on a MemoryReactorClock) for C{argv}."""
    options = tap.Options()
    options.environ = environ
    options.parseOptions(list(argv))
    events = captured(testcase)
    tap.makeService(options, MemoryReactorClock())
    return events


def relay_service(testcase, *argv: str):
    from pipegate.tap import server

    return started(testcase, server, {"PIPEGATE_JWT_SECRET": SECRET}, argv)


def gateway_service(testcase, *argv: str):
    from pipegate.tap import gateway

    return started(testcase, gateway, {"PIPEGATE_ROUTER": ROUTER}, argv)


class RelayLine(unittest.TestCase):
    def test_plain(self):
        events = relay_service(self, "--listen", "tcp:8000:interface=127.0.0.1", "--max-connections", "900",
                               "--max-connections-per-ip", "30")
        [line] = [e for e in lines(events) if e.startswith("relay on ")]
        self.assertEqual(
            line, "relay on tcp:8000:interface=127.0.0.1 (plain HTTP, no TLS); ACME off; metrics off; "
                  "bounds: 30 connections per IP, 900 in all, 100 requests in flight per tunnel, "
                  "bodies unlimited, request timeout 300 s, idle timeout 60 s, drain timeout 30 s; "
                  "revocation list off")

    def test_no_factory_lines(self):
        # twisted.web's "Starting factory <pipegate.http.public.RelaySite object at 0x7f...>" and its
        # "Stopping factory" said nothing that the line above does not, in worse words.
        from twisted.internet.task import Clock

        from pipegate import auth
        from pipegate.http.public import RelaySite
        from pipegate.http.relay import Relay, RelayConfig

        events = captured(self)
        site = RelaySite(Relay(RelayConfig(jwt=auth.JWTSettings(secret=SECRET)), Clock()))
        site.doStart()
        site.doStop()
        self.assertEqual([line for line in lines(events) if "factory" in line], [])

    def test_tls_metrics_and_revocations(self):
        from tests.test_tlsfiles import NOW, cert_files
        import datetime
        import os

        cert, key = cert_files(self, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=3650))
        revoked = os.path.join(os.path.dirname(cert), "revoked")
        open(revoked, "w").close()
        events = relay_service(self, "--listen", "tcp:8443:interface=127.0.0.1", "--tls-cert", cert,
                               "--tls-key", key, "--metrics", "tcp:9100:interface=127.0.0.1",
                               "--revoked", revoked, "--max-body-bytes", "1048576")
        [line] = [e for e in lines(events) if e.startswith("relay on ")]
        self.assertIn(f"(TLS from --tls-cert {cert}, valid until 2036-12-04T12:00:00+00:00, "
                      "reloaded on SIGHUP); ACME off; metrics on tcp:9100:interface=127.0.0.1;", line)
        self.assertIn("bodies up to 1048576 bytes,", line)
        self.assertTrue(line.endswith(f"revocation list {revoked}"), line)

    def test_ssl_endpoint(self):
        from tests.test_tlsfiles import NOW, cert_files
        import datetime

        cert, key = cert_files(self, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=3650))
        listen = f"ssl:8443:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        events = relay_service(self, "--listen", listen)
        [line] = [e for e in lines(events) if e.startswith("relay on ")]
        self.assertIn(f"relay on {listen} (TLS from the ssl: endpoint, read once); ACME off;", line)

    def test_acme(self):
        events = relay_service(self, "--listen", "tcp:80:interface=127.0.0.1", "--domain", "t.example",
                               "--https", "tcp:443:interface=127.0.0.1",
                               "--acme-directory", "https://127.0.0.1:14000/dir",
                               "--acme-state", self.mktemp())
        [line] = [e for e in lines(events) if e.startswith("relay on ")]
        self.assertIn("(plain HTTP, no TLS); ACME from https://127.0.0.1:14000/dir for t.example, "
                      "HTTPS on tcp:443:interface=127.0.0.1; ", line)

    def test_expired_certificate_warns_at_startup(self):
        from tests.test_tlsfiles import cert_files
        import datetime

        long_ago = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        cert, key = cert_files(self, long_ago, long_ago + datetime.timedelta(days=30))
        events = relay_service(self, "--listen", "tcp:8443:interface=127.0.0.1", "--tls-cert", cert,
                               "--tls-key", key)
        self.assertIn(f"--tls-cert {cert}: the certificate expired on 2020-01-31T00:00:00+00:00; "
                      "clients will refuse it", lines(events, LogLevel.warn))

    def test_caps_beyond_the_fd_budget_warn(self):
        events = relay_service(self, "--listen", "tcp:8000:interface=127.0.0.1",
                               "--max-connections", str(10 ** 7))
        [warning] = [e for e in lines(events, LogLevel.warn) if "LimitNOFILE" in e]
        self.assertIn("--max-connections (10000000)", warning)


class GatewayLine(unittest.TestCase):
    def test_line(self):
        events = gateway_service(self, "--mux", "tcp:7000:interface=127.0.0.1", "--listen", "0.0.0.0",
                                 "--metrics", "tcp:9101:interface=127.0.0.1")
        [line] = [e for e in lines(events) if e.startswith("gateway ")]
        self.assertEqual(line, "gateway links on tcp:7000:interface=127.0.0.1 (TLS, a new self-signed "
                               "certificate each start); dials none; gates on 0.0.0.0; metrics on "
                               "tcp:9101:interface=127.0.0.1; drain timeout 30 s")

    def test_caps_beyond_the_fd_budget_warn(self):
        events = gateway_service(self, "--mux", "tcp:7000:interface=127.0.0.1", "--max-conns", str(10 ** 7))
        [warning] = [e for e in lines(events, LogLevel.warn) if "LimitNOFILE" in e]
        self.assertIn("--max-conns (10000000)", warning)


class Overcommit(unittest.TestCase):
    def test_within(self):
        self.assertIsNone(overcommitted(FdBudget(1024, 65536, 65536), {"max-connections": 60000}))

    def test_beyond(self):
        self.assertEqual(
            overcommitted(FdBudget(1024, 1024, 1024), {"max-connections": 4000}),
            "--max-connections (4000) needs more file descriptors than the soft limit 1024 (hard 1024) "
            "leaves (960 after 64 for the service itself): connections past it fail with EMFILE; "
            "raise LimitNOFILE= in the unit to at least 4064, or lower the cap")

    def test_zero_means_no_cap_and_is_not_summed(self):
        self.assertIsNone(overcommitted(FdBudget(1024, 1024, 1024), {"max-conns": 0}))


class ProviderLine(unittest.TestCase):
    def test_line_and_warning(self):
        import json
        import os

        from pipegate.tap.provider import Options, backend_caps

        services = os.path.join(self.mktemp())
        with open(services, "w") as f:
            json.dump({"services": [{"gatePort": 2222, "serviceHost": "127.0.0.1", "servicePort": 22}]}, f)
        options = Options()
        options.environ = {"PIPEGATE_ROUTER": ROUTER}
        options.parseOptions(["--services", services, "--connect", "tcp:127.0.0.1:7000",
                              "--max-backends", "5000"])
        events = captured(self)
        backend_caps(options, FdBudget(1024, 1024, 1024))
        self.assertIn("provider links on none (TLS, a new self-signed certificate each start); dials "
                      "tcp:127.0.0.1:7000; metrics off; drain timeout 30 s", lines(events))
        [warning] = [e for e in lines(events, LogLevel.warn) if "LimitNOFILE" in e]
        self.assertIn("--max-backends (5000)", warning)
