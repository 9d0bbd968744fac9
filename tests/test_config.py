"""
Tests for L{pipegate.config} and the twistd options of C{pipegate-server} and
C{pipegate-client}.  Every test sets C{options.environ}; C{os.environ} is never read.
"""

from __future__ import annotations

import time

import jwt
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from pipegate import auth, config
from pipegate.http.target import ConnectorConfig, Target
from pipegate.http.relay import RelayConfig
from pipegate.tap import client, server

SECRET = "config-test-secret-" + "0123456789abcdef" * 3
SETTINGS = auth.JWTSettings.from_values(SECRET)
TARGET = "http://127.0.0.1:3000"


def token(cid: str = "abc", settings: auth.JWTSettings = SETTINGS) -> str:
    return auth.mint(settings, cid, time.time())


class HelperTests(unittest.TestCase):

    def test_env_name(self):
        self.assertEqual(config.env_name("max-in-flight"), "PIPEGATE_MAX_IN_FLIGHT")
        self.assertEqual(config.env_name("listen"), "PIPEGATE_LISTEN")
        self.assertEqual(config.env_name("ca-file"), "PIPEGATE_CA_FILE")

    def test_positive_int(self):
        self.assertEqual(config.positive_int("7"), 7)
        for bad in ("0", "-1", "x", "1.5", ""):
            self.assertRaises(ValueError, config.positive_int, bad)

    def test_non_negative_int(self):
        self.assertEqual(config.non_negative_int("0"), 0)
        self.assertEqual(config.non_negative_int("12"), 12)
        for bad in ("-1", "x", "1.5"):
            self.assertRaises(ValueError, config.non_negative_int, bad)

    def test_positive_float(self):
        self.assertEqual(config.positive_float("0.25"), 0.25)
        for bad in ("0", "-1", "x", "nan"):
            self.assertRaises(ValueError, config.positive_float, bad)

    def test_non_negative_float(self):
        self.assertEqual(config.non_negative_float("0"), 0.0)
        self.assertEqual(config.non_negative_float("2.5"), 2.5)
        for bad in ("-0.1", "x", "nan"):
            self.assertRaises(ValueError, config.non_negative_float, bad)


class NumberWordingTests(unittest.TestCase):
    """A mistyped number used to say `invalid literal for int() with base 10: '1M'`."""

    def test_what_was_expected_and_what_was_given(self):
        for convert, bad, expected in (
                (config.positive_int, "1M", "expected a whole number, got '1M'"),
                (config.non_negative_int, "1.5", "expected a whole number, got '1.5'"),
                (config.auto_or_non_negative_int, "lots", "expected a whole number, got 'lots'"),
                (config.positive_float, "5s", "expected a number, got '5s'"),
                (config.non_negative_float, "", "expected a number, got ''")):
            e = self.assertRaises(ValueError, convert, bad)
            self.assertEqual(str(e), expected)

    def test_a_service_option_says_it(self):
        options = server.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": SECRET}
        e = self.assertRaises(usage.UsageError, options.parseOptions, ["--max-body-bytes", "10MB"])
        self.assertEqual(str(e), "--max-body-bytes: expected a whole number, got '10MB'")


class EndpointHintTests(unittest.TestCase):
    """`--listen 8000` or `--connect gw:7000` said only "Unknown endpoint type: '8000'"."""

    def test_a_port_or_host_port_alone_gets_the_string_to_write(self):
        from pipegate.tap import gateway, provider

        options = server.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": SECRET}
        e = self.assertRaises(usage.UsageError, options.parseOptions, ["--listen", "8000"])
        self.assertTrue(str(e).startswith("--listen: "), str(e))
        self.assertTrue(str(e).endswith("(write tcp:8000 for TCP port 8000)"), str(e))
        options = gateway.Options()
        options.environ = {"PIPEGATE_ROUTER": "ab" * 32}
        e = self.assertRaises(usage.UsageError, options.parseOptions, ["--mux", "7000"])
        self.assertTrue(str(e).endswith("(write tcp:7000 for TCP port 7000)"), str(e))
        options = provider.Options()
        options.environ = {"PIPEGATE_ROUTER": "ab" * 32}
        e = self.assertRaises(usage.UsageError, options.parseOptions, ["--connect", "gw.example.com:7000"])
        self.assertTrue(str(e).endswith("(write tcp:gw.example.com:7000)"), str(e))
        options = provider.Options()
        options.environ = {"PIPEGATE_ROUTER": "ab" * 32}
        e = self.assertRaises(usage.UsageError, options.parseOptions, ["--connect", "tcp:gw:7000", "--metrics", "9100"])
        self.assertTrue(str(e).endswith("(write tcp:9100 for TCP port 9100)"), str(e))
        self.assertEqual(config.endpoint_hint("tcpp:8000"), "")


class CannotListenTests(unittest.TestCase):
    """L{config.cannot_listen}: the one line for a listener that cannot bind."""

    def error(self, interface, port, errno, strerror):
        from twisted.internet.error import CannotListenError
        return CannotListenError(interface, port, OSError(errno, strerror))

    def test_names_the_option_by_its_port(self):
        options = {"listen": "tcp:8000", "metrics": "tcp:9100:interface=127.0.0.1", "mux": ["tcp:7000"],
                   "domain": None, "max-in-flight": 100}
        self.assertEqual(config.cannot_listen(options, self.error("127.0.0.1", 9100, 98, "Address already in use")),
                         "--metrics tcp:9100:interface=127.0.0.1: cannot listen on 127.0.0.1:9100: Address already "
                         "in use (another program, perhaps another PipeGate, holds it: stop that one or choose "
                         "another port)")
        self.assertTrue(config.cannot_listen(options, self.error("", 7000, 13, "Permission denied")).startswith(
            "--mux tcp:7000: cannot listen on any:7000: Permission denied (ports below 1024"))
        self.assertEqual(config.cannot_listen({"listen": "tcp:port=80"}, self.error("10.0.0.1", 80, 99, "x")),
                         "--listen tcp:port=80: cannot listen on 10.0.0.1:80: x (this host has no such address: "
                         "use one of its own, or 0.0.0.0)")

    def test_no_option_found_still_says_where(self):
        self.assertEqual(config.cannot_listen({"listen": "tcp:8000"}, self.error("", 8001, 1, "nope")),
                         "cannot listen on any:8001: nope")

    def test_port_out_of_range(self):
        self.assertEqual(config.cannot_listen({"listen": "tcp:8000", "metrics": "tcp:99999"}, OverflowError()),
                         "--metrics tcp:99999: the port must be 0 to 65535")


class _Base(config.EnvOptions):
    optParameters = [["count", None, "3", "A count.", config.positive_int],
                     ["name", None, "x", "A name (no converter)."]]


class _Derived(_Base):
    optParameters = [["delay", None, "0.5", "A delay.", config.non_negative_float],
                     ["label", None, None, "A label.", None]]


class ConverterColumnTests(unittest.TestCase):
    """A converter is the fifth item of its optParameters row; L{config.EnvOptions} applies it."""

    def parse(self, klass, argv, environ=None):
        options = klass()
        options.environ = environ or {}
        options.parseOptions(argv)
        return options

    def test_defaults_flags_and_variables_are_converted(self):
        options = self.parse(_Derived, ["--count", "7"], {"PIPEGATE_DELAY": "2"})
        self.assertEqual((options["count"], options["delay"], options["name"], options["label"]),
                         (7, 2.0, "x", None))
        self.assertEqual(self.parse(_Derived, [])["count"], 3)

    def test_bad_flag_names_its_option(self):
        # usage.Options' own coercion would say "Parameter type enforcement failed".
        e = self.assertRaises(usage.UsageError, self.parse, _Derived, ["--count", "0"])
        self.assertEqual(str(e), "--count: must be greater than 0")
        e = self.assertRaises(usage.UsageError, self.parse, _Derived, [], {"PIPEGATE_DELAY": "-1"})
        self.assertEqual(str(e), "--delay: must be 0 or more")

    def test_rows_keep_four_items_and_converters_are_inherited(self):
        self.assertEqual([len(row) for row in _Base.optParameters + _Derived.optParameters], [4, 4, 4, 4])
        self.assertEqual(_Derived.converters, {"count": config.positive_int,
                                               "delay": config.non_negative_float})
        self.assertEqual(_Base.converters, {"count": config.positive_int})

    def test_every_service_converts_its_numbers(self):
        # Each service option whose default is a number has a converter (none left as a string).
        from pipegate.tap import gateway, provider
        for options in (server.Options, client.Options, gateway.Options, provider.Options):
            for name, _short, default, _help in options.optParameters:
                if default is not None and default.replace(".", "", 1).isdigit():
                    self.assertIn(name, options.converters, (options, name))


    def test_every_service_bounds_its_small_http_listeners(self):
        # --metrics on all four, the gateway's --unlimited, the provider's --resolver
        # (pipegate.accept.SiteLimits; docs/configuration.md).
        from pipegate.tap import gateway, provider
        for options in (server.Options, client.Options, gateway.Options, provider.Options):
            defaults = {row[0]: row[2] for row in options.optParameters}
            self.assertEqual([defaults.get(name) for name in ("api-max-conns-per-ip", "api-max-conns",
                                                              "api-idle-timeout")], ["16", "256", "30"], options)


    def test_the_mux_listeners_connection_rate(self):
        # gateway, provider and the relay's hub: --mux-conn-rate-per-ip, in bursts of the per-IP cap
        from pipegate.mux.options import mux_rate
        from pipegate.tap import gateway

        options = gateway.Options()
        options.environ = {"PIPEGATE_ROUTER": "ab" * 32, "PIPEGATE_MUX": "tcp:0"}
        options.parseOptions([])
        rate = mux_rate(options)
        self.assertEqual((rate.rate, rate.burst), (10, 100))
        options.parseOptions(["--mux-conn-rate-per-ip", "0"])
        self.assertIsNone(mux_rate(options))
        relay = server.Options()
        relay.environ = {"PIPEGATE_JWT_SECRET": SECRET, "PIPEGATE_MUX_CONN_RATE_PER_IP": "3"}
        relay.parseOptions([])
        self.assertEqual(mux_rate(relay).rate, 3)


class ServerOptionsTests(unittest.TestCase):

    def parse(self, args=(), secret=SECRET, **env) -> server.Options:
        options = server.Options()
        options.environ = dict(env, **({"PIPEGATE_JWT_SECRET": secret} if secret else {}))
        options.parseOptions(list(args))
        return options

    def assertUsage(self, *names, args=(), secret=SECRET, **env) -> str:
        e = self.assertRaises(usage.UsageError, self.parse, args, secret, **env)
        for name in names:
            self.assertIn(name, str(e))
        return str(e)

    def test_defaults(self):
        o = self.parse()
        self.assertEqual(o["listen"], "tcp:8000")
        self.assertIsNone(o["domain"])
        self.assertFalse(o["access-log"])
        self.assertEqual(o["jwt"], SETTINGS)
        # The option defaults are those of RelayConfig, converted to numbers.
        defaults = RelayConfig(jwt=SETTINGS)
        for option in ("max-body-bytes", "max-in-flight", "request-timeout", "offline-grace",
                       "ping-interval", "idle-timeout", "max-window", "window-budget"):
            value = o[option]
            self.assertNotIsInstance(value, str)
            self.assertEqual(value, getattr(defaults, option.replace("-", "_")), option)
        self.assertEqual(server.relay_config(o), defaults)

    def test_variable_fills_option(self):
        o = self.parse(PIPEGATE_MAX_IN_FLIGHT="7", PIPEGATE_REQUEST_TIMEOUT="2.5",
                       PIPEGATE_MAX_BODY_BYTES="1024", PIPEGATE_LISTEN="tcp:9000",
                       PIPEGATE_DOMAIN="tunnels.example", PIPEGATE_IDLE_TIMEOUT="0",
                       PIPEGATE_OFFLINE_GRACE="3", PIPEGATE_PING_INTERVAL="0")
        self.assertEqual(o["max-in-flight"], 7)
        self.assertIsInstance(o["max-in-flight"], int)
        self.assertEqual(o["request-timeout"], 2.5)
        self.assertEqual(o["max-body-bytes"], 1024)
        self.assertEqual(o["listen"], "tcp:9000")
        self.assertEqual(o["domain"], "tunnels.example")
        self.assertEqual(o["idle-timeout"], 0.0)
        self.assertEqual(o["offline-grace"], 3.0)
        self.assertEqual(o["ping-interval"], 0.0)

    def test_flag_beats_variable(self):
        o = self.parse(["--max-in-flight", "9", "--listen", "tcp:9001"],
                       PIPEGATE_MAX_IN_FLIGHT="7", PIPEGATE_LISTEN="tcp:9000")
        self.assertEqual(o["max-in-flight"], 9)
        self.assertEqual(o["listen"], "tcp:9001")
        o = self.parse(["-l", "tcp:9002"], PIPEGATE_LISTEN="tcp:9000")
        self.assertEqual(o["listen"], "tcp:9002")

    def test_flag_beats_bad_variable(self):
        o = self.parse(["--max-in-flight", "9"], PIPEGATE_MAX_IN_FLIGHT="lots")
        self.assertEqual(o["max-in-flight"], 9)

    def test_boolean_flag_from_variable(self):
        for value in ("1", "true", "YES", " on "):
            self.assertTrue(self.parse(PIPEGATE_ACCESS_LOG=value)["access-log"], value)
        for value in ("0", "false", "No", "off", ""):
            self.assertFalse(self.parse(PIPEGATE_ACCESS_LOG=value)["access-log"], value)

    def test_boolean_flag_beats_variable(self):
        self.assertTrue(self.parse(["--access-log"], PIPEGATE_ACCESS_LOG="false")["access-log"])

    def test_bad_boolean_variable(self):
        self.assertUsage("PIPEGATE_ACCESS_LOG", PIPEGATE_ACCESS_LOG="maybe")

    def test_bad_values_name_the_option(self):
        cases = [
            ("max-in-flight", "abc"), ("max-in-flight", "0"), ("max-in-flight", "-3"),
            ("max-in-flight", "1.5"), ("max-body-bytes", "-1"), ("max-body-bytes", "1k"),
            ("request-timeout", "-1"), ("request-timeout", "soon"), ("offline-grace", "-1"),
            ("ping-interval", "nan"), ("idle-timeout", "-0.5"),
        ]
        for option, value in cases:
            message = self.assertUsage(f"--{option}", **{config.env_name(option): value})
            self.assertTrue(message.startswith(f"--{option}:"), message)
            message = self.assertUsage(f"--{option}", args=[f"--{option}", value])
            self.assertTrue(message.startswith(f"--{option}:"), message)

    def test_missing_secret(self):
        self.assertUsage("PIPEGATE_JWT_SECRET", secret=None)

    def test_short_secret(self):
        self.assertUsage("PIPEGATE_JWT_SECRET", secret="x" * 15)

    def test_jwt_options(self):
        o = self.parse(["--jwt-algorithms", "HS256,HS512", "--jwt-issuer", "me"],
                       PIPEGATE_JWT_AUDIENCE="you")
        self.assertEqual(o["jwt"].algorithms, ("HS256", "HS512"))
        self.assertEqual(o["jwt"].issuer, "me")
        self.assertEqual(o["jwt"].audience, "you")
        self.assertEqual(o["jwt"].secret, SECRET)
        o = self.parse(PIPEGATE_JWT_ALGORITHMS='["HS384"]')
        self.assertEqual(o["jwt"].algorithms, ("HS384",))

    def test_bad_jwt_algorithms(self):
        self.assertUsage("PIPEGATE_JWT_ALGORITHMS", args=["--jwt-algorithms", "RS256"])
        self.assertUsage("PIPEGATE_JWT_ALGORITHMS", PIPEGATE_JWT_ALGORITHMS="none")

    def test_bad_listen(self):
        for listen in ("bogus:1", "tcp:abc", "tcp:8000:nonsense=1"):
            message = self.assertUsage("--listen", args=["--listen", listen])
            self.assertTrue(message.startswith("--listen:"), message)
        self.assertUsage("--listen", PIPEGATE_LISTEN="bogus:1")

    def test_good_listen_strings(self):
        for listen in ("tcp:0", "tcp:8080:interface=127.0.0.1", "unix:/tmp/pipegate.sock",
                       "haproxy:tcp:8000:interface=127.0.0.1"):
            self.assertEqual(self.parse(["--listen", listen])["listen"], listen)

    def test_empty_domain(self):
        for domain in ("", ".", "..."):
            self.assertUsage("--domain", args=["--domain", domain])

    def test_relay_config(self):
        o = self.parse(["--domain", ".tunnels.example.", "--access-log"],
                       PIPEGATE_MAX_IN_FLIGHT="7", PIPEGATE_MAX_BODY_BYTES="10")
        rc = server.relay_config(o)
        self.assertEqual(rc.domain, "tunnels.example")
        self.assertEqual(rc.max_in_flight, 7)
        self.assertEqual(rc.max_body_bytes, 10)
        self.assertIs(rc.access_log, True)
        self.assertEqual(rc.jwt, SETTINGS)
        self.assertIsNone(server.relay_config(self.parse()).domain)

    def test_trusted_proxies(self):
        trusted = lambda o: [str(n) for n in server.relay_config(o).trusted_proxies.networks]
        self.assertIsNone(server.relay_config(self.parse()).trusted_proxies)   # nobody: no proxy code loaded
        o = self.parse(["--trusted-proxy", "10.0.0.0/8, 127.0.0.1", "--trusted-proxy", "::1"])
        self.assertEqual(trusted(o), ["10.0.0.0/8", "127.0.0.1/32", "::1/128"])
        self.assertEqual(trusted(self.parse(PIPEGATE_TRUSTED_PROXY="192.0.2.0/24,10.1.1.1")),
                         ["192.0.2.0/24", "10.1.1.1/32"])
        # A flag replaces the variable, as for --ingress-policy.
        o = self.parse(["--trusted-proxy", "127.0.0.1"], PIPEGATE_TRUSTED_PROXY="192.0.2.0/24")
        self.assertEqual(trusted(o), ["127.0.0.1/32"])
        message = self.assertUsage("--trusted-proxy", args=["--trusted-proxy", "10.0.0.0/8,nginx"])
        self.assertTrue(message.startswith("--trusted-proxy: 'nginx' is not an IP address"), message)
        self.assertUsage("--trusted-proxy", PIPEGATE_TRUSTED_PROXY="10.0.0.0/40")

    def test_unknown_flag(self):
        self.assertRaises(usage.UsageError, self.parse, ["--no-such-option"])


class ClientOptionsTests(unittest.TestCase):

    def parse(self, *args, **env) -> client.Options:
        options = client.Options()
        options.environ = env
        options.parseOptions(list(args))
        return options

    def assertUsage(self, *names, args=(), **env) -> str:
        e = self.assertRaises(usage.UsageError, self.parse, *args, **env)
        for name in names:
            self.assertIn(name, str(e))
        return str(e)

    def test_token_flag(self):
        tok = token()
        o = self.parse("--token", tok, TARGET, "ws://relay.example:8080/abc")
        self.assertEqual(o["token"], tok)
        self.assertEqual(o["tunnel-id"], "abc")
        self.assertEqual(o["server-url"], "ws://relay.example:8080/abc")
        self.assertEqual(o["target"], Target(b"http", b"127.0.0.1", 3000, b""))
        # The option defaults are those of ConnectorConfig, converted to numbers.
        defaults = ConnectorConfig(target=o["target"])
        for option in ("max-streams", "connect-timeout", "ping-interval", "max-window", "window-budget",
                       "drain-timeout"):
            self.assertNotIsInstance(o[option], str)
            self.assertEqual(o[option], getattr(defaults, option.replace("-", "_")), option)

    def test_drain_timeout(self):
        # Issue 18 item 2: how long requests in flight may take on SIGTERM.
        self.assertEqual(self.parse("--token", token(), TARGET, "ws://relay/abc")["drain-timeout"], 30.0)
        o = self.parse("--token", token(), TARGET, "ws://relay/abc", PIPEGATE_DRAIN_TIMEOUT="2.5")
        self.assertEqual(o["drain-timeout"], 2.5)
        self.assertUsage("--drain-timeout", args=("--drain-timeout", "-1", "--token", token(), TARGET, "ws://r/abc"))

    def test_path_prefix_in_server_url_is_refused(self):
        # Issue 18 item 3: with wss://host/tunnels/<id> the connector printed a public URL
        # that 404s (the relay routes by the first path segment).  Now startup stops.
        message = self.assertUsage("SERVER_URL", args=("--token", token(), TARGET, "wss://relay/tunnels/abc"))
        self.assertEqual(message, "SERVER_URL: a path prefix (/tunnels) is not supported; the relay serves "
                                  "/<connection-id> at the root of its host: ws(s)://host[:port][/<connection-id>]")
        self.assertUsage("SERVER_URL", args=("--token", token(), TARGET, "ws://relay/a/b/abc/"))
        self.assertEqual(self.parse("--token", token(), TARGET, "ws://relay/abc/")["tunnel-id"], "abc")

    def test_token_short_flag_and_no_path(self):
        tok = token("xyz")
        o = self.parse("-t", tok, TARGET, "wss://relay.example")
        self.assertEqual(o["tunnel-id"], "xyz")
        self.assertEqual(o["server-url"], "wss://relay.example")

    def test_token_from_variable(self):
        tok = token()
        o = self.parse(TARGET, "ws://relay/abc", PIPEGATE_TOKEN=tok)
        self.assertEqual(o["token"], tok)
        self.assertEqual(o["tunnel-id"], "abc")

    def test_flag_beats_variable(self):
        flag, variable = token("abc"), token("xyz")
        o = self.parse("--token", flag, TARGET, "ws://relay", PIPEGATE_TOKEN=variable)
        self.assertEqual(o["token"], flag)
        self.assertEqual(o["tunnel-id"], "abc")

    def test_token_from_url(self):
        tok = token()
        o = self.parse(TARGET, "ws://relay.example:8080/abc?token=" + tok)
        self.assertEqual(o["token"], tok)
        self.assertEqual(o["tunnel-id"], "abc")
        self.assertEqual(o["server-url"], "ws://relay.example:8080/abc")
        self.assertNotIn(tok, o["server-url"])
        self.assertNotIn("token", o["server-url"])

    def test_url_token_removed_even_when_flag_given(self):
        flag, in_url = token("abc"), token("abc")
        o = self.parse("--token", flag, TARGET, "ws://relay/abc?token=" + in_url)
        self.assertEqual(o["token"], flag)
        self.assertNotIn(in_url, o["server-url"])

    def test_urls_from_variables(self):
        tok = token()
        o = self.parse(PIPEGATE_TARGET_URL="http://localhost:5000/app",
                       PIPEGATE_SERVER_URL="ws://relay/abc", PIPEGATE_TOKEN=tok)
        self.assertEqual(o["target"], Target(b"http", b"localhost", 5000, b"/app"))
        self.assertEqual(o["server-url"], "ws://relay/abc")

    def test_minted_with_path_id(self):
        env = {"PIPEGATE_JWT_SECRET": SECRET}
        o = self.parse(TARGET, "ws://relay/my-app", **env)
        self.assertEqual(o["tunnel-id"], "my-app")
        self.assertEqual(auth.verify(auth.JWTSettings.from_environ(env), o["token"], time.time()),
                         "my-app")

    def test_minted_uses_jwt_variables(self):
        env = {"PIPEGATE_JWT_SECRET": SECRET, "PIPEGATE_JWT_ISSUER": "me",
               "PIPEGATE_JWT_AUDIENCE": "you", "PIPEGATE_JWT_ALGORITHMS": "HS384"}
        o = self.parse(TARGET, "ws://relay/abc", **env)
        self.assertEqual(auth.verify(auth.JWTSettings.from_environ(env), o["token"], time.time()),
                         "abc")
        self.assertRaises(auth.TokenError, auth.verify, SETTINGS, o["token"], time.time())

    def test_minted_with_connection_id_variable(self):
        o = self.parse(TARGET, "ws://relay", PIPEGATE_JWT_SECRET=SECRET,
                       PIPEGATE_CONNECTION_ID="from-env")
        self.assertEqual(o["tunnel-id"], "from-env")
        self.assertEqual(auth.verify(SETTINGS, o["token"], time.time()), "from-env")

    def test_minted_random_id(self):
        o = self.parse(TARGET, "ws://relay", PIPEGATE_JWT_SECRET=SECRET)
        self.assertRegex(o["tunnel-id"], r"\A[0-9a-f]{32}\Z")
        self.assertEqual(auth.verify(SETTINGS, o["token"], time.time()), o["tunnel-id"])

    def test_minting_refusals(self):
        self.assertUsage("PIPEGATE_JWT_SECRET", args=(TARGET, "ws://relay/abc"),
                         PIPEGATE_JWT_SECRET="short")
        self.assertUsage("connection id", args=(TARGET, "ws://relay/healthz"),
                         PIPEGATE_JWT_SECRET=SECRET)

    def test_no_token(self):
        message = self.assertUsage("--token", args=(TARGET, "ws://relay/abc"))
        self.assertIn("PIPEGATE_JWT_SECRET", message)

    def test_sub_path_mismatch(self):
        self.assertUsage("SERVER_URL", "'xyz'", "'abc'",
                         args=("--token", token("abc"), TARGET, "ws://relay/xyz"))
        self.assertUsage("SERVER_URL", args=(TARGET, "ws://relay/xyz?token=" + token("abc")))
        self.assertUsage("SERVER_URL", args=(TARGET, "ws://relay/xyz"), PIPEGATE_TOKEN=token())

    def test_a_pasted_token_with_spaces_or_its_label_is_taken(self):
        # Copying the `JWT Bearer:    eyJ...` line of `pipegate token` (or a token with the
        # spaces around it, or "Bearer eyJ...") used to say "not a PipeGate token".
        good = token("abc")
        for pasted in (f" {good} ", f"Bearer {good}", f"JWT Bearer:    {good}\n"):
            options = self.parse("--token", pasted, TARGET, "ws://127.0.0.1:8000/abc")
            self.assertEqual(options["token"], good)
            options = self.parse(TARGET, "ws://127.0.0.1:8000/abc", PIPEGATE_TOKEN=pasted)
            self.assertEqual(options["token"], good)

    def test_not_a_token(self):
        for bad in ("garbage", "a.b.c", auth.mint(SETTINGS, "abc", 0)[:20]):
            self.assertUsage("--token", args=("--token", bad, TARGET, "ws://relay"))

    def test_token_with_invalid_subject(self):
        bad = jwt.encode({"sub": "a/b"}, SECRET, algorithm="HS256")
        self.assertUsage("--token", args=("--token", bad, TARGET, "ws://relay"))

    def test_bad_target_url(self):
        for url in ("ftp://127.0.0.1/", "127.0.0.1:3000", "http://", "ws://127.0.0.1:3000",
                    "/just/a/path"):
            self.assertUsage("TARGET_URL", args=("--token", token(), url, "ws://relay/abc"))

    def test_bad_server_url(self):
        for url in ("http://relay/abc", "https://relay", "ws://", "ws:///abc", "relay:8080",
                    "ws://relay:99999/abc", "ws://relay:port/abc"):
            self.assertUsage("SERVER_URL", args=("--token", token(), TARGET, url))
        # The relay's public URL given instead: say which scheme to write.
        self.assertUsage("SERVER_URL", "(the relay's WebSocket URL: wss://relay/abc)",
                         args=("--token", token(), TARGET, "https://relay/abc"))
        secret = token()
        message = self.assertUsage("(the relay's WebSocket URL: ws://relay:8000/abc)",
                                   args=(TARGET, f"http://relay:8000/abc?token={secret}"))
        self.assertNotIn(secret, message)

    def test_missing_urls(self):
        self.assertUsage("TARGET_URL", "SERVER_URL", args=("--token", token()))
        self.assertUsage("TARGET_URL", "SERVER_URL", args=("--token", token(), TARGET))

    def test_too_many_arguments(self):
        self.assertRaises(usage.UsageError, self.parse, "--token", token(), TARGET,
                          "ws://relay/abc", "extra")

    def test_numeric_options(self):
        o = self.parse("--token", token(), "--max-streams", "3", TARGET, "ws://relay",
                       PIPEGATE_MAX_STREAMS="7", PIPEGATE_CONNECT_TIMEOUT="2.5",
                       PIPEGATE_PING_INTERVAL="0")
        self.assertEqual(o["max-streams"], 3)
        self.assertEqual(o["connect-timeout"], 2.5)
        self.assertEqual(o["ping-interval"], 0.0)

    def test_bad_numeric_options(self):
        args = ("--token", token(), TARGET, "ws://relay")
        self.assertUsage("--max-streams", args=args, PIPEGATE_MAX_STREAMS="0")
        self.assertUsage("--max-streams", args=("--max-streams", "x") + args)
        self.assertUsage("--connect-timeout", args=args, PIPEGATE_CONNECT_TIMEOUT="0")
        self.assertUsage("--ping-interval", args=args, PIPEGATE_PING_INTERVAL="-1")

    def test_ca_file(self):
        args = ("--token", token(), TARGET, "wss://relay")
        missing = self.mktemp()
        self.assertUsage("--ca-file", args=("--ca-file", missing) + args)
        present = FilePath(self.mktemp())
        present.parent().makedirs(ignoreExistingDirectory=True)
        present.setContent(b"")
        self.assertUsage("--ca-file", args=("--ca-file", present.path) + args)   # empty: no certificate
        from tests.test_systemd import make_cert

        present.setContent(make_cert()[0])
        o = self.parse("--ca-file", present.path, *args)
        self.assertEqual(o["ca-file"], present.path)
        o = self.parse(*args, PIPEGATE_CA_FILE=present.path)
        self.assertEqual(o["ca-file"], present.path)


class IngressPolicyVariable(unittest.TestCase):
    """PIPEGATE_INGRESS_POLICY is read by all three services; a flag replaces it."""

    def options(self, module, environ, argv=()):
        options = module.Options()
        options.environ = environ
        options.parseOptions(list(argv))
        return options

    def test_read_by_every_service(self):
        from pipegate.tap import gateway, provider, server

        deny = '{"ips": {"192.0.2.1": {"allow": false}}}'
        common = {"PIPEGATE_ROUTER": "ab" * 32, "PIPEGATE_MUX": "tcp:0", "PIPEGATE_INGRESS_POLICY": deny}
        self.assertFalse(self.options(gateway, common)["policy"].empty)
        self.assertIn(b"192.0.2.1", self.options(provider, common)["policy"])
        relay_env = {"PIPEGATE_JWT_SECRET": "x" * 40, "PIPEGATE_INGRESS_POLICY": deny}
        self.assertFalse(self.options(server, relay_env)["policy"].empty)
        replaced = self.options(server, relay_env, ["--ingress-policy", "{}"])
        self.assertTrue(replaced["policy"].empty)
        bad = dict(relay_env, PIPEGATE_INGRESS_POLICY='{"ips": {"nope": {}}}')
        self.assertRaises(usage.UsageError, self.options, server, bad)


class ProviderServiceOptions(unittest.TestCase):
    """--service (short form) with --services, from flags and from PIPEGATE_SERVICE."""

    def options(self, argv=(), **env):
        from pipegate.tap import provider
        options = provider.Options()
        options.environ = dict({"PIPEGATE_ROUTER": "ab" * 32, "PIPEGATE_CONNECT": "tcp:127.0.0.1:1"}, **env)
        options.parseOptions(list(argv))
        return options

    def described(self, options) -> list[str]:
        return [s.describe() for s in options["service-list"]]

    def test_flags_merged_with_services(self):
        o = self.options(["--service", "2222:127.0.0.1:22", "--service", "5353:10.0.0.5:53/udp",
                          "--services", '[{"gatePort": 8080, "serviceHost": "web", "servicePort": 80}]'])
        self.assertEqual(self.described(o), ["2222/tcp -> 127.0.0.1:22", "5353/udp -> 10.0.0.5:53",
                                             "8080/tcp -> web:80"])

    def test_variable_is_a_space_separated_list_a_flag_replaces(self):
        self.assertEqual(self.described(self.options(PIPEGATE_SERVICE="1:a:1 2:b:2/udp")),
                         ["1/tcp -> a:1", "2/udp -> b:2"])
        self.assertEqual(self.described(self.options(["--service", "3:c:3"], PIPEGATE_SERVICE="1:a:1")),
                         ["3/tcp -> c:3"])

    def test_bad_values_name_the_option(self):
        e = self.assertRaises(usage.UsageError, self.options, ["--service", "2222:127.0.0.1"])
        self.assertTrue(str(e).startswith("--service: '2222:127.0.0.1': expected GATE_PORT:HOST:PORT"), str(e))
        e = self.assertRaises(usage.UsageError, self.options, [
            "--service", "80:a:1", "--services", '[{"gatePort": 80, "serviceHost": "b", "servicePort": 2}]'])
        self.assertIn("gatePort 80/tcp is ambiguous", str(e))
        e = self.assertRaises(usage.UsageError, self.options, ["--service", "22:a:22", "--service", "22:a:23"])
        self.assertEqual(str(e), "--service: gatePort 22/tcp is ambiguous: 22/tcp -> a:22 and 22/tcp -> a:23")

    def test_the_short_form_given_to_services_points_to_service(self):
        e = self.assertRaises(usage.UsageError, self.options, ["--services", "2222:127.0.0.1:22"])
        self.assertEqual(str(e), "--services: 2222:127.0.0.1:22: no such file"
                                 " (for 2222:127.0.0.1:22 as one service, write --service 2222:127.0.0.1:22)")
        e = self.assertRaises(usage.UsageError, self.options, ["--services", "missing.json"])
        self.assertEqual(str(e), "--services: missing.json: no such file")


class IdentityOptions(unittest.TestCase):
    """--basic-auth, --allow, --deny, --shared on the connector; --revoked on the relay (issue 20)."""

    def client(self, *args, **env) -> client.Options:
        options = client.Options()
        options.environ = env
        options.parseOptions(list(args))
        return options

    def test_visitor_policy_from_flags_and_variables(self):
        from pipegate.http.visitors import VisitorPolicy

        o = self.client("--token", token("app"), "--basic-auth", "ann:pw", "--basic-auth", "bob:x:y",
                        "--allow", "10.0.0.0/8", "--deny", "10.1.2.3", TARGET, "ws://relay.example/app")
        self.assertEqual(o["visitor-policy"], VisitorPolicy.from_options(
            "app", ["ann:pw", "bob:x:y"], ["10.0.0.0/8"], ["10.1.2.3"]))
        o = self.client("--token", token("app"), TARGET, "ws://relay.example/app",
                        PIPEGATE_BASIC_AUTH="ann:pw bob:x:y", PIPEGATE_ALLOW="10.0.0.0/8 ::1",
                        PIPEGATE_DENY="10.1.2.3")
        self.assertEqual(o["visitor-policy"], VisitorPolicy.from_options(
            "app", ["bob:x:y", "ann:pw"], ["::1", "10.0.0.0/8"], ["10.1.2.3"]))
        # A flag replaces the variable's list.
        o = self.client("--token", token("app"), "--allow", "127.0.0.1", TARGET, "ws://relay.example/app",
                        PIPEGATE_ALLOW="10.0.0.0/8")
        self.assertEqual([str(n) for n in o["visitor-policy"].allow], ["127.0.0.1/32"])
        self.assertTrue(self.client("--token", token("app"), TARGET, "ws://relay.example/app")["visitor-policy"].empty)

    def test_bad_values_name_the_option_and_hide_the_password(self):
        for args, name in ((["--basic-auth", "annsecretpw"], "--basic-auth"), (["--allow", "10.0.0.0/40"], "--allow"),
                           (["--deny", "nowhere"], "--deny"),
                           (["--basic-auth", "ann:secretpw", "--basic-auth", "ann:secretpw2"], "--basic-auth")):
            e = self.assertRaises(usage.UsageError, self.client, "--token", token("app"), *args, TARGET,
                                  "ws://relay.example/app")
            self.assertIn(name, str(e))
            self.assertNotIn("secretpw", str(e))

    def test_shared_self_minted_token(self):
        o = self.client(TARGET, "ws://relay.example/app", PIPEGATE_JWT_SECRET=SECRET, PIPEGATE_SHARED="true")
        self.assertTrue(auth.verify_claims(SETTINGS, o["token"], time.time()).shared)
        o = self.client(TARGET, "ws://relay.example/app", PIPEGATE_JWT_SECRET=SECRET)
        claims = auth.verify_claims(SETTINGS, o["token"], time.time())
        self.assertFalse(claims.shared)
        self.assertRegex(claims.jti, r"\A[0-9a-f]{32}\Z")

    def test_ids_differing_in_case_are_one(self):
        o = self.client("--token", token("MyApp"), TARGET, "ws://relay.example/myapp")
        self.assertEqual(o["tunnel-id"], "MyApp")

    def test_revoked_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("abc # one\nmyapp\n")
        o = server.Options()
        o.environ = {"PIPEGATE_JWT_SECRET": SECRET, "PIPEGATE_REVOKED": path}
        o.parseOptions([])
        self.assertEqual(o["revocations"].current.entries, frozenset({"abc", "myapp"}))
        o = server.Options()
        o.environ = {"PIPEGATE_JWT_SECRET": SECRET}
        e = self.assertRaises(usage.UsageError, o.parseOptions, ["--revoked", path + ".missing"])
        self.assertTrue(str(e).startswith("--revoked:"), str(e))

    def test_relay_service_watches_the_file_and_reloads_on_sighup(self):
        from twisted.internet.testing import MemoryReactorClock

        from pipegate.http.revocation import RevocationWatcher
        from pipegate.tlsreload import ReloadOnSignal

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("abc\n")
        o = server.Options()
        o.environ = {"PIPEGATE_JWT_SECRET": SECRET}
        o.parseOptions(["--revoked", path, "--listen", "tcp:0:interface=127.0.0.1"])
        reactor = MemoryReactorClock()
        top = server.makeService(o, reactor)
        services = list(top)
        relay = next(s for s in services if isinstance(s, server.Relay))
        watcher = next(s for s in services if isinstance(s, RevocationWatcher))
        hup = next(s for s in services if isinstance(s, ReloadOnSignal))
        self.assertEqual(relay.tunnels.revocations.entries, frozenset({"abc"}))
        with open(path, "w") as f:
            f.write("def\n")
        hup.reload()
        self.assertEqual(relay.tunnels.revocations.entries, frozenset({"def"}))
        watcher.startService()
        self.addCleanup(watcher.stopService)
        with open(path, "w") as f:
            f.write("ghi\n")
        reactor.advance(2.0)
        self.assertEqual(relay.tunnels.revocations.entries, frozenset({"ghi"}))
