"""
Automatic HTTPS, unit level (no sockets, no processes): the order schedule (sans-IO),
the manager on a task.Clock with an issuer whose results the test hands over, the state
directory, SNI selection over in-memory TLS, and the options.  The plain listener and
the issuer on loopback: tests/test_acme_loopback.py; everything against a real ACME
server: tests/test_acme_pebble.py.
"""

from __future__ import annotations

import datetime
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from pipegate.http import certstore
from pipegate.http.acme import AcmeManager, acme_collector, endpoint_port
from pipegate.http.acmeschedule import OrderScheduler, renewal_time
from pipegate.http.acmeclient import AcmeFailure, Issued
from pipegate.http.certstore import CertStore, StoredCertificate, atomic_write
from pipegate.http.sni import MAX_LOGGED_NAMES, SNISelector
from pipegate.metrics import registry_for
from pipegate.status import acme_status
from tests.support import SECRET

DAY = 86400.0
T0 = 1_800_000_000.0


def make_cert(name: str, not_before: float, not_after: float) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM: leaf + issuer) for C{name}, valid between the two times."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit test issuer")])
    ts = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc)  # noqa: E731
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(ts(not_before - DAY)).not_valid_after(ts(not_after + DAY))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(ts(not_before)).not_valid_after(ts(not_after))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            leaf.public_bytes(pem) + ca.public_bytes(pem))


# -- the schedule


class Schedule(unittest.TestCase):
    def test_queue_runs_at_most_max_orders(self):
        s = OrderScheduler(max_orders=2)
        for name in ("a.d", "b.d", "c.d"):
            self.assertTrue(s.want(name, T0))
        self.assertFalse(s.want("a.d", T0))          # known already
        self.assertEqual(s.start(T0), (["a.d", "b.d"], []))
        self.assertEqual(s.start(T0), ([], []))       # both slots busy
        self.assertIsNone(s.next_wakeup())            # nothing until a result
        s.succeeded("a.d", T0, T0 + 90 * DAY, T0 + 1)
        self.assertEqual(s.start(T0 + 1), (["c.d"], []))

    def test_renewal_at_two_thirds_and_rearmed(self):
        s = OrderScheduler()
        s.want("d", T0, sticky=True)
        s.start(T0)
        due = s.succeeded("d", T0, T0 + 90 * DAY, T0 + 5)
        self.assertEqual(due, T0 + 60 * DAY)
        self.assertEqual(renewal_time(T0, T0 + 90 * DAY), T0 + 60 * DAY)
        self.assertEqual(s.next_wakeup(), T0 + 60 * DAY)
        self.assertEqual(s.start(T0 + 60 * DAY - 1), ([], []))
        self.assertEqual(s.start(T0 + 60 * DAY), (["d"], []))
        due = s.succeeded("d", T0 + 60 * DAY, T0 + 150 * DAY, T0 + 60 * DAY)
        self.assertEqual(due, T0 + 120 * DAY)         # the next renewal, from the new certificate

    def test_ari_time_wins(self):
        s = OrderScheduler()
        s.want("d", T0, sticky=True)
        s.start(T0)
        self.assertEqual(s.succeeded("d", T0, T0 + 90 * DAY, T0, renew_at=T0 + 10 * DAY), T0 + 10 * DAY)

    def test_backoff_doubles_and_is_capped(self):
        s = OrderScheduler(backoff=60, max_backoff=300)
        s.want("d", T0)
        delays = []
        now = T0
        for _ in range(5):
            self.assertEqual(s.start(now), (["d"], []))
            delays.append(s.failed("d", now))
            self.assertEqual(s.start(now + delays[-1] - 1), ([], []))
            now += delays[-1]
        self.assertEqual(delays, [60, 120, 240, 300, 300])
        s.start(now)
        s.succeeded("d", now, now + 90 * DAY, now)
        s.start(now + 60 * DAY)
        self.assertEqual(s.failed("d", now + 60 * DAY), 60)   # success resets the backoff

    def test_retry_after_is_honoured(self):
        s = OrderScheduler(backoff=60)
        s.want("d", T0)
        s.start(T0)
        self.assertEqual(s.failed("d", T0, retry_after=1800), 1800)
        s.start(T0 + 1800)
        self.assertEqual(s.failed("d", T0 + 1800, retry_after=5), 120)        # never below the backoff
        s.start(T0 + 1920)
        self.assertEqual(s.failed("d", T0 + 1920, retry_after=10 ** 9), 7 * DAY)  # at most a week

    def test_rate_limit_pauses_every_order(self):
        s = OrderScheduler(max_orders=3)
        s.want("a", T0)
        s.want("b", T0)
        self.assertEqual(s.start(T0)[0], ["a", "b"])
        s.failed("a", T0, retry_after=3600, rate_limited=True)
        s.failed("b", T0)                               # ordinary: 60 s
        s.want("c", T0 + 1)
        self.assertEqual(s.start(T0 + 100), ([], []))   # b and c wait for the pause too
        self.assertEqual(s.next_wakeup(), T0 + 3600)
        self.assertEqual(s.start(T0 + 3600)[0], ["c", "b", "a"])   # by due time

    def test_tunnel_names_renew_only_while_used(self):
        s = OrderScheduler()
        s.held("t.d", T0, T0 + 90 * DAY, T0)            # loaded at startup: no login yet
        s.held("d", T0, T0 + 90 * DAY, T0, sticky=True)
        at = T0 + 60 * DAY
        self.assertEqual(s.start(at, live=lambda name: False), (["d"], ["t.d"]))
        self.assertEqual(s.start(at + DAY), ([], []))   # dormant: no timer, no order
        s.succeeded("d", at, at + 90 * DAY, at)
        self.assertEqual(s.next_wakeup(), at + 60 * DAY)
        self.assertTrue(s.want("t.d", at + 2 * DAY))    # a login wakes it, overdue: order now
        self.assertEqual(s.start(at + 2 * DAY), (["t.d"], []))

    def test_failed_tunnel_name_is_retried_only_while_used(self):
        s = OrderScheduler()
        s.want("t.d", T0)
        s.start(T0)
        s.failed("t.d", T0)
        self.assertEqual(s.start(T0 + 60, live=lambda name: True), (["t.d"], []))    # still online
        s.failed("t.d", T0 + 60)
        self.assertEqual(s.start(T0 + 180, live=lambda name: False), ([], ["t.d"]))  # gone: dormant
        self.assertIsNone(s.next_wakeup())
        s.want("t.d", T0 + DAY)
        self.assertEqual(s.start(T0 + DAY, live=lambda name: False), (["t.d"], []))

    def test_tunnel_name_with_connector_online_is_renewed(self):
        s = OrderScheduler()
        s.held("t.d", T0, T0 + 90 * DAY, T0)
        self.assertEqual(s.start(T0 + 60 * DAY, live=lambda name: name == "t.d"), (["t.d"], []))
        s.succeeded("t.d", T0 + 60 * DAY, T0 + 150 * DAY, T0 + 60 * DAY)
        s.want("t.d", T0 + 61 * DAY)                    # a login after issuance also counts
        self.assertEqual(s.start(T0 + 120 * DAY, live=lambda name: False), (["t.d"], []))


# -- the manager on a clock


class FakeIssuer:
    """Orders the test completes by hand (the real one: tests/test_acme_pebble.py)."""

    def __init__(self, store: CertStore) -> None:
        self.store = store
        self.pending: dict[str, defer.Deferred] = {}
        self.calls: list[str] = []
        self.cancelled = False

    def issue(self, name: str) -> defer.Deferred:
        self.calls.append(name)
        d = self.pending[name] = defer.Deferred()
        return d

    def cancel(self) -> None:
        self.cancelled = True

    def complete(self, name: str, not_before: float, not_after: float, renew_at: float | None = None):
        key, chain = make_cert(name, not_before, not_after)
        self.pending.pop(name).callback(Issued(self.store.save(name, key, chain), renew_at))

    def fail(self, name: str, error: Exception) -> None:
        self.pending.pop(name).errback(error)


class Manager(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.store = CertStore(self.mktemp())
        self.store.prepare()
        self.issuer = FakeIssuer(self.store)
        self.live: set[str] = set()
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def manager(self, max_orders: int = 2) -> AcmeManager:
        m = AcmeManager("Example.TEST.", self.store, SNISelector("example.test"), self.issuer, self.clock,
                        lambda f, *a: defer.maybeDeferred(f, *a), max_orders, lambda n: n in self.live)
        m.startService()
        self.addCleanup(lambda: m.running and m.stopService())
        return m

    def messages(self, text: str) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.log if text in formatEvent(e)]

    def test_domain_at_startup_subdomains_on_login(self):
        m = self.manager()
        self.assertEqual(self.issuer.calls, ["example.test"])
        m.login("App1")
        m.login("app1")                          # the same name: one order
        m.login("bad_id")                        # '_' is not allowed in a DNS label
        m.login("bad_id")
        self.assertEqual(self.issuer.calls, ["example.test", "app1.example.test"])
        self.assertEqual(len(self.messages("'bad_id' is not a DNS label")), 1)
        self.issuer.complete("app1.example.test", T0, T0 + 90 * DAY)
        self.assertTrue(m.selector.has("app1.example.test"))
        self.assertEqual(m.stats.get("acme_orders"), 2)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), T0 + 3600)   # hourly re-check

    def test_concurrency_bound(self):
        m = self.manager(max_orders=1)
        for label in ("a", "b"):
            m.login(label)
        self.assertEqual(self.issuer.calls, ["example.test"])
        self.issuer.complete("example.test", T0, T0 + 90 * DAY)
        self.assertEqual(self.issuer.calls, ["example.test", "a.example.test"])
        self.issuer.fail("a.example.test", AcmeFailure("challenge", "urn:ietf:params:acme:error:connection: x"))
        self.assertEqual(self.issuer.calls[-1], "b.example.test")
        self.assertEqual(m.stats.by_label("acme_failures"), {"challenge": 1})
        line, = self.messages("order for a.example.test failed (challenge)")
        self.assertIn("urn:ietf:params:acme:error:connection", line)

    def test_failure_retried_after_backoff_and_retry_after(self):
        m = self.manager()
        self.issuer.fail("example.test", AcmeFailure("unreachable", "ConnectionError: refused"))
        self.clock.advance(59)
        self.assertEqual(self.issuer.calls, ["example.test"])
        self.clock.advance(1)
        self.assertEqual(self.issuer.calls, ["example.test"] * 2)
        self.issuer.fail("example.test", AcmeFailure("rate_limited", "too many", retry_after=7200))
        m.login("t")                              # paused too
        self.clock.advance(7199)
        self.assertEqual(self.issuer.calls, ["example.test"] * 2)
        self.clock.advance(1)
        self.assertEqual(sorted(self.issuer.calls[2:]), ["example.test", "t.example.test"])
        self.assertEqual(m.stats.by_label("acme_failures"), {"unreachable": 1, "rate_limited": 1})

    def test_synchronous_results_leave_one_timer(self):
        self.issuer.issue = lambda name: defer.fail(AcmeFailure("unreachable", "refused"))
        m = self.manager()
        m.login("a")
        m.login("b")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(m.stats.by_label("acme_failures"), {"unreachable": 3})

    def test_unexpected_error_is_logged_and_retried(self):
        m = self.manager()
        self.issuer.fail("example.test", RuntimeError("boom"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(m.stats.by_label("acme_failures"), {"error": 1})
        self.clock.advance(60)
        self.assertEqual(len(self.issuer.calls), 2)

    def test_renewal_timer_and_swap(self):
        m = self.manager()
        self.issuer.complete("example.test", T0, T0 + 9 * DAY)
        first = m.held["example.test"]
        self.clock.advance(6 * DAY - 1)
        self.assertEqual(len(self.issuer.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.issuer.calls), 2)
        self.assertIs(m.held["example.test"], first)          # still served while renewing
        self.issuer.complete("example.test", T0 + 6 * DAY, T0 + 15 * DAY)
        self.assertEqual(m.held["example.test"].not_after, T0 + 15 * DAY)
        self.clock.advance(6 * DAY)
        self.assertEqual(len(self.issuer.calls), 3)            # re-armed from the new certificate

    def test_restart_uses_stored_certificates(self):
        key, chain = make_cert("example.test", T0 - DAY, T0 + 89 * DAY)
        self.store.save("example.test", key, chain)
        key, chain = make_cert("t.example.test", T0 - DAY, T0 + 89 * DAY)
        self.store.save("t.example.test", key, chain)
        m = self.manager()
        self.assertEqual(self.issuer.calls, [])
        self.assertTrue(m.selector.has("t.example.test"))
        m.login("t")                                   # has a valid certificate: no order
        self.assertEqual(self.issuer.calls, [])
        self.assertEqual([r["state"] for r in acme_status(m)["certificates"]], ["valid", "valid"])

    def test_stored_certificate_with_a_wrong_key_is_ordered_anew(self):
        key, _ = make_cert("example.test", T0 - DAY, T0 + 89 * DAY)
        _, chain = make_cert("example.test", T0 - DAY, T0 + 89 * DAY)
        self.store.save("example.test", key, chain)
        m = self.manager()
        self.assertEqual(self.issuer.calls, ["example.test"])
        self.assertEqual(len(self.messages("cannot use the certificate for example.test")), 1)
        self.issuer.complete("example.test", T0, T0 + 90 * DAY)
        self.assertTrue(m.selector.has("example.test"))

    def test_stored_expired_certificate_is_renewed_at_once(self):
        key, chain = make_cert("example.test", T0 - 90 * DAY, T0 - DAY)
        self.store.save("example.test", key, chain)
        self.manager()
        self.assertEqual(self.issuer.calls, ["example.test"])

    def test_results_after_stop_are_ignored(self):
        m = self.manager()
        m.stopService()
        self.assertTrue(self.issuer.cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.issuer.complete("example.test", T0, T0 + 90 * DAY)   # saved by the thread, not installed
        self.assertEqual(m.held, {})

    def test_metrics_and_status(self):
        m = self.manager()
        self.issuer.complete("example.test", T0, T0 + 90 * DAY)
        m.login("t")
        self.issuer.fail("t.example.test", AcmeFailure("ca_error", "urn:ietf:params:acme:error:malformed"))
        from prometheus_client.exposition import generate_latest

        text = generate_latest(registry_for(acme_collector(m))).decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        self.assertEqual(samples[("pipegate_acme_certificates", ())], 1)
        self.assertEqual(samples[("pipegate_acme_certificate_expiry_days", (("name", "example.test"),))], 90)
        self.assertEqual(samples[("pipegate_acme_orders_total", ())], 2)
        self.assertEqual(samples[("pipegate_acme_failures_total", (("kind", "ca_error"),))], 1)
        rows = acme_status(m)["certificates"]
        self.assertEqual(rows[0], {"name": "example.test", "expires": "2027-04-15T08:00:00+00:00",
                                   "days_left": 90.0, "state": "valid"})
        self.assertEqual(rows[1]["name"], "t.example.test")
        self.assertEqual(rows[1]["expires"], None)
        self.assertEqual(rows[1]["state"], "retrying (1 failure(s))")


# -- the state directory


class Store(unittest.TestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.store = CertStore(self.path)

    def test_modes_whatever_the_umask(self):
        old = os.umask(0o000)
        try:
            self.store.prepare()
            self.store.account_key()
            key, chain = make_cert("a.test", T0, T0 + DAY)
            self.store.save("a.test", key, chain)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.store.certs).st_mode), 0o700)
        for name in ("account.key", "certs/a.test.pem"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.path, name)).st_mode), 0o600)

    def test_prepare_tightens_an_open_directory_and_refuses_a_file(self):
        os.makedirs(self.path, mode=0o755)
        os.chmod(self.path, 0o755)
        self.store.prepare()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o700)
        with open(self.path + "-file", "w"):
            pass
        with self.assertRaises(certstore.StoreError):
            CertStore(self.path + "-file").prepare()

    def test_round_trip_and_account(self):
        self.store.prepare()
        key, chain = make_cert("a.test", T0, T0 + DAY)
        saved = self.store.save("a.test", key, chain)
        self.assertEqual(self.store.load("a.test"), saved)
        self.assertEqual(saved, StoredCertificate("a.test", key.rstrip(b"\n") + b"\n", chain, T0, T0 + DAY))
        self.assertEqual(self.store.load_all(), [saved])
        first = self.store.account_key()
        self.assertEqual(self.store.account_key().private_numbers(), first.private_numbers())
        self.store.save_account_uri("https://ca/dir", "https://ca/acct/1")
        self.assertEqual(self.store.account_uri("https://ca/dir"), "https://ca/acct/1")
        self.assertIsNone(self.store.account_uri("https://other/dir"))

    def test_failed_write_keeps_the_old_file(self):
        self.store.prepare()
        key, chain = make_cert("a.test", T0, T0 + DAY)
        self.store.save("a.test", key, chain)
        path = os.path.join(self.store.certs, "a.test.pem")
        with open(path, "rb") as f:
            before = f.read()
        real_fsync = os.fsync
        self.patch(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with self.assertRaises(OSError):
            self.store.save("a.test", *make_cert("a.test", T0, T0 + 2 * DAY))
        self.patch(os, "fsync", real_fsync)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(os.listdir(self.store.certs), ["a.test.pem"])   # no temporary left

    def test_crash_leftovers_are_removed(self):
        self.store.prepare()
        key, chain = make_cert("a.test", T0, T0 + DAY)
        self.store.save("a.test", key, chain)
        for leftover in ("account.key.tmp.123", "certs/a.test.pem.tmp.456"):
            with open(os.path.join(self.path, leftover), "wb") as f:
                f.write(b"half a key")
        CertStore(self.path).prepare()
        self.assertEqual(os.listdir(self.path), ["certs"])
        self.assertEqual(os.listdir(self.store.certs), ["a.test.pem"])

    def test_damaged_and_foreign_files_are_skipped(self):
        self.store.prepare()
        atomic_write(os.path.join(self.store.certs, "bad.test.pem"), b"garbage")
        atomic_write(os.path.join(self.store.certs, "..pem"), b"x")
        atomic_write(os.path.join(self.store.certs, "notes.txt"), b"x")
        self.assertEqual(self.store.load_all(), [])

    def test_names_that_are_not_host_names_are_refused(self):
        self.store.prepare()
        key, chain = make_cert("a.test", T0, T0 + DAY)
        for name in ("../escape", "a/b", "", "UPPER.test", "*.test", "a.test\n", "-a.test", "a" * 64 + ".test"):
            with self.assertRaises(ValueError):
                self.store.save(name, key, chain)


# -- SNI over in-memory TLS


def handshake(server: SSL.Connection, sni: bytes | None) -> SSL.Connection:
    """Run a TLS handshake between C{server} and a fresh client through memory BIOs."""
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    if sni is not None:
        client.set_tlsext_host_name(sni)
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                data = a.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                b.bio_write(data)
    return client


def peer_name(client: SSL.Connection) -> str:
    cert = client.get_peer_certificate(as_cryptography=True)
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


class SNI(unittest.TestCase):
    def setUp(self):
        self.selector = SNISelector("example.test")
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def connect(self, sni: bytes | None) -> SSL.Connection:
        return handshake(self.selector.serverConnectionForTLS(None), sni)

    def test_chosen_by_name_with_chain(self):
        self.selector.install("a.example.test", *make_cert("a.example.test", T0, T0 + DAY))
        self.selector.install("example.test", *make_cert("example.test", T0, T0 + DAY))
        client = self.connect(b"A.Example.Test.")
        self.assertEqual(peer_name(client), "a.example.test")
        self.assertEqual(len(client.get_peer_cert_chain()), 2)        # leaf and issuer
        self.assertEqual(peer_name(self.connect(None)), "example.test")  # no SNI: the domain

    def test_fallback_logged_once_per_name_and_bounded(self):
        first = self.connect(b"nobody.example.test")
        self.assertEqual(peer_name(first), "example.test")   # the self-signed fallback
        self.assertEqual(first.get_peer_certificate(as_cryptography=True).issuer,
                         first.get_peer_certificate(as_cryptography=True).subject)
        self.connect(b"nobody.example.test")
        self.assertEqual(len([e for e in self.log if e.get("name") == "nobody.example.test"]), 1)
        for i in range(MAX_LOGGED_NAMES + 10):
            self.selector._servername(_Named(f"n{i}.example.test".encode()))
        self.assertEqual(len(self.selector._logged), MAX_LOGGED_NAMES)

    def test_swap_reaches_new_handshakes_only(self):
        self.selector.install("example.test", *make_cert("example.test", T0, T0 + DAY))
        old = self.connect(b"example.test")
        old_serial = old.get_peer_certificate(as_cryptography=True).serial_number
        self.selector.install("example.test", *make_cert("example.test", T0, T0 + 2 * DAY))
        new = self.connect(b"example.test")
        self.assertNotEqual(new.get_peer_certificate(as_cryptography=True).serial_number, old_serial)
        self.assertEqual(old.get_peer_certificate(as_cryptography=True).serial_number, old_serial)

    def test_mismatched_key_is_refused(self):
        key, _ = make_cert("example.test", T0, T0 + DAY)
        _, chain = make_cert("example.test", T0, T0 + DAY)
        with self.assertRaises(ValueError):
            self.selector.install("example.test", key, chain)
        self.assertFalse(self.selector.has("example.test"))


class _Named:
    def __init__(self, name: bytes) -> None:
        self.name = name

    def get_servername(self) -> bytes:
        return self.name


# -- options


class Options(unittest.TestCase):
    def parse(self, *args: str, env: dict | None = None):
        from pipegate.tap import server as tap

        options = tap.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": SECRET, **(env or {})}
        options.parseOptions(list(args))
        return options

    def error(self, *args: str, env: dict | None = None) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*args, env=env)
        return str(caught.exception)

    def test_off_by_default(self):
        options = self.parse()
        self.assertIsNone(options["acme-directory"])
        self.assertEqual(options["acme-state"], "/var/lib/pipegate/acme")
        self.assertEqual(options["acme-max-orders"], 2)

    def test_from_environment(self):
        state = os.path.abspath(self.mktemp())
        options = self.parse(env={
            "PIPEGATE_ACME_DIRECTORY": "https://acme.test/dir", "PIPEGATE_HTTPS": "tcp:8443",
            "PIPEGATE_DOMAIN": "example.test", "PIPEGATE_ACME_STATE": state,
            "PIPEGATE_ACME_EMAIL": "ops@example.test", "PIPEGATE_HTTPS_REDIRECT": "true",
            "PIPEGATE_ACME_MAX_ORDERS": "4"})
        self.assertEqual((options["https"], options["acme-max-orders"], options["https-redirect"]),
                         ("tcp:8443", 4, 1))
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o700)
        options = self.parse("--acme-max-orders", "1", env={"PIPEGATE_ACME_MAX_ORDERS": "4"})
        self.assertEqual(options["acme-max-orders"], 1)   # the flag wins

    def test_errors_name_the_option(self):
        base = ["--acme-directory", "https://acme.test/dir", "--https", "tcp:8443", "--domain", "example.test",
                "--acme-state", os.path.abspath(self.mktemp())]
        self.assertEqual(self.error("--https", "tcp:8443"),
                         "--https: needs --acme-directory (the certificates come from ACME)")
        self.assertEqual(self.error("--https-redirect"), "--https-redirect: needs --https")
        self.assertIn("--acme-directory: needs --https", self.error("--acme-directory", "https://a/dir"))
        self.assertIn("--acme-directory: needs --domain",
                      self.error("--acme-directory", "https://a/dir", "--https", "tcp:8443"))
        self.assertIn("--acme-directory: 'ftp://a' is not", self.error(*base, "--acme-directory", "ftp://a"))
        self.assertIn("--https:", self.error(*base, "--https", "tcpp:1"))
        self.assertIn("--domain: 'a_b.test'", self.error(*base, "--domain", "a_b.test"))
        self.assertIn("--acme-ca-file: /nonexistent", self.error(*base, "--acme-ca-file", "/nonexistent"))
        self.assertIn("--acme-email:", self.error(*base, "--acme-email", "nobody"))
        self.assertIn("--acme-max-orders:", self.error(*base, "--acme-max-orders", "0"))
        blocker = os.path.abspath(self.mktemp())
        open(blocker, "w").close()
        self.assertIn("--acme-state:", self.error(*base, "--acme-state", blocker))

    def test_endpoint_port(self):
        self.assertEqual(endpoint_port("tcp:8443:interface=127.0.0.1"), 8443)
        self.assertEqual(endpoint_port("tcp:port=9443"), 9443)
        self.assertEqual(endpoint_port("haproxy:tcp:4443"), 4443)
        self.assertEqual(endpoint_port("systemd:domain=INET:index=0"), 443)
        self.assertEqual(endpoint_port("tcp:0"), 443)

    def test_lazy_issuer(self):
        from pipegate.http.acme import LazyIssuer

        made = []

        class Real:
            cancelled = False

            def issue(self, name):
                return f"cert for {name}"

            def cancel(self):
                self.cancelled = True

        lazy = LazyIssuer(lambda: made.append(Real()) or made[-1])
        self.assertEqual(made, [])
        self.assertEqual(lazy.issue("a.test"), "cert for a.test")
        self.assertEqual(lazy.issue("b.test"), "cert for b.test")
        self.assertEqual(len(made), 1)
        lazy.cancel()
        self.assertTrue(made[0].cancelled)
        cancelled_first = LazyIssuer(Real)
        cancelled_first.cancel()
        cancelled_first.issue("a.test")
        self.assertTrue(cancelled_first._issuer.cancelled)
