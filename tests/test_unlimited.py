"""
The C{/unlimited} token logic: tokens from the real C{openssl enc} pipeline, every
response of L{UnlimitedGate.check}, replay and rate limiting, payload extraction.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.trial import unittest

from pipegate.ports import unlimited
from pipegate.ports.unlimited import TokenInvalid, UnlimitedGate, decrypt_token, extract_payload, make_token
from tests.support import debian_tool

SECRET = "unlimited-test-secret"
NOW = 1_700_000_000_000
OPENSSL = "/usr/bin/openssl"


def openssl_or_skip(testcase) -> str:
    return debian_tool(testcase, "openssl", OPENSSL)


def openssl_token(testcase, plaintext_format: str, timestamp: int, secret: str = SECRET) -> str:
    """A token made exactly as the documented shell pipeline makes it."""
    openssl = openssl_or_skip(testcase)
    command = (f"printf {shlex.quote(plaintext_format)} {int(timestamp)}"
               f" | {shlex.quote(openssl)} enc -aes-256-cbc -pbkdf2 -iter 10000 -md sha256 -salt"
               f" -pass pass:{shlex.quote(secret)}"
               " | base64 -w0 | tr '+/' '-_' | tr -d '='")
    result = subprocess.run(["sh", "-c", command], capture_output=True, check=True, timeout=30)
    return result.stdout.decode("ascii").strip()


def openssl_decrypt(testcase, raw: bytes, secret: str = SECRET) -> bytes:
    openssl = openssl_or_skip(testcase)
    result = subprocess.run(
        [openssl, "enc", "-d", "-aes-256-cbc", "-pbkdf2", "-iter", "10000", "-md", "sha256",
         "-pass", f"pass:{secret}"],
        input=raw, capture_output=True, check=True, timeout=30)
    return result.stdout


def openssl_encrypt(plaintext: bytes, salt: bytes = b"saltsalt") -> bytes:
    """Arbitrary plaintext encrypted as C{openssl enc} would (independently of make_token)."""
    derived = hashlib.pbkdf2_hmac("sha256", SECRET.encode(), salt, 10_000, 48)
    padder = padding.PKCS7(128).padder()
    e = Cipher(algorithms.AES(derived[:32]), modes.CBC(derived[32:])).encryptor()
    return b"Salted__" + salt + e.update(padder.update(plaintext) + padder.finalize()) + e.finalize()


def b64url_decode(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def reencode_standard(token: str) -> str:
    """The same bytes as standard base64 with '+', '/' and '=' padding."""
    return base64.b64encode(b64url_decode(token)).decode("ascii")


class OpenSSLTokenTests(unittest.TestCase):
    """Interoperability with the real openssl command."""

    def test_openssl_pipeline_token_is_accepted(self):
        token = openssl_token(self, '{"timestamp":%d,"ip":"127.0.0.1"}', NOW)
        self.assertEqual(decrypt_token(token, SECRET), {"timestamp": NOW, "ip": "127.0.0.1"})
        status, body = UnlimitedGate(SECRET).check(token, "127.0.0.1", NOW + 1000)
        self.assertEqual((status, body), (200, {"ok": True, "ip": "127.0.0.1", "expireAt": NOW + 1000 + 1_800_000}))

    def test_openssl_ts_key_is_accepted(self):
        token = openssl_token(self, '{"ts":%d,"ip":"127.0.0.1"}', NOW)
        self.assertEqual(UnlimitedGate(SECRET).check(token, "127.0.0.1", NOW)[0], 200)

    def test_openssl_token_with_another_secret_is_invalid(self):
        token = openssl_token(self, '{"timestamp":%d,"ip":"127.0.0.1"}', NOW, secret="other-secret")
        self.assertEqual(UnlimitedGate(SECRET).check(token, "127.0.0.1", NOW),
                         (403, {"error": "invalid_token"}))

    def test_make_token_decrypts_with_openssl(self):
        token = make_token(SECRET, "192.0.2.7", NOW)
        self.assertNotIn("=", token)
        self.assertFalse(set(token) & set("+/"))
        plaintext = openssl_decrypt(self, b64url_decode(token))
        self.assertEqual(json.loads(plaintext), {"timestamp": NOW, "ip": "192.0.2.7"})

    def test_make_token_fractional_time(self):
        token = make_token(SECRET, "192.0.2.7", NOW + 0.5)
        self.assertEqual(json.loads(openssl_decrypt(self, b64url_decode(token)))["timestamp"], NOW + 0.5)

    def test_missing_openssl_skips_outside_ci(self):
        self.patch(sys.modules[__name__], "OPENSSL", "/nonexistent/openssl")
        self.patch(shutil, "which", lambda name: None)
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CI"})
        self.assertRaises(unittest.SkipTest, openssl_or_skip, self)

    def test_missing_openssl_fails_under_ci(self):
        self.patch(sys.modules[__name__], "OPENSSL", "/nonexistent/openssl")
        self.patch(shutil, "which", lambda name: None)
        self.patch(os, "environ", dict(os.environ, CI="true"))
        self.assertRaises(self.failureException, openssl_or_skip, self)


class DecryptTokenTests(unittest.TestCase):

    def test_round_trip(self):
        token = make_token(SECRET, "2001:db8::1", NOW, salt=b"12345678")
        self.assertEqual(decrypt_token(token, SECRET), {"timestamp": NOW, "ip": "2001:db8::1"})
        self.assertEqual(b64url_decode(token)[:16], b"Salted__12345678")

    def test_fixed_salt_is_deterministic(self):
        self.assertEqual(make_token(SECRET, "1.2.3.4", NOW, salt=b"\0" * 8),
                         make_token(SECRET, "1.2.3.4", NOW, salt=b"\0" * 8))
        self.assertNotEqual(make_token(SECRET, "1.2.3.4", NOW), make_token(SECRET, "1.2.3.4", NOW))

    def test_encodings_accepted(self):
        token = make_token(SECRET, "1.2.3.4", NOW)
        raw = b64url_decode(token)
        for variant in (token,
                        base64.urlsafe_b64encode(raw).decode(),        # url-safe with padding
                        base64.b64encode(raw).decode(),                 # standard with padding
                        base64.b64encode(raw).decode().rstrip("="),
                        base64.b64encode(raw).decode().replace("+", " "),  # '+' lost to form decoding
                        base64.encodebytes(raw).decode(),               # wrapped at 76 columns
                        "  " + token + "\n"):
            self.assertEqual(decrypt_token(variant, SECRET)["ip"], "1.2.3.4", variant)

    def test_failures_all_look_alike(self):
        good = make_token(SECRET, "1.2.3.4", NOW, salt=b"fixedsal")
        raw = b64url_decode(good)

        def enc(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).decode()

        def encrypted(plaintext: bytes) -> str:
            return enc(openssl_encrypt(plaintext))

        bad = {
            "empty": "",
            "not base64": "!!!not-base64!!!",
            "bad length": good + "A",
            "padding in the middle": good[:8] + "=" + good[8:],
            "no magic": enc(b"Unsalted" + raw[8:]),
            "magic only": enc(b"Salted__"),
            "no ciphertext": enc(raw[:16]),
            "partial block": enc(raw[:-1]),
            "wrong secret": make_token("another secret", "1.2.3.4", NOW),
            "bit flip in last block": enc(raw[:-1] + bytes([raw[-1] ^ 1])),
            "too long": "A" * (unlimited.MAX_TOKEN_CHARS + 4),
            "not utf-8": encrypted(b"\xff\xfe{}"),
            "not json": encrypted(b"timestamp=1&ip=1.2.3.4"),
            "json array": encrypted(b"[1, 2]"),
            "json string": encrypted(b'"1.2.3.4"'),
            "not a string": None,
        }
        for name, token in bad.items():
            e = self.assertRaises(TokenInvalid, decrypt_token, token, SECRET)
            self.assertEqual(str(e), "invalid token", name)
            self.assertIsNone(e.__cause__, name)
            self.assertIsNone(e.__context__, name)
            self.assertIsInstance(e, ValueError)

    def test_make_token_refusals(self):
        self.assertRaises(ValueError, make_token, SECRET, "1.2.3.4", NOW, salt=b"short")
        for now in (float("nan"), float("inf"), "1700000000000", None, True):
            self.assertRaises(ValueError, make_token, SECRET, "1.2.3.4", now)


class GateTests(unittest.TestCase):

    def setUp(self):
        self.gate = UnlimitedGate(SECRET)

    def test_ok(self):
        token = make_token(SECRET, "203.0.113.5", NOW)
        self.assertEqual(self.gate.check(token, "203.0.113.5", NOW + 2000),
                         (200, {"ok": True, "ip": "203.0.113.5", "expireAt": NOW + 2000 + 1800 * 1000}))

    def test_grant_length(self):
        gate = UnlimitedGate(SECRET, grant_s=60)
        status, body = gate.check(make_token(SECRET, "203.0.113.5", NOW), "203.0.113.5", NOW)
        self.assertEqual((status, body["expireAt"]), (200, NOW + 60_000))

    def test_missing_payload(self):
        for payload in (None, "", "   "):
            self.assertEqual(self.gate.check(payload, "1.2.3.4", NOW), (400, {"error": "missing_payload"}))

    def test_missing_caller_ip(self):
        token = make_token(SECRET, "1.2.3.4", NOW)
        for caller in (None, ""):
            self.assertEqual(self.gate.check(token, caller, NOW), (400, {"error": "missing_caller_ip"}))
        self.assertEqual(self.gate.check(None, None, NOW), (400, {"error": "missing_payload"}))

    def test_missing_is_not_counted(self):
        for _ in range(50):
            self.gate.check(None, "1.2.3.4", NOW)
        self.assertEqual(self.gate.failures("1.2.3.4", NOW), 0)
        self.assertEqual(self.gate.check(make_token(SECRET, "1.2.3.4", NOW), "1.2.3.4", NOW)[0], 200)

    def test_invalid_token(self):
        self.assertEqual(self.gate.check("garbage", "1.2.3.4", NOW), (403, {"error": "invalid_token"}))
        self.assertEqual(self.gate.check(make_token("wrong", "1.2.3.4", NOW), "1.2.3.4", NOW),
                         (403, {"error": "invalid_token"}))

    def claims_token(self, claims) -> str:
        return base64.urlsafe_b64encode(self.encrypt(json.dumps(claims).encode())).decode()

    def encrypt(self, plaintext: bytes) -> bytes:
        return openssl_encrypt(plaintext)

    def test_invalid_payload(self):
        for claims in [{"timestamp": NOW},
                       {"timestamp": NOW, "ip": ""},
                       {"timestamp": NOW, "ip": "   "},
                       {"timestamp": NOW, "ip": None},
                       {"timestamp": NOW, "ip": 16909060},
                       {"ip": "1.2.3.4"},
                       {"timestamp": None, "ip": "1.2.3.4"},
                       {"timestamp": "1700000000000", "ip": "1.2.3.4"},
                       {"timestamp": True, "ip": "1.2.3.4"},
                       {"timestamp": [NOW], "ip": "1.2.3.4"},
                       {"timestamp": 10 ** 400, "ip": "1.2.3.4"}]:
            self.assertEqual(UnlimitedGate(SECRET).check(self.claims_token(claims), "1.2.3.4", NOW),
                             (400, {"error": "invalid_payload"}), claims)

    def test_non_finite_timestamps(self):
        for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
            token = base64.b64encode(self.encrypt(b'{"timestamp":' + literal + b',"ip":"1.2.3.4"}')).decode()
            self.assertEqual(self.gate.check(token, "1.2.3.4", NOW), (400, {"error": "invalid_payload"}), literal)

    def test_ts_is_used_when_timestamp_is_absent_or_null(self):
        for claims in [{"ts": NOW, "ip": "1.2.3.4"}, {"timestamp": None, "ts": NOW + 1, "ip": "1.2.3.4"}]:
            self.assertEqual(self.gate.check(self.claims_token(claims), "1.2.3.4", NOW)[0], 200)

    def test_ip_mismatch(self):
        token = make_token(SECRET, "198.51.100.1", NOW)
        self.assertEqual(self.gate.check(token, "198.51.100.2", NOW),
                         (403, {"error": "ip_mismatch", "callerIp": "198.51.100.2"}))

    def test_ip_mismatch_reports_the_normalised_caller(self):
        token = make_token(SECRET, "198.51.100.1", NOW)
        self.assertEqual(self.gate.check(token, "::ffff:198.51.100.2", NOW),
                         (403, {"error": "ip_mismatch", "callerIp": "198.51.100.2"}))

    def test_ip_normalisation(self):
        for token_ip, caller in [("127.0.0.1", "::ffff:127.0.0.1"),
                                 ("::ffff:127.0.0.1", "127.0.0.1"),
                                 ("fe80::1", "fe80::1%eth0"),
                                 ("fe80::1%lo", "fe80::1"),
                                 ("2001:DB8:0::1", "2001:db8::1"),
                                 (" 10.0.0.1 ", "10.0.0.1")]:
            gate = UnlimitedGate(SECRET)
            status, body = gate.check(make_token(SECRET, token_ip, NOW), caller, NOW)
            self.assertEqual(status, 200, (token_ip, caller, body))
        self.assertEqual(UnlimitedGate(SECRET).check(make_token(SECRET, "::ffff:127.0.0.1", NOW),
                                                     "127.0.0.1", NOW)[1]["ip"], "127.0.0.1")

    def test_timestamp_window(self):
        token_old = make_token(SECRET, "1.2.3.4", NOW - 300_001)
        token_new = make_token(SECRET, "1.2.3.4", NOW + 300_001)
        for token in (token_old, token_new):
            self.assertEqual(self.gate.check(token, "1.2.3.4", NOW), (403, {"error": "timestamp_out_of_window"}))
        for edge in (NOW - 300_000, NOW + 300_000):
            self.assertEqual(UnlimitedGate(SECRET).check(make_token(SECRET, "1.2.3.4", edge), "1.2.3.4", NOW)[0],
                             200)

    def test_custom_window(self):
        gate = UnlimitedGate(SECRET, window_s=10)
        self.assertEqual(gate.check(make_token(SECRET, "1.2.3.4", NOW - 10_001), "1.2.3.4", NOW)[0], 403)
        self.assertEqual(gate.check(make_token(SECRET, "1.2.3.4", NOW - 10_000), "1.2.3.4", NOW)[0], 200)

    def test_replay(self):
        token = make_token(SECRET, "1.2.3.4", NOW)
        self.assertEqual(self.gate.check(token, "1.2.3.4", NOW)[0], 200)
        self.assertEqual(self.gate.check(token, "1.2.3.4", NOW + 1000), (409, {"error": "replay_detected"}))

    def test_reencoded_token_is_still_a_replay(self):
        token = make_token(SECRET, "1.2.3.4", NOW)
        self.assertEqual(self.gate.check(token, "1.2.3.4", NOW)[0], 200)
        for variant in (reencode_standard(token), token + "=" * (-len(token) % 4), " " + token + " "):
            self.assertNotEqual(variant, token)
            self.assertEqual(self.gate.check(variant, "1.2.3.4", NOW + 1), (409, {"error": "replay_detected"}))

    def test_same_claims_with_another_salt_is_a_replay(self):
        self.assertEqual(self.gate.check(make_token(SECRET, "1.2.3.4", NOW, salt=b"a" * 8), "1.2.3.4", NOW)[0], 200)
        self.assertEqual(self.gate.check(make_token(SECRET, "1.2.3.4", NOW, salt=b"b" * 8), "1.2.3.4", NOW)[0], 409)
        # ... and the same instant written another way is the same key.
        self.assertEqual(self.gate.check(self.claims_token({"ts": float(NOW), "ip": "::ffff:1.2.3.4"}),
                                         "1.2.3.4", NOW)[0], 409)

    def test_fresh_token_after_replay(self):
        self.assertEqual(self.gate.check(make_token(SECRET, "1.2.3.4", NOW), "1.2.3.4", NOW)[0], 200)
        self.assertEqual(self.gate.check(make_token(SECRET, "1.2.3.4", NOW + 1), "1.2.3.4", NOW + 1)[0], 200)

    def test_replay_memory_is_pruned(self):
        gate = UnlimitedGate(SECRET, window_s=10)
        for i in range(5):
            self.assertEqual(gate.check(make_token(SECRET, "1.2.3.4", NOW + i), "1.2.3.4", NOW + i)[0], 200)
        self.assertEqual(gate.remembered_tokens, 5)
        token = make_token(SECRET, "1.2.3.4", NOW)
        # Still within the window: remembered, a replay.
        self.assertEqual(gate.check(token, "1.2.3.4", NOW + 10_000)[0], 409)
        # Past it: forgotten, and the timestamp check refuses the old token instead.
        self.assertEqual(gate.check(token, "1.2.3.4", NOW + 10_001), (403, {"error": "timestamp_out_of_window"}))
        self.assertEqual(gate.check(None, "1.2.3.4", NOW + 60_000)[0], 400)
        gate.check(make_token(SECRET, "1.2.3.4", NOW + 60_000), "1.2.3.4", NOW + 60_000)
        self.assertEqual(gate.remembered_tokens, 1)

    def test_future_token_remembered_until_its_window_closes(self):
        gate = UnlimitedGate(SECRET, window_s=10)
        token = make_token(SECRET, "1.2.3.4", NOW + 10_000)
        self.assertEqual(gate.check(token, "1.2.3.4", NOW)[0], 200)
        self.assertEqual(gate.check(token, "1.2.3.4", NOW + 15_000)[0], 409)
        self.assertEqual(gate.check(token, "1.2.3.4", NOW + 20_000)[0], 409)

    def test_failures_are_counted(self):
        gate = UnlimitedGate(SECRET, max_failures=100, window_s=10)
        ok = make_token(SECRET, "1.2.3.4", NOW)
        gate.check(ok, "1.2.3.4", NOW)
        for payload, caller in [("junk", "1.2.3.4"),                                                  # 403
                                (self.claims_token({"ip": "1.2.3.4"}), "1.2.3.4"),                    # 400
                                (make_token(SECRET, "9.9.9.9", NOW), "1.2.3.4"),                      # mismatch
                                (make_token(SECRET, "1.2.3.4", NOW - 60_000), "1.2.3.4"),             # window
                                (ok, "1.2.3.4")]:                                                     # replay
            before = gate.failures("1.2.3.4", NOW)
            self.assertNotEqual(gate.check(payload, caller, NOW)[0], 200)
            self.assertEqual(gate.failures("1.2.3.4", NOW), before + 1)
        self.assertEqual(gate.failures("1.2.3.4", NOW), 5)
        self.assertEqual(gate.failures("::ffff:1.2.3.4", NOW), 5)
        self.assertEqual(gate.failures("5.6.7.8", NOW), 0)

    def count_decrypts(self) -> list:
        calls = []
        real = unlimited.decrypt_token

        def counting(token, secret):
            calls.append(token)
            return real(token, secret)
        self.patch(unlimited, "decrypt_token", counting)
        return calls

    def test_rate_limit(self):
        calls = self.count_decrypts()
        gate = UnlimitedGate(SECRET, max_failures=3, failure_window_s=60)
        bad = make_token("not the gateway's secret", "1.2.3.4", NOW)  # well formed: it costs a decryption
        for i in range(3):
            self.assertEqual(gate.check(bad, "1.2.3.4", NOW + i), (403, {"error": "invalid_token"}))
        self.assertEqual(len(calls), 3)
        good = make_token(SECRET, "1.2.3.4", NOW)
        for i in range(10):
            self.assertEqual(gate.check(good if i % 2 else bad, "1.2.3.4", NOW + 10 + i),
                             (429, {"error": "too_many_attempts"}))
        self.assertEqual(len(calls), 3, "no decryption while limited")
        # Another IP is unaffected; the mapped form of the limited IP is the same IP.
        self.assertEqual(gate.check(make_token(SECRET, "5.6.7.8", NOW), "5.6.7.8", NOW)[0], 200)
        self.assertEqual(gate.check(good, "::ffff:1.2.3.4", NOW + 100)[0], 429)
        # Refused attempts do not extend the lockout: the first failure leaves the
        # window at NOW + 60 s, and then one more attempt is decided.
        self.assertEqual(gate.check(good, "1.2.3.4", NOW + 59_999)[0], 429)
        self.assertEqual(gate.check(good, "1.2.3.4", NOW + 60_000)[0], 200)
        self.assertEqual(len(calls), 5)

    def test_missing_checks_come_before_the_rate_limit(self):
        gate = UnlimitedGate(SECRET, max_failures=1)
        gate.check("bad", "1.2.3.4", NOW)
        self.assertEqual(gate.check("bad", "1.2.3.4", NOW)[0], 429)
        self.assertEqual(gate.check(None, "1.2.3.4", NOW), (400, {"error": "missing_payload"}))
        self.assertEqual(gate.check("bad", None, NOW), (400, {"error": "missing_caller_ip"}))

    def test_failure_table_is_pruned(self):
        gate = UnlimitedGate(SECRET, failure_window_s=1)
        for i in range(100):
            gate.check("bad", f"10.0.{i // 256}.{i % 256}", NOW)
        self.assertEqual(gate.tracked_ips, 100)
        gate.check("bad", "10.1.0.1", NOW + 1001)
        self.assertEqual(gate.tracked_ips, 1)

    def test_failure_table_is_capped(self):
        gate = UnlimitedGate(SECRET, max_tracked_ips=10, max_failures=2)
        for i in range(50):
            gate.check("bad", f"10.0.0.{i}", NOW)
        self.assertEqual(gate.tracked_ips, 10)
        gate.check("bad", "10.0.0.49", NOW)
        self.assertEqual(gate.check("bad", "10.0.0.49", NOW)[0], 429)

    def test_per_ip_history_is_bounded(self):
        gate = UnlimitedGate(SECRET, max_failures=4)
        for i in range(100):
            gate.check("bad", "1.2.3.4", NOW + i)
        self.assertEqual(gate.failures("1.2.3.4", NOW + 100), 4)

    def test_configuration_refusals(self):
        for kwargs in [{"secret": ""}, {"secret": None}, {"secret": SECRET, "window_s": 0},
                       {"secret": SECRET, "grant_s": -1}, {"secret": SECRET, "max_failures": 0},
                       {"secret": SECRET, "failure_window_s": float("nan")},
                       {"secret": SECRET, "window_s": float("inf")},
                       {"secret": SECRET, "max_tracked_ips": 0}]:
            self.assertRaises(ValueError, UnlimitedGate, **kwargs)

    def test_secret_not_in_repr(self):
        self.assertNotIn(SECRET, repr(self.gate))


class ExtractPayloadTests(unittest.TestCase):

    def test_query_first(self):
        self.assertEqual(extract_payload(b"fromquery", b'{"payload":"frombody"}', b"application/json"),
                         "fromquery")
        self.assertEqual(extract_payload(b"  q  ", b"", None), "q")

    def test_empty_query_falls_back_to_body(self):
        self.assertEqual(extract_payload(b"", b"rawtoken", None), "rawtoken")

    def test_json_body(self):
        self.assertEqual(extract_payload(None, b'{"payload": "tok"}', b"application/json"), "tok")
        self.assertEqual(extract_payload(None, b' {"payload":"tok"} ', None), "tok")
        self.assertEqual(extract_payload(None, b'{"payload":"tok"}', b"application/json; charset=utf-8"), "tok")

    def test_json_without_payload(self):
        self.assertIsNone(extract_payload(None, b'{"token":"tok"}', b"application/json"))
        self.assertIsNone(extract_payload(None, b'{"payload": 12}', None))
        self.assertIsNone(extract_payload(None, b'{"payload": ""}', None))
        self.assertIsNone(extract_payload(None, b'["tok"]', b"application/json"))
        self.assertIsNone(extract_payload(None, b"{not json", b"application/json"))

    def test_form_body(self):
        self.assertEqual(extract_payload(None, b"payload=abc-_&x=1", b"application/x-www-form-urlencoded"),
                         "abc-_")
        self.assertEqual(extract_payload(None, b"x=1&payload=a%2Bb", b"application/x-www-form-urlencoded"),
                         "a+b")
        self.assertEqual(extract_payload(None, b"payload=abc", None), "abc")
        self.assertIsNone(extract_payload(None, b"x=1", b"application/x-www-form-urlencoded"))

    def test_whole_body(self):
        self.assertEqual(extract_payload(None, b"  U2FsdGVkX1-abc==\n", b"text/plain"), "U2FsdGVkX1-abc==")
        self.assertEqual(extract_payload(None, b"U2FsdGVkX1+abc", None), "U2FsdGVkX1+abc")

    def test_nothing(self):
        self.assertIsNone(extract_payload(None, b"", None))
        self.assertIsNone(extract_payload(None, b" \r\n ", b"text/plain"))
        self.assertIsNone(extract_payload(b"   ", b"", None))

    def test_every_location_reaches_the_gate(self):
        raw = b64url_decode(make_token(SECRET, "1.2.3.4", NOW, salt=b"\0" * 8))
        standard = base64.b64encode(raw).decode()
        self.assertTrue("+" in standard and "/" in standard and standard.endswith("="))
        requests = [
            (standard.encode(), b"", None),              # already URL-decoded by the web layer
            (None, json.dumps({"payload": standard}).encode(), b"application/json"),
            (None, urlencode({"payload": standard}).encode(), b"application/x-www-form-urlencoded"),
            (None, ("payload=" + standard).encode(), None),     # unescaped: '+' becomes ' '
            (None, ("payload=" + quote(standard, safe="")).encode(), None),
            (None, standard.encode() + b"\n", b"text/plain"),
        ]
        for request in requests:
            gate = UnlimitedGate(SECRET)
            self.assertEqual(gate.check(extract_payload(*request), "1.2.3.4", NOW)[0], 200, request)


class KeyDerivationBudgetTests(unittest.TestCase):
    """PBKDF2 work is bounded for all callers together (issue 17 item 8)."""

    def test_rotating_ips_share_one_budget(self):
        gate = UnlimitedGate(SECRET, kdf_rate=5)
        wrong = make_token("not the gateway's secret", "1.2.3.4", NOW)
        answers = [gate.check(wrong, f"10.0.0.{n}", NOW)[0] for n in range(20)]
        self.assertEqual(answers, [403] * 5 + [503] * 15)
        self.assertEqual(gate.kdf_refused, 15)
        # One second later, five more derivations; a good token among them is granted.
        self.assertEqual(gate.check(make_token(SECRET, "10.0.1.1", NOW), "10.0.1.1", NOW + 1000)[0], 200)
        self.assertEqual([gate.check(wrong, f"10.0.2.{n}", NOW + 1000)[0] for n in range(5)],
                         [403] * 4 + [503])

    def test_malformed_tokens_cost_no_derivation(self):
        gate = UnlimitedGate(SECRET, kdf_rate=1)
        for n in range(50):
            self.assertEqual(gate.check("not-a-token", f"10.0.0.{n}", NOW), (403, {"error": "invalid_token"}))
        self.assertEqual(gate.kdf_refused, 0)
        self.assertEqual(gate.check(make_token(SECRET, "10.9.9.9", NOW), "10.9.9.9", NOW)[0], 200)
