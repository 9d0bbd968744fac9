"""The Docker options of pipegate-provider and pipegate-gateway (parsing, environment, errors)."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial import unittest

from pipegate.tap import gateway, provider
from pipegate.tap.dockeropts import optional_docker_value

SECRET = "ab" * 32


def parse(tap, argv: list[str], environ: dict | None = None):
    options = tap.Options()
    options.environ = environ or {}
    base = ["--router", SECRET, "--connect", "tcp:gw.example:7000"]
    options.parseOptions(base + argv)
    return options


class DockerOptionTests(unittest.TestCase):

    def test_off_by_default(self):
        for tap in (provider, gateway):
            options = parse(tap, [])
            self.assertIsNone(options["docker-endpoint"])
            top = tap.makeService(options, MemoryReactorClock())
            self.assertFalse([s for s in top if type(s).__name__ in ("DockerDiscovery", "HelperManager")])

    def test_optional_value(self):
        self.assertEqual(optional_docker_value(["--docker"]), ["--docker="])
        self.assertEqual(optional_docker_value(["--docker", "--network", "x"]), ["--docker=", "--network", "x"])
        self.assertEqual(optional_docker_value(["--docker", "/run/d.sock"]), ["--docker", "/run/d.sock"])
        for tap in (provider, gateway):
            self.assertEqual(parse(tap, ["--docker"])["docker-endpoint"], "unix:/var/run/docker.sock")
            self.assertEqual(parse(tap, ["--docker", "--refresh", "5"])["refresh"], 5.0)
            self.assertEqual(parse(tap, ["--docker", "unix:///run/d.sock"])["docker-endpoint"], "unix:/run/d.sock")
            self.assertEqual(parse(tap, ["--docker=/run/e.sock"])["docker-endpoint"], "unix:/run/e.sock")

    def test_docker_host(self):
        env = {"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}
        self.assertEqual(parse(provider, ["--docker"], env)["docker-endpoint"], "unix:/run/user/1000/docker.sock")
        # An explicit socket beats DOCKER_HOST.
        self.assertEqual(parse(provider, ["--docker", "/x.sock"], env)["docker-endpoint"], "unix:/x.sock")
        with self.assertRaises(usage.UsageError) as caught:
            parse(provider, ["--docker"], {"DOCKER_HOST": "tcp://10.0.0.1:2375"})
        self.assertEqual(str(caught.exception), "DOCKER_HOST: only unix sockets are supported, not tcp")

    def test_environment(self):
        for value, expected in [("true", "unix:/var/run/docker.sock"), ("1", "unix:/var/run/docker.sock"),
                                ("false", None), ("off", None), ("0", None), ("", None),
                                ("/srv/docker.sock", "unix:/srv/docker.sock")]:
            self.assertEqual(parse(gateway, [], {"PIPEGATE_DOCKER": value})["docker-endpoint"], expected, value)
        options = parse(provider, [], {"PIPEGATE_DOCKER": "true", "PIPEGATE_NETWORK": "mesh",
                                       "PIPEGATE_REFRESH": "7.5"})
        self.assertEqual((options["network"], options["refresh"]), ("mesh", 7.5))
        options = parse(gateway, [], {"PIPEGATE_DOCKER": "1", "PIPEGATE_IMAGE": "registry.example/pg:2",
                                      "PIPEGATE_HELPER_TARGET": "gw"})
        self.assertEqual((options["image"], options["helper-target"]), ("registry.example/pg:2", "gw"))

    def test_defaults(self):
        options = parse(gateway, ["--docker"])
        self.assertEqual((options["network"], options["refresh"], options["image"], options["helper-target"]),
                         ("pipegate", 20.0, "pipegate", None))

    def test_errors_name_the_option(self):
        for tap, argv, message in [
            (provider, ["--docker", "ssh://me@host"], "--docker: only unix sockets are supported, not ssh"),
            (provider, ["--docker", "--refresh", "0"], "--refresh: must be greater than 0"),
            (provider, ["--docker", "--network", "a b"], "--network: expected a Docker network name, got 'a b'"),
            (gateway, ["--docker", "--image", ""], "--image: expected an image name, got ''"),
            (gateway, ["--docker", "--helper-target", "a b"], "--helper-target: expected a host name or address, got 'a b'"),
        ]:
            with self.assertRaises(usage.UsageError, msg=argv) as caught:
                parse(tap, argv)
            self.assertEqual(str(caught.exception), message)

    def test_services_built(self):
        reactor = MemoryReactorClock()
        top = provider.makeService(parse(provider, ["--docker", "--refresh", "3"]), reactor)
        (discovery,) = [s for s in top if type(s).__name__ == "DockerDiscovery"]
        self.assertEqual((discovery.network, discovery.period), ("pipegate", 3.0))
        top = gateway.makeService(parse(gateway, ["--docker", "--network", "mesh", "--image", "pg:1"]), reactor)
        (helpers,) = [s for s in top if type(s).__name__ == "HelperManager"]
        self.assertEqual((helpers.network, helpers.image, helpers.target), ("mesh", "pg:1", None))
        self.assertEqual(helpers.secrets, [SECRET])
