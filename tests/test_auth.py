"""
Tests for L{pipegate.auth} and the C{pipegate token} / C{router-secret} commands.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time

import jwt
from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from pipegate import auth
from pipegate.auth import ConfigError, JWTSettings, TokenError, mint, token_lines, verify

# 64 bytes or more, so PyJWT has no reason to warn about the key length, even for HS512.
SECRET = "unit-test-secret-" + "0123456789abcdef" * 3
OTHER_SECRET = "another-secret--" + "fedcba9876543210" * 3
SETTINGS = JWTSettings.from_values(SECRET)
DAY = 86400
CLAIMS = ("sub", "exp", "nbf", "iat", "iss", "aud")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_hs256(payload: bytes, secret: str = SECRET) -> str:
    """A correctly signed HS256 token around any payload bytes (PyJWT would check claims)."""
    signing_input = b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + b64url(payload)
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


def unverified(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def full_claims(now: float, **changes) -> dict:
    claims = {"sub": "abc", "iat": int(now), "nbf": int(now), "exp": int(now) + 3600,
              "iss": "pipegate", "aud": "pipegate", "jti": "0" * 32}
    claims.update(changes)
    return claims


class SettingsTests(unittest.TestCase):

    def test_defaults(self):
        s = JWTSettings.from_values(SECRET)
        self.assertEqual(s.secret, SECRET)
        self.assertEqual(s.algorithms, ("HS256",))
        self.assertEqual(s.issuer, "pipegate")
        self.assertEqual(s.audience, "pipegate")
        self.assertEqual(s.ttl_days, 21)

    def test_empty_values_mean_defaults(self):
        s = JWTSettings.from_values(SECRET, "", "", "", "")
        self.assertEqual((s.algorithms, s.issuer, s.audience, s.ttl_days),
                         (("HS256",), "pipegate", "pipegate", 21))

    def test_missing_secret(self):
        for secret in (None, ""):
            e = self.assertRaises(ConfigError, JWTSettings.from_values, secret)
            self.assertIn("PIPEGATE_JWT_SECRET", str(e))
        e = self.assertRaises(ConfigError, JWTSettings.from_environ, {})
        self.assertIn("PIPEGATE_JWT_SECRET", str(e))

    def test_short_secret(self):
        e = self.assertRaises(ConfigError, JWTSettings.from_values, "x" * 31)
        self.assertIn("PIPEGATE_JWT_SECRET", str(e))
        self.assertEqual(JWTSettings.from_values("x" * 32).secret, "x" * 32)

    def test_secret_length_counted_in_bytes(self):
        # 16 characters, 32 bytes in UTF-8: long enough
        self.assertEqual(JWTSettings.from_values("\u00e9" * 16).secret, "\u00e9" * 16)
        # 30 characters, 31 bytes: too short
        self.assertRaises(ConfigError, JWTSettings.from_values, "\u00e9" + "x" * 29)

    def test_algorithms_json_list(self):
        self.assertEqual(JWTSettings.from_values(SECRET, '["HS256"]').algorithms, ("HS256",))
        self.assertEqual(JWTSettings.from_values(SECRET, ' ["HS512", "HS384"] ').algorithms,
                         ("HS512", "HS384"))

    def test_algorithms_comma_list(self):
        self.assertEqual(JWTSettings.from_values(SECRET, "HS256,HS512").algorithms,
                         ("HS256", "HS512"))
        self.assertEqual(JWTSettings.from_values(SECRET, " HS384 , HS256 ,").algorithms,
                         ("HS384", "HS256"))

    def test_bad_algorithms(self):
        for value in ('["HS256"', "[HS256]", '{"a": 1}', '["HS256", 5]', "[]", ",",
                      "RS256", "none", "HS256,none", '["RS256"]', '["none"]', "hs256"):
            e = self.assertRaises(ConfigError, JWTSettings.from_values, SECRET, value)
            self.assertIn("PIPEGATE_JWT_ALGORITHMS", str(e), value)

    def test_ttl(self):
        self.assertEqual(JWTSettings.from_values(SECRET, ttl_days="2.5").ttl_days, 2.5)
        for value in ("0", "-1", "-0.5", "abc", "nan"):
            e = self.assertRaises(ConfigError, JWTSettings.from_values, SECRET, ttl_days=value)
            self.assertIn("PIPEGATE_JWT_TTL_DAYS", str(e), value)

    def test_from_environ(self):
        s = JWTSettings.from_environ({
            "PIPEGATE_JWT_SECRET": SECRET, "PIPEGATE_JWT_ALGORITHMS": "HS512,HS256",
            "PIPEGATE_JWT_ISSUER": "me", "PIPEGATE_JWT_AUDIENCE": "you",
            "PIPEGATE_JWT_TTL_DAYS": "1"})
        self.assertEqual((s.secret, s.algorithms, s.issuer, s.audience, s.ttl_days),
                         (SECRET, ("HS512", "HS256"), "me", "you", 1.0))
        s = JWTSettings.from_environ({"PIPEGATE_JWT_SECRET": SECRET})
        self.assertEqual(s, SETTINGS)

    def test_from_environ_refusals(self):
        for extra in ({"PIPEGATE_JWT_ALGORITHMS": "none"}, {"PIPEGATE_JWT_TTL_DAYS": "0"},
                      {"PIPEGATE_JWT_ALGORITHMS": "[bad json"}):
            self.assertRaises(ConfigError, JWTSettings.from_environ,
                              {"PIPEGATE_JWT_SECRET": SECRET, **extra})

    def test_repr_hides_secret(self):
        self.assertNotIn(SECRET, repr(SETTINGS))


class ConnectionIdTests(unittest.TestCase):

    def test_valid(self):
        for cid in ("a", "abc", "A-b_9", "0" * 64, "x" + "-" * 63):
            self.assertTrue(auth.valid_connection_id(cid), cid)

    def test_invalid(self):
        for cid in ("", "-abc", "_abc", "a" * 65, "a/b", "a.b", "a b", "abc\n", "\u00e9",
                    "healthz", "HealthZ"):
            self.assertFalse(auth.valid_connection_id(cid), cid)


class MintTests(unittest.TestCase):

    def test_claims(self):
        now = 1_700_000_000.75
        token = mint(SETTINGS, "abc", now)
        claims = unverified(token)
        self.assertEqual(set(claims), {"sub", "exp", "nbf", "iat", "iss", "aud", "jti"})
        self.assertEqual(claims["sub"], "abc")
        self.assertEqual(claims["iat"], 1_700_000_000)
        self.assertEqual(claims["nbf"], 1_700_000_000)
        self.assertEqual(claims["exp"], 1_700_000_000 + 21 * DAY)
        self.assertEqual(claims["iss"], "pipegate")
        self.assertEqual(claims["aud"], "pipegate")
        self.assertRegex(claims["jti"], r"\A[0-9a-f]{32}\Z")
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "HS256")

    def test_jti_unique(self):
        self.assertNotEqual(unverified(mint(SETTINGS, "abc", 1000))["jti"],
                            unverified(mint(SETTINGS, "abc", 1000))["jti"])

    def test_settings_used(self):
        s = JWTSettings.from_values(SECRET, "HS512,HS256", "me", "you", "0.5")
        token = mint(s, "xyz", 1000)
        claims = unverified(token)
        self.assertEqual((claims["iss"], claims["aud"], claims["exp"]), ("me", "you", 1000 + DAY // 2))
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "HS512")
        # really signed with the secret
        jwt.decode(token, SECRET, algorithms=["HS512"], audience="you",
                   options={"verify_exp": False, "verify_nbf": False})
        self.assertRaises(jwt.InvalidSignatureError, jwt.decode, token, OTHER_SECRET,
                          algorithms=["HS512"], audience="you")

    def test_invalid_connection_id(self):
        for cid in ("", "a/b", "healthz", "a" * 65, "-x"):
            e = self.assertRaises(ConfigError, mint, SETTINGS, cid, time.time())
            self.assertIn("connection id", str(e))


class VerifyTests(unittest.TestCase):

    def assertRefused(self, token, now=None, settings=SETTINGS) -> TokenError:
        return self.assertRaises(TokenError, verify, settings, token,
                                 time.time() if now is None else now)

    def test_fresh_token(self):
        now = time.time()
        self.assertEqual(verify(SETTINGS, mint(SETTINGS, "abc", now), now), "abc")

    def test_expired(self):
        now = time.time()
        token = mint(SETTINGS, "abc", now - 30 * DAY)
        e = self.assertRefused(token, now)
        self.assertIn("expired", str(e))
        self.assertNotIn(token, str(e))

    def test_expired_by_injected_clock(self):
        # PyJWT's wall-clock check passes; the injected `now` is past exp (+ 30 s leeway).
        now = time.time()
        token = mint(SETTINGS, "abc", now)
        exp = unverified(token)["exp"]
        self.assertEqual(verify(SETTINGS, token, exp + auth.LEEWAY_SECONDS), "abc")
        e = self.assertRefused(token, exp + auth.LEEWAY_SECONDS + 1)
        self.assertIn("expired", str(e))

    def test_nbf_in_future(self):
        now = time.time()
        # wall clock: the token is not valid for another hour
        e = self.assertRefused(mint(SETTINGS, "abc", now + 3600), now)
        self.assertIn("not yet valid", str(e))
        # injected clock: an hour before the token's nbf
        token = mint(SETTINGS, "abc", now)
        e = self.assertRefused(token, now - 3600)
        self.assertIn("not yet valid", str(e))

    def test_wrong_secret(self):
        now = time.time()
        other = JWTSettings.from_values(OTHER_SECRET)
        self.assertRefused(mint(other, "abc", now), now)

    def test_wrong_audience(self):
        now = time.time()
        token = mint(JWTSettings.from_values(SECRET, audience="elsewhere"), "abc", now)
        self.assertIn("audience", str(self.assertRefused(token, now)))
        self.assertEqual(
            verify(JWTSettings.from_values(SECRET, audience="elsewhere"), token, now), "abc")

    def test_wrong_issuer(self):
        now = time.time()
        token = mint(JWTSettings.from_values(SECRET, issuer="mallory"), "abc", now)
        self.assertIn("issuer", str(self.assertRefused(token, now)))

    def test_alg_none(self):
        now = int(time.time())
        header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        payload = b64url(json.dumps(full_claims(now)).encode())
        for token in (f"{header}.{payload}.", f"{header}.{payload}.{b64url(b'sig')}"):
            self.assertRefused(token, now)
        # and the same claims signed properly verify, so the refusal is about `alg`
        self.assertEqual(verify(SETTINGS, jwt.encode(full_claims(now), SECRET, "HS256"), now),
                         "abc")

    def test_alg_none_even_if_configured_list_contains_it_by_mistake(self):
        # Settings built directly (from_values would refuse "none").
        now = int(time.time())
        header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        payload = b64url(json.dumps(full_claims(now)).encode())
        settings = JWTSettings(SECRET, algorithms=("HS256", "none"))
        self.assertRefused(f"{header}.{payload}.", now, settings)

    def test_disallowed_algorithm(self):
        now = time.time()
        hs512 = mint(JWTSettings.from_values(SECRET, "HS512"), "abc", now)
        e = self.assertRefused(hs512, now)
        self.assertIn("HS512", str(e))
        both = JWTSettings.from_values(SECRET, "HS256,HS512")
        self.assertEqual(verify(both, hs512, now), "abc")

    def test_missing_claims(self):
        now = int(time.time())
        token = jwt.encode({"sub": "abc", "exp": now + 3600}, SECRET, algorithm="HS256")
        self.assertRefused(token, now)
        for claim in CLAIMS:
            claims = full_claims(now)
            del claims[claim]
            token = jwt.encode(claims, SECRET, algorithm="HS256")
            e = self.assertRefused(token, now)
            self.assertIn(claim, str(e))

    def test_bad_subject(self):
        now = int(time.time())
        for sub in ("healthz", "a/b", "", "a" * 65):
            token = jwt.encode(full_claims(now, sub=sub), SECRET, algorithm="HS256")
            self.assertRefused(token, now)

    def test_garbage(self):
        for token in ("", "garbage", "a.b.c", "...", "eyJhbGciOiJIUzI1NiJ9..",
                      mint(SETTINGS, "abc", time.time())[:-5]):
            self.assertRefused(token)

    def test_tampered_payload(self):
        now = int(time.time())
        token = mint(SETTINGS, "abc", now)
        header, _, signature = token.split(".")
        payload = b64url(json.dumps(full_claims(now, sub="xyz")).encode())
        self.assertRefused(f"{header}.{payload}.{signature}", now)

    def test_unverified_subject(self):
        self.assertEqual(auth.unverified_subject(mint(SETTINGS, "abc", 1000)), "abc")
        self.assertIsNone(auth.unverified_subject("garbage"))
        self.assertIsNone(auth.unverified_subject(jwt.encode({"x": 1}, SECRET, "HS256")))

    @settings(deadline=None, max_examples=150)
    @given(st.text(max_size=300))
    def test_arbitrary_text_is_refused(self, token):
        self.assertRefused(token)

    @settings(deadline=None, max_examples=150)
    @given(st.dictionaries(
        st.sampled_from(CLAIMS + ("jti", "other")),
        st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
                  st.lists(st.text(max_size=5), max_size=2),
                  st.sampled_from(["abc", "pipegate"]),
                  st.integers(-10**6, 10**6).map(lambda d: int(time.time()) + d)),
    ))
    def test_signed_arbitrary_claims(self, claims):
        # Correctly signed tokens with any claims: verify returns a valid id or refuses.
        token = sign_hs256(json.dumps(claims).encode())
        try:
            sub = verify(SETTINGS, token, time.time())
        except TokenError:
            return
        self.assertTrue(auth.valid_connection_id(sub))


class TokenLinesTests(unittest.TestCase):

    LINES = re.compile(r"\AConnection-id: (\S+)\nJWT Bearer:    (\S+)\n\Z")

    def parse(self, text: str) -> tuple[str, str]:
        match = self.LINES.match(text)
        self.assertIsNotNone(match, text)
        return match.group(1), match.group(2)

    def test_two_lines(self):
        now = time.time()
        text = token_lines("abc", {"PIPEGATE_JWT_SECRET": SECRET}, now)
        self.assertEqual(len(text.splitlines()), 2)
        self.assertTrue(text.splitlines()[1].startswith("JWT Bearer:    ey"))
        cid, token = self.parse(text)
        self.assertEqual(cid, "abc")
        self.assertEqual(verify(SETTINGS, token, now), "abc")

    def test_id_precedence(self):
        env = {"PIPEGATE_JWT_SECRET": SECRET, "PIPEGATE_CONNECTION_ID": "from-env"}
        now = time.time()
        self.assertEqual(self.parse(token_lines("from-arg", env, now))[0], "from-arg")
        cid, token = self.parse(token_lines(None, env, now))
        self.assertEqual(cid, "from-env")
        self.assertEqual(verify(SETTINGS, token, now), "from-env")

    def test_random_id(self):
        env = {"PIPEGATE_JWT_SECRET": SECRET}
        now = time.time()
        first, token = self.parse(token_lines(None, env, now))
        second, _ = self.parse(token_lines(None, env, now))
        self.assertRegex(first, r"\A[0-9a-f]{32}\Z")
        self.assertNotEqual(first, second)
        self.assertEqual(verify(SETTINGS, token, now), first)

    def test_uses_environment_settings(self):
        env = {"PIPEGATE_JWT_SECRET": SECRET, "PIPEGATE_JWT_ALGORITHMS": "HS384",
               "PIPEGATE_JWT_ISSUER": "me", "PIPEGATE_JWT_AUDIENCE": "you",
               "PIPEGATE_JWT_TTL_DAYS": "1"}
        now = time.time()
        _, token = self.parse(token_lines("abc", env, now))
        self.assertEqual(verify(JWTSettings.from_environ(env), token, now), "abc")
        self.assertRaises(TokenError, verify, SETTINGS, token, now)
        self.assertEqual(unverified(token)["exp"], int(now) + DAY)

    def test_missing_secret(self):
        e = self.assertRaises(ConfigError, token_lines, "abc", {}, time.time())
        self.assertIn("PIPEGATE_JWT_SECRET", str(e))

    def test_bad_connection_id(self):
        env = {"PIPEGATE_JWT_SECRET": SECRET}
        self.assertRaises(ConfigError, token_lines, "a/b", env, time.time())
        self.assertRaises(ConfigError, token_lines, None,
                          {**env, "PIPEGATE_CONNECTION_ID": "healthz"}, time.time())


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEGATE_")}
    env.update(extra)
    return env


class CommandLineTests(unittest.TestCase):
    """The real commands, run as subprocesses."""

    def run_command(self, args, env):
        return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    def assertTokenOutput(self, result, expected_id=None):
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, "")
        match = TokenLinesTests.LINES.match(result.stdout)
        self.assertIsNotNone(match, result.stdout)
        cid, token = match.groups()
        if expected_id is not None:
            self.assertEqual(cid, expected_id)
        self.assertEqual(verify(SETTINGS, token, time.time()), cid)
        return cid

    def assertMissingSecret(self, result):
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stdout, "")
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("PIPEGATE_JWT_SECRET", lines[0])

    def test_pipegate_token(self):
        result = self.run_command(["pipegate", "token", "-c", "abc"],
                                  clean_environ(PIPEGATE_JWT_SECRET=SECRET))
        self.assertTokenOutput(result, "abc")

    def test_pipegate_token_connection_id_from_environment(self):
        result = self.run_command(
            ["pipegate", "token"],
            clean_environ(PIPEGATE_JWT_SECRET=SECRET, PIPEGATE_CONNECTION_ID="env-id"))
        self.assertTokenOutput(result, "env-id")

    def test_pipegate_auth_module(self):
        result = self.run_command(["pipegate.auth"], clean_environ(PIPEGATE_JWT_SECRET=SECRET))
        cid = self.assertTokenOutput(result)
        self.assertRegex(cid, r"\A[0-9a-f]{32}\Z")

    def test_pipegate_auth_module_with_id(self):
        result = self.run_command(["pipegate.auth", "--connection-id", "my-app"],
                                  clean_environ(PIPEGATE_JWT_SECRET=SECRET))
        self.assertTokenOutput(result, "my-app")

    def test_token_without_secret(self):
        self.assertMissingSecret(self.run_command(["pipegate", "token", "-c", "abc"],
                                                  clean_environ()))

    def test_auth_module_without_secret(self):
        self.assertMissingSecret(self.run_command(["pipegate.auth"], clean_environ()))

    def test_router_secret(self):
        first = self.run_command(["pipegate", "router-secret"], clean_environ())
        second = self.run_command(["pipegate", "router-secret"], clean_environ())
        for result in (first, second):
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertRegex(result.stdout, r"\A[0-9a-f]{64}\n\Z")
        self.assertNotEqual(first.stdout, second.stdout)


class IdentityTests(unittest.TestCase):
    """Token ids, --shared and --ttl (issue 20)."""

    def test_claims(self):
        now = time.time()
        claims = auth.verify_claims(SETTINGS, mint(SETTINGS, "app", now), now)
        self.assertRegex(claims.jti, r"\A[0-9a-f]{32}\Z")
        self.assertFalse(claims.shared)
        shared = auth.verify_claims(SETTINGS, mint(SETTINGS, "app", now, shared=True, jti="j1"), now)
        self.assertEqual((shared.sub, shared.jti, shared.shared), ("app", "j1", True))

    def test_bad_shared_or_jti_claims_are_refused(self):
        now = int(time.time())
        base = {"sub": "app", "iat": now, "nbf": now, "exp": now + 60, "iss": "pipegate", "aud": "pipegate"}
        for extra in ({"shared": "yes"}, {"jti": 5}, {"jti": ""}, {"jti": "x" * 129}):
            token = jwt.encode({**base, **extra}, SECRET, algorithm="HS256")
            with self.assertRaises(TokenError, msg=extra):
                auth.verify_claims(SETTINGS, token, now)
        # A token minted elsewhere without a jti is still accepted (it cannot share by jti).
        token = jwt.encode(base, SECRET, algorithm="HS256")
        self.assertIsNone(auth.verify_claims(SETTINGS, token, now).jti)

    def test_ttl(self):
        self.assertEqual(auth.parse_ttl("1h"), 3600)
        self.assertEqual(auth.parse_ttl("7d"), 7 * DAY)
        self.assertEqual(auth.parse_ttl("30m"), 1800)
        self.assertEqual(auth.parse_ttl("2w"), 14 * DAY)
        self.assertEqual(auth.parse_ttl("90s"), 90)
        self.assertEqual(auth.parse_ttl("1.5h"), 5400)
        for bad in ("1", "h", "0h", "-1h", "1y", "3651d", "1 h x"):
            with self.assertRaises(ConfigError, msg=bad) as e:
                auth.parse_ttl(bad)
            self.assertIn("--ttl", str(e.exception))
        now = time.time()
        token = mint(SETTINGS, "app", now, ttl_seconds=3600)
        self.assertEqual(unverified(token)["exp"], int(now) + 3600)

    def test_command_line(self):
        # This checkout first on the path (the child runs in _trial_temp).
        root = os.path.dirname(os.path.dirname(os.path.abspath(auth.__file__)))
        env = clean_environ(PIPEGATE_JWT_SECRET=SECRET, PYTHONPATH=root)
        result = subprocess.run(
            [sys.executable, "-m", "pipegate", "token", "-c", "app", "--ttl", "1h", "--shared", "--show-id"],
            env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        match = re.match(r"\AConnection-id: app\nJWT Bearer:    (\S+)\nToken-id:      ([0-9a-f]{32})\n\Z",
                         result.stdout)
        self.assertIsNotNone(match, result.stdout)
        claims = auth.verify_claims(SETTINGS, match.group(1), time.time())
        self.assertEqual((claims.jti, claims.shared), (match.group(2), True))
        self.assertLessEqual(unverified(match.group(1))["exp"] - time.time(), 3600 + 5)
        bad = subprocess.run([sys.executable, "-m", "pipegate", "token", "--ttl", "1y"],
                             env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(bad.returncode, 2)
        self.assertEqual(len(bad.stderr.splitlines()), 1, bad.stderr)
        self.assertIn("--ttl", bad.stderr)
