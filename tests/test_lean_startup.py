"""
What a service imports when it starts without the options that need more (issue 22: idle
RSS within 5 MiB of stock C{twistd web}).  Each case builds the service from its options in a
fresh interpreter, as twistd does, and lists the pipegate modules then loaded: the relay
without C{--mux} must not load the hub and mux session code, nor the ACME machinery without
C{--acme-directory}, nor the metrics listener without C{--metrics}; the connector not the
request inspector without C{--inspect}; neither the command line's argparse nor the pycparser
that Autobahn's native helpers parse their C declarations with (see pipegate.http).  A top-level import of one of them in a module the
service always loads makes the matching test fail.

The relay also keeps out the code of its rarer paths (L{RELAY_ON_DEMAND}): ingress policy,
trusted proxies, token buckets and the revocation list load with their options (and then at
startup, so that a broken module still stops it), visitor policies with the first login that
declares one, passthrough with the first upgrade request.  L{RelayServedImports} checks a real
relay after a connector's login and a request through it: the state the idle RSS is read in
(benchmarks/scenarios.py, C{idle}).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.trial import unittest

import pipegate
from tests.support import SECRET as SUPPORT_SECRET
from tests.support import Loopback, eventually, free_port, request

ROOT = str(Path(pipegate.__file__).parent.parent)
SECRET = "lean-startup-secret-" + "0123456789abcdef" * 3
ROUTER = "ab" * 32

# Builds the service like twistd (parseOptions, then makeService, nothing started) and
# prints the modules loaded.
_BUILD = """
import json, sys
from importlib import import_module
tap = import_module(sys.argv[1])
options = tap.Options()
options.parseOptions(sys.argv[2:])
tap.makeService(options)
print(json.dumps(sorted(sys.modules)))
"""

MUX_MACHINERY = ("pipegate.mux.hub", "pipegate.mux.hubcore", "pipegate.mux.session", "pipegate.mux.tls",
                 "pipegate.mux.decoder", "pipegate.mux.frames", "pipegate.mux.hello", "pipegate.dialer")
ACME_MACHINERY = ("pipegate.http.acme", "pipegate.http.acmeclient", "pipegate.http.acmeschedule",
                  "pipegate.http.certstore", "pipegate.http.sni")

# The relay's rarer paths (see the module docstring); none of them is loaded by an idle relay.
POLICY_CODE = ("pipegate.core.policy", "pipegate.core.policydoc", "pipegate.core.source")
RELAY_ON_DEMAND = POLICY_CODE + ("pipegate.core.bucket", "pipegate.http.forwarded", "pipegate.http.revocation",
                                 "pipegate.http.visitors", "pipegate.http.upgrade")

# The command line's parser, and pycparser: Autobahn's NVX wrappers parse C declarations with
# it when imported, about 1.2 MiB (pipegate.http starts Autobahn with AUTOBAHN_USE_NVX=0).
NOT_FOR_A_SERVICE = ("argparse", "pycparser", "cffi.cparser")


def service_env(secret: str = SECRET) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PIPEGATE_JWT_SECRET=secret)
    for name in list(env):
        if name.startswith("PIPEGATE_") and name != "PIPEGATE_JWT_SECRET":
            del env[name]   # only the options given here
    env.pop("AUTOBAHN_USE_NVX", None)   # what the service sets itself, not what this process has
    return env


def loaded(tap: str, *args: str) -> set[str]:
    env = service_env()
    done = subprocess.run([sys.executable, "-c", _BUILD, tap, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise AssertionError(f"building {tap} {' '.join(args)} failed:\n{done.stderr}")
    return set(json.loads(done.stdout.splitlines()[-1]))


class RelayStartupImports(unittest.TestCase):

    def test_plain_relay_loads_no_hub_acme_or_metrics(self):
        modules = loaded("pipegate.tap.server", "--listen", "tcp:0:interface=127.0.0.1")
        self.assertIn("pipegate.http.relay", modules)   # the case is real: the relay was built
        for name in MUX_MACHINERY + ACME_MACHINERY + ("pipegate.mux.node", "pipegate.mux.frames",
                                                           "pipegate.mux.hello", "pipegate.metrics"):
            self.assertNotIn(name, modules)

    def test_relay_loads_no_argparse_or_c_parser(self):
        modules = loaded("pipegate.tap.server", "--listen", "tcp:0:interface=127.0.0.1")
        self.assertIn("autobahn.websocket.protocol", modules)   # the WebSocket layer is there
        self.assertEqual(sorted(modules.intersection(NOT_FOR_A_SERVICE)), [])

    def test_plain_relay_loads_no_rare_path(self):
        modules = loaded("pipegate.tap.server", "--listen", "tcp:0:interface=127.0.0.1")
        self.assertIn("pipegate.http.streams", modules)
        self.assertEqual(sorted(modules.intersection(RELAY_ON_DEMAND)), [])

    def test_options_that_need_them_load_them_at_startup(self):
        # The other side: each option loads its code while the service is built, where a
        # broken module stops the relay, not at the first request that needs it.
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("revoked-jti\n")
        self.addCleanup(os.unlink, f.name)
        cases = [(("--ingress-policy", '{"ips": {"192.0.2.1": {"allow": false}}}'), POLICY_CODE + ("pipegate.core.bucket",)),
                 (("--trusted-proxy", "10.0.0.0/8"), ("pipegate.http.forwarded",)),
                 (("--tunnel-rate", "8"), ("pipegate.core.bucket",)),
                 (("--revoked", f.name), ("pipegate.http.revocation",))]
        for args, names in cases:
            modules = loaded("pipegate.tap.server", "--listen", "tcp:0:interface=127.0.0.1", *args)
            for name in names:
                self.assertIn(name, modules, args)

    def test_mux_loads_the_hub(self):
        # The other side of the same test: the names above are what --mux really loads.
        modules = loaded("pipegate.tap.server", "--listen", "tcp:0:interface=127.0.0.1",
                         "--mux", "tcp:0:interface=127.0.0.1", "--mux-router", ROUTER)
        for name in MUX_MACHINERY:
            self.assertIn(name, modules)


class ConnectorStartupImports(unittest.TestCase):

    def test_connector_without_inspect_loads_no_inspector(self):
        modules = loaded("pipegate.tap.client", "http://127.0.0.1:9", "ws://127.0.0.1:9/lean")
        self.assertIn("pipegate.http.connector", modules)
        self.assertEqual({m for m in modules if m.startswith("pipegate.http.inspect")}, set())
        self.assertIn("autobahn.websocket.protocol", modules)
        self.assertEqual(sorted(modules.intersection(NOT_FOR_A_SERVICE)), [])


class WrittenOutDefaults(unittest.TestCase):
    """
    mux/options.py writes out the codec's defaults so as not to import it, and relay.py the
    visitor policy's header and answer: they must agree.
    """

    def test_visitor_header_matches(self):
        from pipegate.http import relay, visitors

        self.assertEqual((relay.VISITOR_HEADER, relay.VISITOR_ACCEPTED), (visitors.HEADER, visitors.ACCEPTED))

    def test_defaults_match_the_codec(self):
        from pipegate.mux import frames
        from pipegate.mux.options import HUB_PARAMETERS, MuxOptions

        ends = {p[0]: p[2] for p in MuxOptions.optParameters}
        self.assertEqual(ends["max-window"], str(frames.MAX_WINDOW))
        self.assertEqual(ends["window-budget"], str(frames.WINDOW_BUDGET))
        self.assertEqual(ends["max-frame-size"], str(frames.MAX_FRAME_SIZE))
        self.assertEqual(ends["window"], str(frames.INITIAL_WINDOW))
        self.assertEqual({p[0]: p[2] for p in HUB_PARAMETERS}["mux-max-window"], str(frames.HUB_MAX_WINDOW))


# A real relay (built as twistd builds it) that prints its modules on SIGUSR1.
_SERVE = """
import json, signal, sys
from twisted.internet import reactor
from pipegate.tap import server
options = server.Options()
options.parseOptions(sys.argv[1:])
top = server.makeService(options)
def dump(signum, frame):
    reactor.callFromThread(lambda: print(json.dumps(sorted(sys.modules)), flush=True))
signal.signal(signal.SIGUSR1, dump)
top.privilegedStartService()
top.startService()
print("ready", flush=True)
reactor.run()
"""


class _Lines(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


class RelayServedImports(unittest.TestCase):
    """The relay as the idle RSS is read: a connector logged in, a request served, then idle."""

    async def test_login_and_request_load_no_rare_path(self):
        port = free_port()
        child = _Lines()
        process = reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-c", _SERVE, "--listen", f"tcp:{port}:interface=127.0.0.1"],
            env=service_env(SUPPORT_SECRET), path=ROOT)

        async def stop():
            if not child.ended.called:
                process.signalProcess("KILL")
                await child.ended
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        await eventually(lambda: b"ready" in child.out or child.ended.called, timeout=60)
        self.assertIn(b"ready", child.out, child.out.decode("utf-8", "replace"))

        loop = Loopback(self)
        app = await loop.app()
        await loop.connector(port, app, "t1")   # a login without a visitor policy
        response, _ = await request(loop.agent(), b"GET", f"http://127.0.0.1:{port}/t1/echo")
        self.assertEqual(response.code, 200)
        process.signalProcess(signal.SIGUSR1)
        await eventually(lambda: b"]\n" in child.out, timeout=30)
        modules = set(json.loads(child.out.split(b"ready\n", 1)[1].splitlines()[0]))
        self.assertIn("pipegate.http.streams", modules)   # (the request went through this relay)
        self.assertEqual(sorted(modules.intersection(RELAY_ON_DEMAND)), [])
