"""
Unit tests for the visitor policy (L{pipegate.http.visitors}), the ownership rule
(L{pipegate.http.ownership}) and the revocation list (L{pipegate.http.revocation}).
"""

from __future__ import annotations

import base64
import ipaddress
import os

from twisted.internet import task
from twisted.trial import unittest

from pipegate.http import visitors
from pipegate.http.ownership import Holder, join_refusal
from pipegate.http.revocation import Revocations, RevocationWatcher, parse_revocations
from pipegate.http.visitors import (
    EMPTY, VisitorGate, VisitorPolicy, VisitorPolicyError, basic_credentials, hash_password,
)


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class Policy(unittest.TestCase):
    def test_hash_is_salted_by_tunnel_and_user_and_deterministic(self):
        self.assertEqual(hash_password("app", "ann", "pw"), hash_password("APP", "ann", "pw"))
        self.assertNotEqual(hash_password("app", "ann", "pw"), hash_password("other", "ann", "pw"))
        self.assertNotEqual(hash_password("app", "ann", "pw"), hash_password("app", "bob", "pw"))
        self.assertEqual(len(hash_password("app", "ann", "pw")), 32)

    def test_wire_round_trip_never_holds_the_password(self):
        policy = VisitorPolicy.from_options("app", ["ann:s3cret-pw", "bob:x"], ["10.0.0.0/8", "::1"],
                                            ["10.1.2.3"])
        text = policy.encode()
        self.assertNotIn("s3cret", text)
        self.assertEqual(VisitorPolicy.decode(text), policy)
        self.assertEqual(VisitorPolicy.decode(None), EMPTY)
        self.assertEqual(VisitorPolicy.decode(""), EMPTY)
        self.assertTrue(EMPTY.empty)

    def test_equal_whatever_the_order(self):
        a = VisitorPolicy.from_options("app", ["ann:1", "bob:2"], ["10.0.0.1", "10.0.0.0/8"])
        b = VisitorPolicy.from_options("app", ["bob:2", "ann:1"], ["10.0.0.0/8", "10.0.0.1/32"])
        self.assertEqual(a, b)
        self.assertNotEqual(a, VisitorPolicy.from_options("app", ["ann:1", "bob:3"], ["10.0.0.0/8", "10.0.0.1"]))

    def test_malformed_wire_is_refused(self):
        for text in ["{", "[]", '{"x":1}', '{"basic":"ann"}', '{"basic":[["ann","zz"]]}',
                     '{"basic":[["ann","00"]]}', '{"allow":["300.1.1.1"]}', '{"allow":[1]}',
                     '{"basic":[["a:b","' + "00" * 32 + '"]]}',
                     '{"basic":[["ann","' + "00" * 32 + '"],["ann","' + "11" * 32 + '"]]}',
                     "x" * (visitors.MAX_HEADER + 1), "[" * 10000, '{"basic":' + "[" * 5000 + "]" * 5000 + "}"]:
            with self.assertRaises(VisitorPolicyError, msg=text[:60]):
                VisitorPolicy.decode(text)

    def test_bad_options(self):
        for creds in (["ann"], [":pw"], ["ann:"]):
            with self.assertRaises(VisitorPolicyError):
                VisitorPolicy.from_options("app", creds)
        with self.assertRaises(VisitorPolicyError) as e:
            VisitorPolicy.from_options("app", ["ann:pw-secret", "ann:other"])
        self.assertNotIn("pw-secret", str(e.exception))
        with self.assertRaises(VisitorPolicyError):
            VisitorPolicy.from_options("app", allow=["10.0.0.0/33"])

    def test_ip_rules_v4_v6_and_deny_wins(self):
        policy = VisitorPolicy.from_options("app", allow=["127.0.0.0/8", "2001:db8::/32"],
                                            deny=["127.0.0.2", "2001:db8::bad"])
        self.assertTrue(policy.ip_allowed("127.0.0.1"))
        self.assertFalse(policy.ip_allowed("127.0.0.2"))
        self.assertFalse(policy.ip_allowed("10.0.0.1"))
        self.assertTrue(policy.ip_allowed("2001:db8::1"))
        self.assertFalse(policy.ip_allowed("2001:db8::bad"))
        self.assertTrue(policy.ip_allowed("::ffff:127.0.0.1"))   # v4-mapped counts as v4
        self.assertFalse(policy.ip_allowed(""))                   # unix socket peer
        deny_only = VisitorPolicy.from_options("app", deny=["127.0.0.2"])
        self.assertTrue(deny_only.ip_allowed("127.0.0.1"))
        self.assertFalse(deny_only.ip_allowed("127.0.0.2"))
        self.assertTrue(EMPTY.ip_allowed(""))


class Gate(unittest.TestCase):
    def setUp(self):
        self.gate = VisitorGate("app", VisitorPolicy.from_options(
            "app", ["ann:pw", "bob:secret"], allow=["127.0.0.1", "::1"]))

    def test_ip_before_credentials(self):
        self.assertEqual(self.gate.check("127.0.0.2", basic("ann", "pw")).outcome, "ip_denied")

    def test_credentials(self):
        self.assertEqual(self.gate.check("127.0.0.1", None).outcome, "no_credentials")
        self.assertEqual(self.gate.check("127.0.0.1", basic("ann", "wrong")).outcome, "bad_credentials")
        self.assertEqual(self.gate.check("127.0.0.1", basic("eve", "pw")).outcome, "bad_credentials")
        self.assertEqual(self.gate.check("127.0.0.1", basic("bob", "pw")).outcome, "bad_credentials")
        self.assertEqual(self.gate.check("127.0.0.1", b"Bearer abc").outcome, "bad_credentials")
        self.assertEqual(self.gate.check("127.0.0.1", b"Basic !!!").outcome, "bad_credentials")
        verdict = self.gate.check("::1", basic("bob", "secret"))
        self.assertEqual((verdict.allowed, verdict.user), (True, "bob"))

    def test_cache_is_bounded_and_keeps_answers(self):
        for i in range(VisitorGate.CACHE + 10):
            # Trailing blanks make distinct header values (distinct cache keys) for the same credentials.
            self.assertTrue(self.gate.check("127.0.0.1", basic("ann", "pw") + b" " * i).allowed)
        self.assertLessEqual(len(self.gate._good), VisitorGate.CACHE)
        self.assertTrue(self.gate.check("127.0.0.1", basic("ann", "pw")).allowed)
        self.assertFalse(self.gate.check("127.0.0.1", basic("ann", "pwx")).allowed)

    def test_basic_credentials_parser(self):
        self.assertEqual(basic_credentials(basic("a", "b:c")), ("a", "b:c"))
        self.assertEqual(basic_credentials(b"basic " + base64.b64encode(b"a:")), ("a", ""))
        self.assertIsNone(basic_credentials(b"Basic " + base64.b64encode(b"nocolon")))
        self.assertIsNone(basic_credentials(b"Basic " + base64.b64encode(b"\xff:x")))
        self.assertIsNone(basic_credentials(None))

    def test_ip_only_policy_admits_without_credentials(self):
        gate = VisitorGate("app", VisitorPolicy.from_options("app", deny=["127.0.0.2"]))
        self.assertTrue(gate.check("127.0.0.1", None).allowed)


class Ownership(unittest.TestCase):
    p1 = VisitorPolicy.from_options("app", ["ann:pw"])

    def test_first_connector_always_joins(self):
        self.assertIsNone(join_refusal([], Holder("a", False, EMPTY)))

    def test_same_jti_joins(self):
        self.assertIsNone(join_refusal([Holder("a", False, EMPTY)], Holder("a", False, EMPTY)))

    def test_other_token_is_refused_unless_both_shared(self):
        self.assertIn("another token", join_refusal([Holder("a", False, EMPTY)], Holder("b", False, EMPTY)))
        self.assertIn("not shared", join_refusal([Holder("a", False, EMPTY)], Holder("b", True, EMPTY)))
        self.assertIsNotNone(join_refusal([Holder("a", True, EMPTY)], Holder("b", False, EMPTY)))
        self.assertIsNone(join_refusal([Holder("a", True, EMPTY), Holder("c", True, EMPTY)],
                                       Holder("b", True, EMPTY)))
        self.assertIsNotNone(join_refusal([Holder("a", True, EMPTY), Holder("c", False, EMPTY)],
                                          Holder("b", True, EMPTY)))

    def test_tokens_without_jti_never_match(self):
        self.assertIsNotNone(join_refusal([Holder(None, False, EMPTY)], Holder(None, False, EMPTY)))

    def test_policy_must_match(self):
        self.assertIn("visitor policy", join_refusal([Holder("a", False, self.p1)], Holder("a", False, EMPTY)))
        self.assertIn("visitor policy", join_refusal([Holder("a", True, EMPTY)], Holder("b", True, self.p1)))
        same = VisitorPolicy.from_options("app", ["ann:pw"])
        self.assertIsNone(join_refusal([Holder("a", True, self.p1)], Holder("b", True, same)))

    def test_no_policy_and_an_empty_one_are_the_same(self):
        # The relay records a login without the header as None (visitors.py stays unloaded);
        # one that sends an empty policy must still join it, and a real policy is kept.
        self.assertIsNone(Holder("a", False, EMPTY).policy)
        self.assertIsNone(Holder("a", False, VisitorPolicy.decode("{}")).policy)
        self.assertEqual(Holder("a", False, self.p1).policy, self.p1)
        self.assertIsNone(join_refusal([Holder("a", False, None)], Holder("a", False, VisitorPolicy.decode(" "))))
        self.assertIn("visitor policy", join_refusal([Holder("a", False, None)], Holder("a", False, self.p1)))


class RevocationList(unittest.TestCase):
    def test_parse(self):
        text = "# revoked on 2026-12-01\nABCDEF0123\n\n  myapp   # the whole tunnel\nbad entry\nx\x00y\n" + \
               "a" * 200 + "\n"
        revocations, bad = parse_revocations(text)
        self.assertEqual(revocations.entries, frozenset({"abcdef0123", "myapp"}))
        self.assertEqual([n for n, _ in bad], [5, 6, 7])
        self.assertIn("more than one word", bad[0][1])

    def test_matching_is_case_insensitive(self):
        revocations = Revocations(frozenset({"abc", "myapp"}))
        self.assertTrue(revocations.revoked("ABC", "other"))
        self.assertTrue(revocations.revoked(None, "MyApp"))
        self.assertFalse(revocations.revoked("abd", "other"))
        self.assertFalse(revocations.revoked(None, "other"))


class Watcher(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.write("one\n")
        self.clock = task.Clock()
        self.seen = []
        self.watcher = RevocationWatcher(self.path, self.clock, self.seen.append)
        self.watcher.load()
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)
        # A distinct mtime even on a coarse file system clock.
        st = os.stat(self.path)
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9 * (1 + len(text))))

    def test_change_is_noticed_within_the_poll_interval(self):
        self.clock.advance(2.0)
        self.assertEqual(self.seen, [])          # unchanged: not re-read
        self.write("one\ntwo\n")
        self.clock.advance(2.0)
        self.assertEqual(self.seen[-1].entries, frozenset({"one", "two"}))
        self.assertLessEqual(self.watcher.interval, 5.0)

    def test_unreadable_file_keeps_the_last_list(self):
        os.unlink(self.path)
        self.clock.advance(2.0)
        self.clock.advance(2.0)
        self.assertEqual(self.seen, [])
        self.assertEqual(self.watcher.current.entries, frozenset({"one"}))
        self.write("three\n")
        self.clock.advance(2.0)
        self.assertEqual(self.seen[-1].entries, frozenset({"three"}))

    def test_reload_reads_even_when_unchanged(self):
        self.watcher.reload()
        self.assertEqual(len(self.seen), 1)

    def test_bad_utf8_keeps_the_last_list(self):
        with open(self.path, "wb") as f:
            f.write(b"\xff\xfe\n")
        self.watcher.reload()
        self.assertEqual(self.seen, [])
        self.assertEqual(self.watcher.current.entries, frozenset({"one"}))


class Networks(unittest.TestCase):
    def test_parse_network_accepts_hosts_and_v6(self):
        self.assertEqual(visitors.parse_network("10.1.2.3"), ipaddress.ip_network("10.1.2.3/32"))
        self.assertEqual(visitors.parse_network("10.1.2.3/8"), ipaddress.ip_network("10.0.0.0/8"))
        self.assertEqual(visitors.parse_network("2001:db8::/32").version, 6)


class HashBudget(unittest.TestCase):
    def test_guessing_is_throttled_per_tunnel_but_cached_credentials_pass(self):
        gate = VisitorGate("app", VisitorPolicy.from_options("app", ["ann:pw"]), hash_rate=2, hash_burst=3)
        self.assertTrue(gate.check("127.0.0.1", basic("ann", "pw"), now=100.0).allowed)
        outcomes = [gate.check("127.0.0.1", basic("ann", f"guess{i}"), now=100.0).outcome for i in range(4)]
        self.assertEqual(outcomes, ["bad_credentials", "bad_credentials", "throttled", "throttled"])
        # Cached good credentials need no hash; missing ones need none either.
        self.assertTrue(gate.check("127.0.0.1", basic("ann", "pw"), now=100.0).allowed)
        self.assertEqual(gate.check("127.0.0.1", None, now=100.0).outcome, "no_credentials")
        # The budget refills with time.
        self.assertEqual(gate.check("127.0.0.1", basic("ann", "guess"), now=101.0).outcome, "bad_credentials")
        other = VisitorGate("other", VisitorPolicy.from_options("other", ["ann:pw"]), hash_rate=2, hash_burst=3)
        self.assertTrue(other.check("127.0.0.1", basic("ann", "pw"), now=100.0).allowed)
