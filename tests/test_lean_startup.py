"""
What a service imports when it starts without the options that need more (issue 22: idle
RSS within 5 MiB of stock C{twistd web}).  Each case builds the service from its options in a
fresh interpreter, as twistd does, and lists the pipegate modules then loaded: the relay
without C{--mux} must not load the hub and mux session code, nor the ACME machinery without
C{--acme-directory}, nor the metrics listener without C{--metrics}; the connector not the
request inspector without C{--inspect}; neither the command line's argparse nor the pycparser
that Autobahn's native helpers parse their C declarations with (see pipegate.http).  A top-level import of one of them in a module the
service always loads makes the matching test fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

import pipegate

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

# The command line's parser, and pycparser: Autobahn's NVX wrappers parse C declarations with
# it when imported, about 1.2 MiB (pipegate.http starts Autobahn with AUTOBAHN_USE_NVX=0).
NOT_FOR_A_SERVICE = ("argparse", "pycparser", "cffi.cparser")


def loaded(tap: str, *args: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PIPEGATE_JWT_SECRET=SECRET)
    for name in list(env):
        if name.startswith("PIPEGATE_") and name != "PIPEGATE_JWT_SECRET":
            del env[name]   # only the options given here
    env.pop("AUTOBAHN_USE_NVX", None)   # what the service sets itself, not what this process has
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
    """mux/options.py writes out the codec's defaults so as not to import it: they must agree."""

    def test_defaults_match_the_codec(self):
        from pipegate.mux import frames
        from pipegate.mux.options import HUB_PARAMETERS, MuxOptions

        ends = {p[0]: p[2] for p in MuxOptions.optParameters}
        self.assertEqual(ends["max-window"], str(frames.MAX_WINDOW))
        self.assertEqual(ends["window-budget"], str(frames.WINDOW_BUDGET))
        self.assertEqual(ends["max-frame-size"], str(frames.MAX_FRAME_SIZE))
        self.assertEqual(ends["window"], str(frames.INITIAL_WINDOW))
        self.assertEqual({p[0]: p[2] for p in HUB_PARAMETERS}["mux-max-window"], str(frames.HUB_MAX_WINDOW))
