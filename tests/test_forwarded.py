"""The relay's reading of a trusted proxy's forwarding headers (pipegate.http.forwarded)."""

from __future__ import annotations

from twisted.trial import unittest

from pipegate.http.forwarded import NOBODY, parse_trusted_proxies

PROXIES = parse_trusted_proxies("10.0.0.0/8, 192.0.2.1,2001:db8::/32")


class Parse(unittest.TestCase):
    def test_addresses_and_networks(self):
        trusted = parse_trusted_proxies("127.0.0.1,10.0.0.0/8, ::1 ,fd00::/8")
        self.assertEqual([str(n) for n in trusted.networks],
                         ["127.0.0.1/32", "10.0.0.0/8", "::1/128", "fd00::/8"])

    def test_empty_trusts_nobody(self):
        for text in ("", " ", ",,"):
            self.assertFalse(parse_trusted_proxies(text))
        self.assertFalse(NOBODY)

    def test_bad_entries_are_named(self):
        for text, bad in (("10.0.0.0/8,proxy.example", "'proxy.example'"), ("*", "'*'"),
                          ("10.0.0.0/33", "'10.0.0.0/33'"), ("1.2.3.4:80", "'1.2.3.4:80'")):
            with self.assertRaises(ValueError) as caught:
                parse_trusted_proxies(text)
            self.assertIn(bad, str(caught.exception))

    def test_ipv4_mapped_proxy_is_its_ipv4_address(self):
        trusted = parse_trusted_proxies("::ffff:192.0.2.9")
        self.assertEqual(trusted.caller("192.0.2.9", [b"198.51.100.4"]), "198.51.100.4")


class Caller(unittest.TestCase):
    def test_untrusted_peer_is_the_caller_whatever_it_claims(self):
        self.assertEqual(PROXIES.caller("198.51.100.4", [b"203.0.113.7"]), "198.51.100.4")
        self.assertEqual(NOBODY.caller("10.1.2.3", [b"203.0.113.7"]), "10.1.2.3")

    def test_trusted_peer_names_the_caller(self):
        self.assertEqual(PROXIES.caller("10.1.2.3", [b"203.0.113.7"]), "203.0.113.7")
        self.assertEqual(PROXIES.caller("2001:db8::5", [b"2001:db9::1"]), "2001:db9::1")

    def test_rightmost_untrusted_entry_wins_over_the_callers_own_claims(self):
        # The caller sent "X-Forwarded-For: 192.0.2.200"; the proxy appended the real address.
        self.assertEqual(PROXIES.caller("10.1.2.3", [b"192.0.2.200, 203.0.113.7"]), "203.0.113.7")
        # Two trusted proxies: the inner one appended the outer one's address.
        self.assertEqual(PROXIES.caller("10.1.2.3", [b"1.1.1.1, 203.0.113.7, 10.9.9.9"]), "203.0.113.7")
        # Several header lines are one list, in order.
        self.assertEqual(PROXIES.caller("10.1.2.3", [b"1.1.1.1", b"203.0.113.7", b"192.0.2.1"]),
                         "203.0.113.7")

    def test_no_header_or_only_proxies(self):
        self.assertEqual(PROXIES.caller("10.1.2.3", []), "10.1.2.3")
        self.assertEqual(PROXIES.caller("10.1.2.3", [b"10.5.5.5, 192.0.2.1"]), "10.5.5.5")

    def test_garbage_stops_the_walk_at_the_last_trusted_hop(self):
        for value in (b"unknown", b"203.0.113.7:5000", b"", b"\xff", b"_hidden"):
            self.assertEqual(PROXIES.caller("10.1.2.3", [b"203.0.113.9, " + value]), "10.1.2.3")
        self.assertEqual(PROXIES.caller("10.1.2.3", [b"junk, 203.0.113.7, 10.7.7.7"]), "203.0.113.7")
        self.assertEqual(PROXIES.caller("10.1.2.3", [b"203.0.113.7, junk, 10.7.7.7"]), "10.7.7.7")

    def test_addresses_come_out_normalized(self):
        self.assertEqual(PROXIES.caller("10.1.2.3", [b" ::ffff:203.0.113.7 "]), "203.0.113.7")
        self.assertEqual(PROXIES.caller("::ffff:10.1.2.3", [b"2001:DB9:0::1"]), "2001:db9::1")


class Scheme(unittest.TestCase):
    def test_trusted_peer_sets_the_scheme(self):
        self.assertEqual(PROXIES.scheme("10.1.2.3", b"http", [b"https"]), b"https")
        self.assertEqual(PROXIES.scheme("10.1.2.3", b"https", [b"HTTP"]), b"http")

    def test_last_value_is_the_nearest_proxys(self):
        self.assertEqual(PROXIES.scheme("10.1.2.3", b"http", [b"http, https"]), b"https")
        self.assertEqual(PROXIES.scheme("10.1.2.3", b"http", [b"https", b"http"]), b"http")

    def test_untrusted_missing_or_odd_values_keep_what_the_relay_saw(self):
        self.assertEqual(PROXIES.scheme("198.51.100.4", b"http", [b"https"]), b"http")
        self.assertEqual(PROXIES.scheme("10.1.2.3", b"http", []), b"http")
        self.assertEqual(PROXIES.scheme("10.1.2.3", b"https", [b"gopher"]), b"https")
        self.assertEqual(PROXIES.scheme("", b"http", [b"https"]), b"http")  # unix: listener
