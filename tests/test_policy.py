"""
Tests for L{pipegate.core.policy} and L{pipegate.core.policydoc}: parsing, matching, precedence, merging, loading and the
C{/unlimited} grants (Hypergate's ingress policy with its tagged bugs fixed).  Pure: no
reactor, no sockets.
"""

from __future__ import annotations

import ipaddress
import json

from twisted.python.filepath import FilePath
from twisted.trial import unittest

from pipegate.core import policy as policy_module
from pipegate.core.policy import (
    DEFAULT_DIRECTION,
    EMPTY,
    GRANT_LABEL,
    BandwidthLimit,
    Decision,
    Grants,
    Policy,
    PolicyError,
    Rule,
    decide,
    grant_rule,
    normalize_ip,
)
from pipegate.core.policydoc import (
    MAX_POLICY_BYTES,
    load_policy,
    merge_documents,
    parse_policy,
    policy_from_bytes,
)

NOW = 1_700_000_000_000.0

# The README's minimal example: "203.0.113.10" is trusted (admitted, unlimited), not blocked.
README_EXAMPLE = {
    "defaults": {"allow": True, "bandwidthLimit": {"mbps": 10, "burstMbps": 50}},
    "ips": {
        "203.0.113.10": {"bandwidthLimit": None, "labels": ["trusted"]},
        "198.51.100.25": {"allow": False},
    },
}

# Hypergate's ingress.policy.example.json: the {from, to} range form.
EXAMPLE_FILE = {
    "defaults": {"allow": True, "bandwidthLimit": {"mbps": 10, "burstMbps": 50}},
    "ips": {
        "203.0.113.10": {"labels": ["trusted", "office"], "bandwidthLimit": {"mbps": 100, "burstMbps": 200}},
        "198.51.100.25": {"allow": False, "labels": ["blocked"]},
        "192.0.2.40": {
            "labels": ["vpn"],
            "onlyPorts": [{"from": 80, "to": 443}],
            "excludePorts": [{"from": 1194, "to": 1194}, {"from": 51820, "to": 51820}],
            "bandwidthLimit": {"mbps": 5, "burstMbps": 20},
        },
    },
}


def policy(doc: object) -> Policy:
    return parse_policy(doc, "policy.json")


def rule_of(fields: dict) -> Rule:
    return policy({"ips": {"*": fields}}).ips[0][1]


def defaults_of(fields: dict) -> Rule:
    result = policy({"defaults": fields}).defaults
    assert result is not None
    return result


def check(p: Policy | list, ip: str, port: int = 80, protocol: str = "tcp",
          now: float = NOW) -> Decision:
    return decide(p if isinstance(p, list) else [p], ip, port, protocol, now)


class ErrorAssertions:

    def assertPolicyError(self, doc: object, message: str) -> None:
        with self.assertRaises(PolicyError) as caught:  # type: ignore[attr-defined]
            policy(doc)
        self.assertEqual(str(caught.exception), message)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# Model


class BandwidthLimitTests(unittest.TestCase):

    def test_rate_and_burst(self) -> None:
        limit = BandwidthLimit(10, 50)
        self.assertEqual(limit.rate, 1_250_000)
        self.assertEqual(limit.burst, 6_250_000)
        self.assertEqual(BandwidthLimit(8).burst, 1_000_000)
        self.assertEqual(BandwidthLimit(8).direction, "both")

    def test_directions(self) -> None:
        self.assertEqual((BandwidthLimit(1).shapes_upload, BandwidthLimit(1).shapes_download), (True, True))
        upload = BandwidthLimit(1, direction="upload")
        self.assertEqual((upload.shapes_upload, upload.shapes_download), (True, False))
        download = BandwidthLimit(1, direction="download")
        self.assertEqual((download.shapes_upload, download.shapes_download), (False, True))

    def test_invalid(self) -> None:
        for args in [(0,), (-1,), (float("nan"),), (float("inf"),), (True,), ("8",), (8, 0), (8, -1)]:
            self.assertRaises(ValueError, BandwidthLimit, *args)
        self.assertRaises(ValueError, BandwidthLimit, 8, None, "sideways")

    def test_frozen(self) -> None:
        self.assertRaises(AttributeError, setattr, BandwidthLimit(1), "mbps", 2)
        self.assertEqual(len({BandwidthLimit(1), BandwidthLimit(1.0)}), 1)


class RuleTests(unittest.TestCase):

    def test_defaults(self) -> None:
        rule = Rule()
        self.assertEqual((rule.allow, rule.limit, rule.unlimited, rule.labels, rule.expire_at, rule.desc),
                         (None, None, False, (), None, ""))
        self.assertFalse(rule.says_bandwidth)
        self.assertFalse(rule.qualified)
        self.assertTrue(rule.applies(1, "tcp"))
        self.assertFalse(rule.expired(NOW))

    def test_converters(self) -> None:
        rule = Rule(labels=["a"], only_ports=[[1, 2]], only_protocols=["TCP"])
        self.assertEqual(rule.labels, ("a",))
        self.assertEqual(rule.only_ports, ((1, 2),))
        self.assertEqual(rule.only_protocols, frozenset({"tcp"}))
        self.assertTrue(rule.qualified)
        self.assertRaises(TypeError, Rule, labels="abc")

    def test_unlimited_with_limit_refused(self) -> None:
        self.assertRaises(ValueError, Rule, limit=BandwidthLimit(1), unlimited=True)

    def test_applies(self) -> None:
        rule = Rule(only_ports=((80, 80), (443, 450)), exclude_ports=((445, 445),),
                    only_protocols=frozenset({"tcp"}))
        self.assertTrue(rule.applies(80, "tcp"))
        self.assertTrue(rule.applies(443, "TCP"))
        self.assertTrue(rule.applies(450, "tcp"))
        self.assertFalse(rule.applies(445, "tcp"))
        self.assertFalse(rule.applies(81, "tcp"))
        self.assertFalse(rule.applies(80, "udp"))
        self.assertFalse(Rule(exclude_protocols=frozenset({"udp"})).applies(80, "UDP"))

    def test_expired_at_the_exact_moment(self) -> None:
        rule = Rule(expire_at=NOW)
        self.assertFalse(rule.expired(NOW - 1))
        self.assertFalse(rule.expired(NOW - 0.001))
        self.assertTrue(rule.expired(NOW))
        self.assertTrue(rule.expired(NOW + 1))


class NormalizeIpTests(unittest.TestCase):

    def test_plain(self) -> None:
        self.assertEqual(normalize_ip("10.1.2.3"), ipaddress.IPv4Address("10.1.2.3"))
        self.assertEqual(normalize_ip(" 2001:db8::1 "), ipaddress.IPv6Address("2001:db8::1"))

    def test_parsed_once_per_address(self) -> None:
        # Once per connection: the parse of an address seen before comes from a cache.
        before = policy_module._address.cache_info()
        first = normalize_ip("192.0.2.77")
        self.assertIs(normalize_ip(" 192.0.2.77"), first)
        after = policy_module._address.cache_info()
        self.assertEqual(after.hits - before.hits, 1)
        self.assertLessEqual(after.currsize, 1024)

    def test_zone_stripped(self) -> None:
        self.assertEqual(normalize_ip("fe80::1%eth0"), ipaddress.IPv6Address("fe80::1"))

    def test_mapped_ipv4(self) -> None:
        self.assertEqual(normalize_ip("::ffff:127.0.0.1"), ipaddress.IPv4Address("127.0.0.1"))
        self.assertEqual(normalize_ip("::FFFF:7f00:1"), ipaddress.IPv4Address("127.0.0.1"))

    def test_invalid(self) -> None:
        for text in ["", " ", "localhost", "1.2.3", "256.1.1.1", "::g", "10.0.0.0/8", "*"]:
            self.assertRaises(PolicyError, normalize_ip, text)
            self.assertRaises(PolicyError, normalize_ip, text)   # a refusal is not cached away
        with self.assertRaises(PolicyError) as caught:
            normalize_ip("nope")
        self.assertEqual(str(caught.exception), 'not an IP address: "nope"')


# ---------------------------------------------------------------------------
# Parsing


class ParseTopLevelTests(ErrorAssertions, unittest.TestCase):

    def test_empty(self) -> None:
        self.assertEqual(policy({}), EMPTY)
        self.assertEqual(policy({"defaults": None, "ips": None}), EMPTY)
        self.assertEqual(policy({"ips": {}}), EMPTY)
        self.assertTrue(EMPTY.empty)
        self.assertIs(Policy.EMPTY, EMPTY)  # type: ignore[attr-defined]

    def test_not_an_object(self) -> None:
        self.assertPolicyError([], "policy.json: must be a JSON object, got []")
        self.assertPolicyError(None, "policy.json: must be a JSON object, got null")
        self.assertPolicyError("x", 'policy.json: must be a JSON object, got "x"')

    def test_unknown_top_level_field(self) -> None:
        self.assertPolicyError({"ips": {}, "rules": {}},
                               'policy.json: unknown field "rules" (known: defaults, ips)')

    def test_ips_must_be_object(self) -> None:
        self.assertPolicyError({"ips": [{"*": {}}]},
                               'policy.json: ips: must be an object of pattern: rule, got [{"*": {}}]')

    def test_defaults_must_be_object(self) -> None:
        self.assertPolicyError({"defaults": True}, "policy.json: defaults: must be an object, got true")

    def test_rule_must_be_object(self) -> None:
        self.assertPolicyError({"ips": {"*": False}}, 'policy.json: ips["*"]: must be an object, got false')

    def test_unknown_rule_field(self) -> None:
        self.assertPolicyError(
            {"ips": {"10.0.0.0/8": {"alow": True}}},
            'policy.json: ips["10.0.0.0/8"]: unknown field "alow" (known: allow, bandwidthLimit, labels,'
            " expireAt, desc, onlyPorts, excludePorts, onlyProtocols, excludeProtocols)")
        self.assertRaises(PolicyError, policy, {"defaults": {"expire": 1}})

    def test_order_kept(self) -> None:
        parsed = policy({"ips": {"10.0.0.2": {}, "*": {}, "10.0.0.1": {}}})
        self.assertEqual([pattern for pattern, _ in parsed.ips], ["10.0.0.2", "*", "10.0.0.1"])

    def test_null_rule_is_dropped(self) -> None:
        # What a later source writes to delete an earlier source's rule.
        parsed = policy({"ips": {"10.0.0.1": None, "*": {"allow": False}}})
        self.assertEqual([pattern for pattern, _ in parsed.ips], ["*"])

    def test_source_label_is_one_line(self) -> None:
        with self.assertRaises(PolicyError) as caught:
            parse_policy({"x": 1}, "my\npolicy")
        self.assertTrue(str(caught.exception).startswith("my policy: "))

    def test_error_is_value_error(self) -> None:
        self.assertTrue(issubclass(PolicyError, ValueError))

    def test_long_values_shortened(self) -> None:
        with self.assertRaises(PolicyError) as caught:
            policy({"defaults": {"desc": ["x" * 200]}})
        self.assertLess(len(str(caught.exception)), 120)
        self.assertNotIn("\n", str(caught.exception))


class ParsePatternTests(ErrorAssertions, unittest.TestCase):

    def test_valid(self) -> None:
        for pattern in ["*", " * ", "10.0.0.1", "10.0.0.0/8", "10.1.2.3/8", "0.0.0.0/0", "2001:db8::1",
                        "2001:db8::/32", "::/0", "fe80::1%eth0", "fe80::%eth0/64", "::ffff:10.0.0.1",
                        "::ffff:10.0.0.0/104"]:
            self.assertEqual(len(policy({"ips": {pattern: {}}}).ips), 1, pattern)

    def test_invalid(self) -> None:
        for pattern in ["", " ", "**", "localhost", "10.0.0.0/33", "10.0.0.0/", "10.0.0.0/x", "/8",
                        "1.2.3", "::g", "2001:db8::/129", "10.0.0.0/-1", "10.0.0.0/8/8", "10.0.0.0/８"]:
            with self.assertRaises(PolicyError, msg=pattern) as caught:
                policy({"ips": {pattern: {}}})
            self.assertEqual(
                str(caught.exception),
                f'policy.json: ips[{json.dumps(pattern, ensure_ascii=False)}]: invalid pattern:'
                ' expected "*", an IP address or a CIDR')

    def test_invalid_even_with_null_rule(self) -> None:
        self.assertRaises(PolicyError, policy, {"ips": {"nope": None}})

    def test_policy_constructor_checks_patterns(self) -> None:
        self.assertRaises(PolicyError, Policy, ips=(("nope", Rule()),))
        self.assertEqual(Policy(ips=[["*", Rule()]]).ips, (("*", Rule()),))


class ParseRuleFieldTests(ErrorAssertions, unittest.TestCase):

    def test_allow(self) -> None:
        self.assertIs(rule_of({"allow": True}).allow, True)
        self.assertIs(rule_of({"allow": False}).allow, False)
        self.assertIsNone(rule_of({"allow": None}).allow)
        self.assertIsNone(rule_of({}).allow)
        self.assertPolicyError({"ips": {"*": {"allow": "yes"}}},
                               'policy.json: ips["*"]: allow: must be true or false, got "yes"')
        self.assertPolicyError({"defaults": {"allow": 1}},
                               "policy.json: defaults: allow: must be true or false, got 1")

    def test_labels(self) -> None:
        self.assertEqual(rule_of({"labels": ["lan", "office", "lan"]}).labels, ("lan", "office"))
        self.assertEqual(rule_of({"labels": []}).labels, ())
        self.assertEqual(rule_of({"labels": None}).labels, ())
        self.assertPolicyError({"ips": {"*": {"labels": "lan"}}},
                               'policy.json: ips["*"]: labels: expected a list of strings, got "lan"')
        self.assertPolicyError(
            {"ips": {"*": {"labels": ["ok", 1]}}},
            'policy.json: ips["*"]: labels[1]: must be a non-empty string without commas, got 1')
        self.assertRaises(PolicyError, rule_of, {"labels": [""]})
        self.assertRaises(PolicyError, rule_of, {"labels": ["a,b"]})

    def test_expire_at(self) -> None:
        self.assertEqual(rule_of({"expireAt": 1700000000000}).expire_at, 1700000000000)
        self.assertEqual(rule_of({"expireAt": 1.5}).expire_at, 1.5)
        self.assertIsNone(rule_of({"expireAt": None}).expire_at)
        self.assertEqual(defaults_of({"expireAt": 5}).expire_at, 5)
        self.assertPolicyError(
            {"ips": {"*": {"expireAt": "1700000000000"}}},
            'policy.json: ips["*"]: expireAt: must be a number (epoch milliseconds), got "1700000000000"')
        for bad in [True, float("nan"), float("inf"), [1]]:
            self.assertRaises(PolicyError, rule_of, {"expireAt": bad})

    def test_desc(self) -> None:
        self.assertEqual(rule_of({"desc": "office VPN"}).desc, "office VPN")
        self.assertEqual(rule_of({"desc": None}).desc, "")
        self.assertPolicyError({"ips": {"*": {"desc": 5}}},
                               'policy.json: ips["*"]: desc: must be a string, got 5')

    def test_protocols(self) -> None:
        self.assertEqual(rule_of({"onlyProtocols": ["TCP", "tcp"]}).only_protocols, frozenset({"tcp"}))
        self.assertEqual(rule_of({"excludeProtocols": ["Udp"]}).exclude_protocols, frozenset({"udp"}))
        self.assertEqual(rule_of({"excludeProtocols": []}).exclude_protocols, frozenset())
        self.assertIsNone(rule_of({"onlyProtocols": None}).only_protocols)
        self.assertPolicyError(
            {"ips": {"*": {"onlyProtocols": ["tcp", "sctp"]}}},
            'policy.json: ips["*"]: onlyProtocols[1]: must be "tcp" or "udp", got "sctp"')
        self.assertPolicyError(
            {"ips": {"*": {"onlyProtocols": "tcp"}}},
            'policy.json: ips["*"]: onlyProtocols: expected a non-empty list of "tcp" / "udp", got "tcp"')
        self.assertRaises(PolicyError, rule_of, {"onlyProtocols": []})
        self.assertRaises(PolicyError, rule_of, {"excludeProtocols": [0]})

    def test_qualifiers_refused_in_defaults(self) -> None:
        for name, value in [("onlyPorts", [1, 2]), ("excludePorts", [1, 2]), ("onlyProtocols", ["tcp"]),
                            ("excludeProtocols", ["udp"])]:
            self.assertPolicyError(
                {"defaults": {name: value}},
                f'policy.json: defaults: {name}: not allowed in defaults (use an ips rule with "*")')
        self.assertEqual(defaults_of({"onlyPorts": None}), Rule())


class ParsePortsTests(ErrorAssertions, unittest.TestCase):

    def test_min_max_form(self) -> None:
        self.assertEqual(rule_of({"onlyPorts": [80, 443]}).only_ports, ((80, 443),))
        self.assertEqual(rule_of({"excludePorts": [8080, 8080]}).exclude_ports, ((8080, 8080),))
        self.assertEqual(rule_of({"onlyPorts": [1, 65535]}).only_ports, ((1, 65535),))

    def test_from_to_form(self) -> None:
        # Hypergate's example file uses this form and Hypergate silently ignored it.
        rule = rule_of({"onlyPorts": [{"from": 80, "to": 443}],
                        "excludePorts": [{"from": 1194, "to": 1194}, {"to": 51820, "from": 51820}]})
        self.assertEqual(rule.only_ports, ((80, 443),))
        self.assertEqual(rule.exclude_ports, ((1194, 1194), (51820, 51820)))

    def test_null_means_unset(self) -> None:
        self.assertIsNone(rule_of({"onlyPorts": None}).only_ports)

    def test_min_max_errors(self) -> None:
        place = 'policy.json: ips["10.0.0.0/8"]: onlyPorts'
        forms = 'expected [min, max] or a list of {"from": min, "to": max}'
        cases = [
            ([80], f"{place}: {forms}, got [80]"),
            ([1, 2, 3], f"{place}: {forms}, got [1, 2, 3]"),
            ([], f"{place}: {forms}, got []"),
            ("80", f'{place}: {forms}, got "80"'),
            ({"from": 1, "to": 2}, f'{place}: {forms}, got {{"from": 1, "to": 2}}'),
            ([0, 10], f"{place}[0]: must be an integer 1-65535, got 0"),
            ([1, 65536], f"{place}[1]: must be an integer 1-65535, got 65536"),
            ([80.0, 90], f"{place}[0]: must be an integer 1-65535, got 80.0"),
            ([True, 2], f"{place}[0]: must be an integer 1-65535, got true"),
            ([443, 80], f"{place}: min 443 is greater than max 80"),
        ]
        for value, message in cases:
            self.assertPolicyError({"ips": {"10.0.0.0/8": {"onlyPorts": value}}}, message)

    def test_from_to_errors(self) -> None:
        place = 'policy.json: ips["*"]: excludePorts'
        cases = [
            ([{"from": 1}], f"{place}[0]: to: missing"),
            ([{"to": 1}], f"{place}[0]: from: missing"),
            ([{"from": 1, "to": 2, "step": 1}], f'{place}[0]: unknown field "step" (known: from, to)'),
            ([{"from": 9, "to": 2}], f"{place}[0]: from 9 is greater than to 2"),
            ([{"from": 1, "to": 2}, {"from": 0, "to": 2}], f"{place}[1]: from: must be an integer 1-65535, got 0"),
            ([{"from": 1, "to": 2}, 5], f'{place}[1]: expected [min, max] or a list of {{"from": min, "to": max}}'
                                        ", got 5"),
        ]
        for value, message in cases:
            self.assertPolicyError({"ips": {"*": {"excludePorts": value}}}, message)


class ParseBandwidthTests(ErrorAssertions, unittest.TestCase):

    def test_limit(self) -> None:
        rule = rule_of({"bandwidthLimit": {"mbps": 10, "burstMbps": 50}})
        self.assertEqual(rule.limit, BandwidthLimit(10, 50, DEFAULT_DIRECTION))
        self.assertFalse(rule.unlimited)
        self.assertTrue(rule.says_bandwidth)
        self.assertEqual(rule_of({"bandwidthLimit": {"mbps": 0.5}}).limit, BandwidthLimit(0.5, None, DEFAULT_DIRECTION))

    def test_default_direction_is_upload(self) -> None:
        # As in Hypergate: without "direction", only client -> provider bytes are shaped.
        self.assertEqual(DEFAULT_DIRECTION, "both")
        self.assertEqual(rule_of({"bandwidthLimit": {"mbps": 8, "direction": None}}).limit.direction, DEFAULT_DIRECTION)

    def test_direction(self) -> None:
        for written, parsed in [("both", "both"), ("upload", "upload"), ("Download", "download")]:
            limit = rule_of({"bandwidthLimit": {"mbps": 8, "direction": written}}).limit
            self.assertEqual(limit, BandwidthLimit(8, None, parsed))
        self.assertPolicyError(
            {"ips": {"*": {"bandwidthLimit": {"mbps": 8, "direction": "sideways"}}}},
            'policy.json: ips["*"]: bandwidthLimit: direction: must be "both", "upload" or "download",'
            ' got "sideways"')

    def test_null_is_unlimited(self) -> None:
        rule = rule_of({"bandwidthLimit": None})
        self.assertIsNone(rule.limit)
        self.assertTrue(rule.unlimited)
        self.assertTrue(rule.says_bandwidth)

    def test_zero_mbps_is_unlimited(self) -> None:
        rule = rule_of({"bandwidthLimit": {"mbps": 0, "burstMbps": 5}})
        self.assertIsNone(rule.limit)
        self.assertTrue(rule.unlimited)

    def test_absent_says_nothing(self) -> None:
        rule = rule_of({})
        self.assertIsNone(rule.limit)
        self.assertFalse(rule.unlimited)
        self.assertFalse(rule.says_bandwidth)

    def test_errors(self) -> None:
        place = "policy.json: defaults: bandwidthLimit"
        cases = [
            ({}, f"{place}: mbps: missing"),
            ({"burstMbps": 5}, f"{place}: mbps: missing"),
            ({"mbps": -1}, f"{place}: mbps: must be a finite number >= 0 (0 = unlimited), got -1"),
            ({"mbps": "8"}, f'{place}: mbps: must be a finite number >= 0 (0 = unlimited), got "8"'),
            ({"mbps": True}, f"{place}: mbps: must be a finite number >= 0 (0 = unlimited), got true"),
            ({"mbps": 8, "burstMbps": 0}, f"{place}: burstMbps: must be a finite number > 0, got 0"),
            ({"mbps": 8, "burstMbps": "x"}, f'{place}: burstMbps: must be a finite number > 0, got "x"'),
            ({"mbps": 8, "burst": 5},
             f'{place}: unknown field "burst" (known: mbps, burstMbps, direction)'),
            (8, f'{place}: must be an object {{"mbps": n, "burstMbps": n?, "direction": s?}} or null, got 8'),
        ]
        for value, message in cases:
            self.assertPolicyError({"defaults": {"bandwidthLimit": value}}, message)
        self.assertRaises(PolicyError, defaults_of, {"bandwidthLimit": {"mbps": float("nan")}})
        self.assertRaises(PolicyError, defaults_of, {"bandwidthLimit": {"mbps": float("inf")}})


# ---------------------------------------------------------------------------
# Matching and decisions


class MatchTests(unittest.TestCase):

    def matched(self, pattern: str, ip: str) -> bool:
        return check(policy({"ips": {pattern: {"labels": ["hit"]}}}), ip).matched == pattern

    def test_exact_ipv4(self) -> None:
        self.assertTrue(self.matched("10.0.0.1", "10.0.0.1"))
        self.assertFalse(self.matched("10.0.0.1", "10.0.0.2"))

    def test_cidr_ipv4(self) -> None:
        self.assertTrue(self.matched("10.0.0.0/8", "10.200.3.4"))
        self.assertFalse(self.matched("10.0.0.0/8", "11.0.0.1"))
        self.assertTrue(self.matched("10.1.2.3/8", "10.9.9.9"))  # host bits ignored, as in Hypergate

    def test_star(self) -> None:
        self.assertTrue(self.matched("*", "192.0.2.1"))
        self.assertTrue(self.matched("*", "2001:db8::1"))

    def test_ipv6(self) -> None:
        self.assertTrue(self.matched("2001:db8::1", "2001:DB8:0::1"))
        self.assertFalse(self.matched("2001:db8::1", "2001:db8::2"))
        self.assertTrue(self.matched("2001:db8::/32", "2001:db8:ffff::1"))
        self.assertFalse(self.matched("2001:db8::/32", "2001:db9::1"))

    def test_families_do_not_mix(self) -> None:
        self.assertFalse(self.matched("0.0.0.0/0", "::1"))
        self.assertFalse(self.matched("::/0", "127.0.0.1"))
        self.assertTrue(self.matched("::/0", "::1"))

    def test_mapped_client_matches_ipv4_rule(self) -> None:
        self.assertTrue(self.matched("127.0.0.1", "::ffff:127.0.0.1"))
        self.assertTrue(self.matched("127.0.0.0/8", "::ffff:127.1.2.3"))

    def test_mapped_pattern_matches_ipv4_client(self) -> None:
        self.assertTrue(self.matched("::ffff:127.0.0.1", "127.0.0.1"))
        self.assertTrue(self.matched("::ffff:10.0.0.0/104", "10.3.2.1"))

    def test_zone_stripped(self) -> None:
        self.assertTrue(self.matched("fe80::1", "fe80::1%eth0"))
        self.assertTrue(self.matched("fe80::1%eth1", "fe80::1"))
        self.assertTrue(self.matched("fe80::%eth0/64", "fe80::abcd%lo"))

    def test_invalid_client_ip(self) -> None:
        self.assertRaises(PolicyError, check, EMPTY, "")
        self.assertRaises(PolicyError, check, policy({"ips": {"*": {}}}), "not-an-ip")


class DecideTests(unittest.TestCase):

    def test_no_policies_allows(self) -> None:
        self.assertEqual(decide([], "192.0.2.1", 80, "tcp", NOW), Decision(allow=True))
        self.assertEqual(check(EMPTY, "192.0.2.1"), Decision(allow=True))
        self.assertEqual(decide([None, EMPTY], "192.0.2.1", 80, "tcp", NOW), Decision(allow=True))

    def test_deny(self) -> None:
        # Scenario 13.
        decision = check(policy({"ips": {"127.0.0.1": {"allow": False}}}), "127.0.0.1")
        self.assertFalse(decision.allow)
        self.assertEqual(decision.matched, "127.0.0.1")
        self.assertTrue(check(policy({"ips": {"127.0.0.1": {"allow": False}}}), "127.0.0.2").allow)

    def test_first_match_wins_in_written_order(self) -> None:
        # Scenario 14.
        lan_first = policy({"ips": {"127.0.0.0/8": {"allow": True, "labels": ["lan"]}, "*": {"allow": False}}})
        decision = check(lan_first, "127.0.0.1")
        self.assertEqual((decision.allow, decision.labels, decision.matched), (True, ("lan",), "127.0.0.0/8"))
        self.assertFalse(check(lan_first, "192.0.2.1").allow)
        star_first = policy({"ips": {"*": {"allow": False}, "127.0.0.0/8": {"allow": True, "labels": ["lan"]}}})
        decision = check(star_first, "127.0.0.1")
        self.assertEqual((decision.allow, decision.labels, decision.matched), (False, (), "*"))

    def test_only_ports(self) -> None:
        # Scenario 15: {allow:false, onlyPorts:[G1,G1]} denies G1 but not G2.
        p = policy({"ips": {"127.0.0.1": {"allow": False, "onlyPorts": [7001, 7001]}}})
        self.assertFalse(check(p, "127.0.0.1", 7001).allow)
        self.assertTrue(check(p, "127.0.0.1", 7002).allow)
        self.assertIsNone(check(p, "127.0.0.1", 7002).matched)

    def test_only_protocols(self) -> None:
        p = policy({"ips": {"*": {"allow": False, "onlyProtocols": ["udp"]}}})
        self.assertTrue(check(p, "127.0.0.1", 53, "tcp").allow)
        self.assertFalse(check(p, "127.0.0.1", 53, "udp").allow)
        self.assertFalse(check(p, "127.0.0.1", 53, "UDP").allow)

    def test_exclude_qualifiers(self) -> None:
        p = policy({"ips": {"*": {"labels": ["a"], "excludePorts": [8080, 9000], "excludeProtocols": ["udp"]}}})
        self.assertEqual(check(p, "10.0.0.1", 80).matched, "*")
        self.assertIsNone(check(p, "10.0.0.1", 8080).matched)
        self.assertIsNone(check(p, "10.0.0.1", 9000).matched)
        self.assertEqual(check(p, "10.0.0.1", 9001).matched, "*")
        self.assertIsNone(check(p, "10.0.0.1", 80, "udp").matched)

    def test_qualifier_skips_to_next_rule(self) -> None:
        p = policy({
            "defaults": {"labels": ["default"]},
            "ips": {
                "10.0.0.0/8": {"labels": ["web"], "onlyPorts": [{"from": 80, "to": 80}, {"from": 443, "to": 443}]},
                "10.0.0.1": {"labels": ["host"]},
            },
        })
        self.assertEqual(check(p, "10.0.0.1", 443).labels, ("web",))
        self.assertEqual(check(p, "10.0.0.1", 22).labels, ("host",))
        decision = check(p, "10.0.0.2", 22)
        self.assertEqual((decision.labels, decision.matched), (("default",), "defaults"))

    def test_expiry_at_the_exact_moment(self) -> None:
        # Scenario 15: an expiring rule stops applying at expireAt, with nothing reloaded.
        p = policy({"ips": {"127.0.0.1": {"allow": False, "expireAt": NOW + 3000}, "*": {"labels": ["rest"]}}})
        self.assertFalse(check(p, "127.0.0.1", now=NOW).allow)
        self.assertFalse(check(p, "127.0.0.1", now=NOW + 2999).allow)
        after = check(p, "127.0.0.1", now=NOW + 3000)
        self.assertEqual((after.allow, after.matched, after.labels), (True, "*", ("rest",)))

    def test_expired_defaults_skipped(self) -> None:
        p = policy({"defaults": {"allow": False, "expireAt": NOW}})
        self.assertFalse(check(p, "10.0.0.1", now=NOW - 1).allow)
        self.assertEqual(check(p, "10.0.0.1", now=NOW), Decision(allow=True))

    def test_future_rule_kept(self) -> None:
        p = policy({"ips": {"10.0.0.1": {"allow": False, "expireAt": NOW + 86_400_000}}})
        self.assertFalse(check(p, "10.0.0.1").allow)

    def test_defaults_decision(self) -> None:
        p = policy({"defaults": {"labels": ["anyone"], "bandwidthLimit": {"mbps": 1}, "desc": "d"}})
        decision = check(p, "198.51.100.1")
        self.assertEqual(decision.matched, "defaults")
        self.assertTrue(decision.allow)  # allow not written -> true
        self.assertEqual(decision.labels, ("anyone",))
        self.assertEqual(decision.limit, BandwidthLimit(1, None, DEFAULT_DIRECTION))
        self.assertIs(decision.rule, p.defaults)

    def test_deny_has_no_limit(self) -> None:
        p = policy({"defaults": {"bandwidthLimit": {"mbps": 1}},
                    "ips": {"*": {"allow": False, "labels": ["blocked"], "bandwidthLimit": {"mbps": 2}}}})
        decision = check(p, "10.0.0.1")
        self.assertEqual((decision.allow, decision.limit, decision.labels), (False, None, ("blocked",)))


class InheritanceTests(unittest.TestCase):

    def test_allow_inherits_defaults(self) -> None:
        self.assertTrue(check(policy({"ips": {"*": {}}}), "10.0.0.1").allow)
        self.assertTrue(check(policy({"defaults": {}, "ips": {"*": {}}}), "10.0.0.1").allow)
        self.assertTrue(check(policy({"defaults": {"allow": True}, "ips": {"*": {}}}), "10.0.0.1").allow)
        denied = policy({"defaults": {"allow": False}, "ips": {"10.0.0.1": {"labels": ["x"]}}})
        self.assertFalse(check(denied, "10.0.0.1").allow)
        self.assertFalse(check(denied, "10.0.0.2").allow)
        self.assertTrue(check(policy({"defaults": {"allow": False}, "ips": {"*": {"allow": True}}}),
                              "10.0.0.1").allow)

    def test_allow_not_inherited_from_expired_defaults(self) -> None:
        p = policy({"defaults": {"allow": False, "expireAt": NOW}, "ips": {"*": {}}})
        self.assertFalse(check(p, "10.0.0.1", now=NOW - 1).allow)
        self.assertTrue(check(p, "10.0.0.1", now=NOW).allow)

    def test_limit_inherits_defaults(self) -> None:
        p = policy({
            "defaults": {"bandwidthLimit": {"mbps": 10, "burstMbps": 50}},
            "ips": {
                "10.0.0.1": {"labels": ["silent"]},
                "10.0.0.2": {"bandwidthLimit": None},
                "10.0.0.3": {"bandwidthLimit": {"mbps": 0}},
                "10.0.0.4": {"bandwidthLimit": {"mbps": 100, "direction": "both"}},
            },
        })
        default = BandwidthLimit(10, 50, DEFAULT_DIRECTION)
        self.assertEqual(check(p, "10.0.0.1").limit, default)
        self.assertIsNone(check(p, "10.0.0.2").limit)
        self.assertIsNone(check(p, "10.0.0.3").limit)
        self.assertEqual(check(p, "10.0.0.4").limit, BandwidthLimit(100, None, "both"))
        self.assertEqual(check(p, "10.0.0.5").limit, default)

    def test_unlimited_defaults(self) -> None:
        p = policy({"defaults": {"bandwidthLimit": None}, "ips": {"*": {}}})
        self.assertIsNone(check(p, "10.0.0.1").limit)

    def test_limit_not_inherited_from_expired_defaults(self) -> None:
        p = policy({"defaults": {"bandwidthLimit": {"mbps": 1}, "expireAt": NOW}, "ips": {"*": {}}})
        self.assertEqual(check(p, "10.0.0.1", now=NOW - 1).limit, BandwidthLimit(1, None, DEFAULT_DIRECTION))
        self.assertIsNone(check(p, "10.0.0.1", now=NOW).limit)

    def test_labels_not_inherited(self) -> None:
        p = policy({"defaults": {"labels": ["d"]}, "ips": {"*": {"labels": ["r"]}, }})
        self.assertEqual(check(p, "10.0.0.1").labels, ("r",))
        self.assertEqual(check(policy({"defaults": {"labels": ["d"]}, "ips": {"*": {}}}), "10.0.0.1").labels, ())

    def test_readme_example(self) -> None:
        p = policy(README_EXAMPLE)
        trusted = check(p, "203.0.113.10")
        self.assertEqual((trusted.allow, trusted.limit, trusted.labels, trusted.matched),
                         (True, None, ("trusted",), "203.0.113.10"))
        self.assertFalse(check(p, "198.51.100.25").allow)
        other = check(p, "192.0.2.1")
        self.assertEqual((other.allow, other.limit, other.matched),
                         (True, BandwidthLimit(10, 50, DEFAULT_DIRECTION), "defaults"))
        self.assertEqual(other.limit.rate, 1_250_000)
        self.assertEqual(other.limit.burst, 6_250_000)

    def test_example_file(self) -> None:
        p = policy(EXAMPLE_FILE)
        office = check(p, "203.0.113.10")
        self.assertEqual((office.allow, office.labels, office.limit),
                         (True, ("trusted", "office"), BandwidthLimit(100, 200, DEFAULT_DIRECTION)))
        blocked = check(p, "198.51.100.25")
        self.assertEqual((blocked.allow, blocked.labels), (False, ("blocked",)))
        vpn = check(p, "192.0.2.40", 443)
        self.assertEqual((vpn.allow, vpn.labels, vpn.limit), (True, ("vpn",), BandwidthLimit(5, 20, DEFAULT_DIRECTION)))
        self.assertEqual(check(p, "192.0.2.40", 8080).matched, "defaults")
        self.assertEqual(check(p, "192.0.2.40", 1194).matched, "defaults")


class PrecedenceTests(unittest.TestCase):

    operator = policy({
        "defaults": {"allow": True, "labels": ["operator-default"], "bandwidthLimit": {"mbps": 50}},
        "ips": {"198.51.100.0/24": {"allow": False, "labels": ["operator-block"]}},
    })
    provider = policy({
        "defaults": {"allow": False, "labels": ["provider-default"], "bandwidthLimit": {"mbps": 1}},
        "ips": {
            "198.51.100.7": {"allow": True, "labels": ["provider-vip"]},
            "192.0.2.0/24": {"labels": ["provider-lan"]},
        },
    })

    def test_operator_rules_before_provider_rules(self) -> None:
        decision = check([self.operator, self.provider], "198.51.100.7")
        self.assertEqual((decision.allow, decision.labels), (False, ("operator-block",)))
        decision = check([self.provider, self.operator], "198.51.100.7")
        self.assertEqual((decision.allow, decision.labels), (True, ("provider-vip",)))

    def test_any_rule_before_any_defaults(self) -> None:
        decision = check([self.operator, self.provider], "192.0.2.9")
        self.assertEqual(decision.labels, ("provider-lan",))
        self.assertEqual(decision.matched, "192.0.2.0/24")

    def test_inheritance_from_the_same_policy(self) -> None:
        # The provider's rule inherits the provider's defaults, not the operator's.
        decision = check([self.operator, self.provider], "192.0.2.9")
        self.assertFalse(decision.allow)
        lenient = policy({"defaults": {"allow": True, "bandwidthLimit": {"mbps": 1}},
                          "ips": {"192.0.2.0/24": {"labels": ["provider-lan"]}}})
        decision = check([self.operator, lenient], "192.0.2.9")
        self.assertEqual((decision.allow, decision.limit), (True, BandwidthLimit(1, None, DEFAULT_DIRECTION)))

    def test_first_live_defaults(self) -> None:
        decision = check([self.operator, self.provider], "203.0.113.1")
        self.assertEqual((decision.allow, decision.labels), (True, ("operator-default",)))
        expiring = policy({"defaults": {"allow": True, "labels": ["op"], "expireAt": NOW}})
        decision = check([expiring, self.provider], "203.0.113.1", now=NOW)
        self.assertEqual((decision.allow, decision.labels), (False, ("provider-default",)))

    def test_expired_rule_falls_through_to_next_policy(self) -> None:
        temporary = policy({"ips": {"198.51.100.7": {"allow": False, "expireAt": NOW}}})
        self.assertFalse(check([temporary, self.provider], "198.51.100.7", now=NOW - 1).allow)
        self.assertTrue(check([temporary, self.provider], "198.51.100.7", now=NOW).allow)


# ---------------------------------------------------------------------------
# /unlimited grants


class GrantTests(unittest.TestCase):

    def test_grant_rule(self) -> None:
        rule = grant_rule(NOW)
        self.assertEqual(rule, Rule(allow=True, unlimited=True, labels=(GRANT_LABEL,),
                                    desc="gateway-unlimited", expire_at=NOW + 1_800_000))
        self.assertEqual(grant_rule(NOW, 60).expire_at, NOW + 60_000)

    def test_grant_and_policy(self) -> None:
        grants = Grants()
        self.assertIs(grants.policy(NOW), EMPTY)   # (no Policy built per connection)
        self.assertEqual(grants.grant("127.0.0.1", NOW), NOW + 1_800_000)
        self.assertEqual(grants.policy(NOW).ips, (("127.0.0.1", grant_rule(NOW)),))
        self.assertIsNone(grants.policy(NOW).defaults)
        self.assertEqual(grants.expiry("::ffff:127.0.0.1", NOW), NOW + 1_800_000)
        self.assertIsNone(grants.expiry("127.0.0.2", NOW))

    def test_scenario_19_unshaped_and_labelled(self) -> None:
        provider = policy({"defaults": {"allow": True, "bandwidthLimit": {"mbps": 1}}})
        grants = Grants()
        before = check([grants.policy(NOW), EMPTY, provider], "127.0.0.1")
        self.assertEqual(before.limit, BandwidthLimit(1, None, DEFAULT_DIRECTION))
        grants.grant("127.0.0.1", NOW)
        after = check([grants.policy(NOW), EMPTY, provider], "127.0.0.1")
        self.assertEqual((after.allow, after.limit, after.labels, after.matched),
                         (True, None, ("gateway-unlimited",), "127.0.0.1"))

    def test_grants_beat_every_rule(self) -> None:
        # Hypergate merged grants after the provider policy, so a provider "*" rule won.
        operator = policy({"ips": {"10.0.0.0/8": {"allow": False}}})
        provider = policy({"ips": {"*": {"allow": True, "bandwidthLimit": {"mbps": 1}}}})
        grants = Grants()
        grants.grant("10.0.0.1", NOW)
        decision = check([grants.policy(NOW), operator, provider], "10.0.0.1")
        self.assertEqual((decision.allow, decision.limit, decision.labels), (True, None, (GRANT_LABEL,)))
        self.assertFalse(check([grants.policy(NOW), operator, provider], "10.0.0.2").allow)

    def test_expiry_restores_the_providers_own_rule(self) -> None:
        # Hypergate deep-merged a grant into the provider's rule for the same IP and deleted
        # the merged rule on expiry, hiding the provider's rule until a restart.
        provider = policy({"defaults": {"allow": False},
                           "ips": {"127.0.0.1": {"allow": True, "labels": ["vip"], "bandwidthLimit": {"mbps": 5}}}})
        grants = Grants()
        expire_at = grants.grant("127.0.0.1", NOW, 60)
        during = check([grants.policy(NOW + 59_999), provider], "127.0.0.1", now=NOW + 59_999)
        self.assertEqual((during.labels, during.limit), ((GRANT_LABEL,), None))
        after = check([grants.policy(expire_at), provider], "127.0.0.1", now=expire_at)
        self.assertEqual((after.allow, after.labels, after.limit),
                         (True, ("vip",), BandwidthLimit(5, None, DEFAULT_DIRECTION)))
        self.assertEqual(provider.ips[0][1].labels, ("vip",))

    def test_stale_policy_object_expires_by_itself(self) -> None:
        grants = Grants()
        grants.grant("127.0.0.1", NOW, 10)
        snapshot = grants.policy(NOW)
        self.assertEqual(check(snapshot, "127.0.0.1", now=NOW + 9_999).matched, "127.0.0.1")
        self.assertIsNone(check(snapshot, "127.0.0.1", now=NOW + 10_000).matched)

    def test_extend(self) -> None:
        grants = Grants()
        grants.grant("127.0.0.1", NOW)
        self.assertEqual(grants.grant("::ffff:127.0.0.1", NOW + 60_000), NOW + 60_000 + 1_800_000)
        self.assertEqual(len(grants), 1)
        # A shorter grant never shortens a longer one.
        self.assertEqual(grants.grant("127.0.0.1", NOW + 60_000, 1), NOW + 60_000 + 1_800_000)

    def test_expired_grants_dropped(self) -> None:
        grants = Grants()
        grants.grant("127.0.0.1", NOW, 1)
        grants.grant("2001:db8::1%eth0", NOW, 2)
        self.assertEqual([ip for ip, _ in grants.policy(NOW + 1000).ips], ["2001:db8::1"])
        self.assertEqual(len(grants), 1)
        self.assertIs(grants.policy(NOW + 2000), EMPTY)
        self.assertEqual(len(grants), 0)

    def test_invalid(self) -> None:
        grants = Grants()
        self.assertRaises(PolicyError, grants.grant, "nope", NOW)
        for duration in [0, -1, float("nan"), True]:
            self.assertRaises(PolicyError, grants.grant, "127.0.0.1", NOW, duration)
        self.assertEqual(len(grants), 0)


# ---------------------------------------------------------------------------
# Merging and loading


class MergeTests(unittest.TestCase):

    def test_nothing(self) -> None:
        self.assertEqual(merge_documents([]), {})
        self.assertEqual(merge_documents([{}]), {})

    def test_single_unchanged_and_copied(self) -> None:
        doc = {"defaults": {"allow": True, "labels": ["a"]}, "ips": {"*": {"allow": False}}}
        merged = merge_documents([doc])
        self.assertEqual(merged, doc)
        merged["defaults"]["allow"] = False
        merged["defaults"]["labels"].append("b")
        self.assertEqual(doc, {"defaults": {"allow": True, "labels": ["a"]}, "ips": {"*": {"allow": False}}})

    def test_two_merge(self) -> None:
        merged = merge_documents([{"defaults": {"allow": True}}, {"ips": {"*": {}}}])
        self.assertEqual(merged, {"defaults": {"allow": True}, "ips": {"*": {}}})

    def test_deep_merge(self) -> None:
        merged = merge_documents([
            {"defaults": {"allow": True, "bandwidthLimit": {"mbps": 10}}},
            {"defaults": {"bandwidthLimit": {"burstMbps": 50}}},
        ])
        self.assertEqual(merged, {"defaults": {"allow": True, "bandwidthLimit": {"mbps": 10, "burstMbps": 50}}})

    def test_later_scalar_and_array_replace(self) -> None:
        merged = merge_documents([
            {"ips": {"*": {"allow": True, "labels": ["a", "b"], "onlyPorts": [1, 2]}}},
            {"ips": {"*": {"allow": False, "labels": ["c"]}}},
        ])
        self.assertEqual(merged, {"ips": {"*": {"allow": False, "labels": ["c"], "onlyPorts": [1, 2]}}})

    def test_null_replaces(self) -> None:
        merged = merge_documents([
            {"defaults": {"bandwidthLimit": {"mbps": 10}}, "ips": {"10.0.0.1": {"allow": False}}},
            {"defaults": {"bandwidthLimit": None}, "ips": {"10.0.0.1": None}},
        ])
        self.assertEqual(merged, {"defaults": {"bandwidthLimit": None}, "ips": {"10.0.0.1": None}})
        parsed = policy(merged)
        self.assertTrue(parsed.defaults.unlimited)
        self.assertEqual(parsed.ips, ())

    def test_object_replaces_scalar_and_null(self) -> None:
        merged = merge_documents([
            {"defaults": {"bandwidthLimit": None}},
            {"defaults": {"bandwidthLimit": {"mbps": 1}}},
            {"ips": 5},
            {"ips": {"*": {}}},
        ])
        self.assertEqual(merged, {"defaults": {"bandwidthLimit": {"mbps": 1}}, "ips": {"*": {}}})

    def test_forbidden_keys_dropped_at_every_level(self) -> None:
        merged = merge_documents([
            json.loads('{"__proto__": {"polluted": true}, "prototype": 1, "constructor": {"x": 1},'
                       ' "defaults": {"__proto__": {"allow": false}, "allow": true,'
                       ' "bandwidthLimit": {"mbps": 1, "constructor": 2}},'
                       ' "ips": {"__proto__": {"allow": false}, "*": {"prototype": {}, "labels": ["a"]}}}'),
        ])
        self.assertEqual(merged, {"defaults": {"allow": True, "bandwidthLimit": {"mbps": 1}},
                                  "ips": {"*": {"labels": ["a"]}}})
        self.assertFalse(hasattr({}, "polluted"))
        self.assertTrue(check(policy(merged), "10.0.0.1").allow)

    def test_ips_order_is_first_appearance(self) -> None:
        merged = merge_documents([
            {"ips": {"10.0.0.1": {"labels": ["one"]}, "*": {"allow": False}}},
            {"ips": {"10.0.0.2": {}, "*": {"allow": True}, "10.0.0.1": {"labels": ["uno"]}}},
        ])
        self.assertEqual(list(merged["ips"]), ["10.0.0.1", "*", "10.0.0.2"])
        parsed = policy(merged)
        self.assertEqual(check(parsed, "10.0.0.1").labels, ("uno",))
        self.assertEqual(check(parsed, "10.0.0.2").matched, "*")

    def test_non_object_document(self) -> None:
        with self.assertRaises(PolicyError) as caught:
            merge_documents([{}, [1]])
        self.assertEqual(str(caught.exception), "document 1: expected a JSON object, got [1]")

    def test_too_deep(self) -> None:
        deep: dict = {}
        node = deep
        for _ in range(40):
            node["a"] = {}
            node = node["a"]
        self.assertRaises(PolicyError, merge_documents, [deep])


class LoadPolicyTests(unittest.TestCase):

    def write(self, content: object) -> str:
        path = FilePath(self.mktemp())
        path.setContent(content if isinstance(content, bytes) else json.dumps(content).encode("utf-8"))
        return path.path

    def assertLoadError(self, sources: list[str], message: str, fetch=None) -> None:
        with self.assertRaises(PolicyError) as caught:
            load_policy(sources, fetch)
        self.assertEqual(str(caught.exception), message)

    def test_no_sources(self) -> None:
        self.assertEqual(load_policy([]), (EMPTY, b""))

    def test_inline(self) -> None:
        loaded, data = load_policy(['  {"ips": {"127.0.0.1": {"allow": false}}}\n'])
        self.assertFalse(check(loaded, "127.0.0.1").allow)
        self.assertEqual(data, b'{"ips":{"127.0.0.1":{"allow":false}}}')

    def test_empty_object(self) -> None:
        self.assertEqual(load_policy(["{}"]), (EMPTY, b"{}"))

    def test_file(self) -> None:
        loaded, data = load_policy([self.write(README_EXAMPLE)])
        self.assertEqual(loaded, policy(README_EXAMPLE))
        self.assertEqual(json.loads(data), README_EXAMPLE)

    def test_file_plus_inline_merge(self) -> None:
        # Scenario 17: mbps from the file, burstMbps from the inline source.
        path = self.write({"defaults": {"allow": True, "bandwidthLimit": {"mbps": 8}}})
        loaded, data = load_policy([path, '{"defaults": {"bandwidthLimit": {"burstMbps": 16}}}'])
        self.assertEqual(loaded.defaults.limit, BandwidthLimit(8, 16, DEFAULT_DIRECTION))
        self.assertEqual(data, b'{"defaults":{"allow":true,"bandwidthLimit":{"mbps":8,"burstMbps":16}}}')

    def test_url(self) -> None:
        fetched = []

        def fetch(url: str) -> bytes:
            fetched.append(url)
            return b'{"defaults": {"allow": false}}'

        loaded, _ = load_policy(["http://127.0.0.1:9/policy.json"], fetch)
        self.assertEqual(fetched, ["http://127.0.0.1:9/policy.json"])
        self.assertFalse(check(loaded, "10.0.0.1").allow)

    def test_round_trip(self) -> None:
        loaded, data = load_policy([self.write(EXAMPLE_FILE), '{"ips": {"*": {"desc": "café ☕"}}}'])
        self.assertEqual(policy_from_bytes(data, "provider"), loaded)
        self.assertIn("café ☕".encode("utf-8"), data)
        self.assertNotIn(b" ", data.replace("café ☕".encode("utf-8"), b""))

    def test_failing_sources(self) -> None:
        missing = FilePath(self.mktemp()).path
        self.assertLoadError(['{"ips": {}}', missing], f"{missing}: no such file")
        self.assertLoadError(["{nope"], "inline JSON '{nope': invalid JSON at line 1 column 2:"
                                        " Expecting property name enclosed in double quotes")
        binary = self.write(b"\xff")
        self.assertLoadError([binary], f"{binary}: not UTF-8 text (byte 0)")

    def test_failing_fetch(self) -> None:
        def fetch(url: str) -> bytes:
            raise OSError("connection refused")

        self.assertLoadError(["https://user:pw@example.invalid/p.json"],
                             "https://***@example.invalid/p.json: fetch failed: connection refused", fetch)
        self.assertLoadError(["https://example.invalid/p.json"],
                             "https://example.invalid/p.json: URLs need a fetch function; none was given")

    def test_empty_source(self) -> None:
        self.assertRaises(PolicyError, load_policy, ["  "])

    def test_not_an_object(self) -> None:
        self.assertLoadError(["[]"], "inline JSON '[]': expected a JSON object"
                                     ' {"defaults": ..., "ips": ...}, got []')

    def test_invalid_content_names_the_source(self) -> None:
        path = self.write({"ips": {"10.0.0.0/8": {"onlyPorts": [1, 0]}}})
        self.assertLoadError([path], f'{path}: ips["10.0.0.0/8"]: onlyPorts[1]: must be an integer 1-65535, got 0')

    def test_invalid_merged_content_names_the_contributing_source(self) -> None:
        first = self.write({"defaults": {"bandwidthLimit": {"mbps": 8}}, "ips": {"*": {}}})
        self.assertLoadError(
            [first, '{"defaults": {"bandwidthLimit": {"burstMbps": -1}}}'],
            "inline JSON '{\"defaults\": {\"bandwidthLimit\": {\"burstM...' (source 2 of 2, merged):"
            " defaults: bandwidthLimit: burstMbps: must be a finite number > 0, got -1")
        self.assertLoadError(
            ['{"ips": {"*": {"alow": 1}}}', first],
            "inline JSON '{\"ips\": {\"*\": {\"alow\": 1}}}' (source 1 of 2, merged): ips[\"*\"]:"
            ' unknown field "alow" (known: allow, bandwidthLimit, labels, expireAt, desc, onlyPorts,'
            " excludePorts, onlyProtocols, excludeProtocols)")

    def test_too_large(self) -> None:
        ips = {f"10.{i // 256 % 256}.{i % 256}.1": {"desc": "x" * 40} for i in range(2000)}
        with self.assertRaises(PolicyError) as caught:
            load_policy([json.dumps({"ips": ips})])
        self.assertIn(f"routes carry at most {MAX_POLICY_BYTES}", str(caught.exception))


class PolicyFromBytesTests(unittest.TestCase):

    def test_empty(self) -> None:
        self.assertIs(policy_from_bytes(b"", "provider p1"), EMPTY)
        self.assertEqual(policy_from_bytes(b"{}", "provider p1"), EMPTY)

    def test_valid(self) -> None:
        data = json.dumps(README_EXAMPLE).encode("utf-8")
        self.assertEqual(policy_from_bytes(data, "p"), policy(README_EXAMPLE))

    def test_errors(self) -> None:
        cases = [
            (b"\xff{}", "provider p1: not UTF-8 text (byte 0)"),
            (b"{", "provider p1: invalid JSON at line 1 column 2:"
                   " Expecting property name enclosed in double quotes"),
            (b'{"ips": {"x": {}}}',
             'provider p1: ips["x"]: invalid pattern: expected "*", an IP address or a CIDR'),
            (b'{"__proto__": {}}', 'provider p1: unknown field "__proto__" (known: defaults, ips)'),
        ]
        for data, message in cases:
            with self.assertRaises(PolicyError) as caught:
                policy_from_bytes(data, "provider p1")
            self.assertEqual(str(caught.exception), message)
