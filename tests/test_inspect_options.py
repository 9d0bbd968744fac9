"""
The inspector's options on C{twistd pipegate-client} (flags, variables, defaults, bad
values), the services C{makeService} builds from them, and C{pipegate demo}'s inspector.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

import pipegate
from pipegate import auth
from pipegate.http.inspect.recorder import Recorder
from pipegate.http.inspect.web import Inspector
from pipegate.tap import client
from tests.support import Loopback, eventually, request
from tests.test_processes import child_env, spawn

SETTINGS = auth.JWTSettings(secret="inspect-options-secret-0123456789-abcdefghij")
ARGS = ["--token", auth.mint(SETTINGS, "abc", time.time()), "http://127.0.0.1:3000", "ws://127.0.0.1:8080/abc"]


def parse(*args, **env) -> client.Options:
    options = client.Options()
    options.environ = env
    options.parseOptions([*args, *ARGS])
    return options


class InspectOptions(unittest.TestCase):
    def test_off_by_default_with_documented_bounds(self):
        options = parse()
        self.assertEqual((options["inspect"], options["inspect-max"], options["inspect-body-bytes"]),
                         (None, 500, 65536))
        top = client.makeService(options, MemoryReactorClock())
        connector = [s for s in top if s.name is None and hasattr(s, "observer")][0]
        self.assertIsNone(connector.observer)
        self.assertEqual([s for s in top if isinstance(s, Inspector)], [])

    def test_flags_and_variables(self):
        options = parse("--inspect", "tcp:4040:interface=127.0.0.1", "--inspect-max", "20",
                        "--inspect-body-bytes", "0", PIPEGATE_INSPECT_MAX="7")
        self.assertEqual((options["inspect"], options["inspect-max"], options["inspect-body-bytes"]),
                         ("tcp:4040:interface=127.0.0.1", 20, 0))
        options = parse(PIPEGATE_INSPECT="tcp:4041:interface=127.0.0.1", PIPEGATE_INSPECT_MAX="7",
                        PIPEGATE_INSPECT_BODY_BYTES="1024")
        self.assertEqual((options["inspect"], options["inspect-max"], options["inspect-body-bytes"]),
                         ("tcp:4041:interface=127.0.0.1", 7, 1024))

    def test_the_services_it_builds(self):
        reactor = MemoryReactorClock()
        top = client.makeService(parse("--inspect", "tcp:4040:interface=127.0.0.1", "--inspect-max", "3",
                                       "--inspect-body-bytes", "10"), reactor)
        [inspector] = [s for s in top if isinstance(s, Inspector)]
        recorder = inspector.recorder
        self.assertIsInstance(recorder, Recorder)
        self.assertEqual((recorder.max_entries, recorder.body_bytes), (3, 10))
        connector = [s for s in top if getattr(s, "observer", None) is recorder]
        self.assertEqual(len(connector), 1)
        self.assertIs(inspector.replayer.agent, connector[0].agent)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        self.assertIn((4040, "127.0.0.1"), [(port, interface) for port, _, _, interface in reactor.tcpServers])

    def test_an_endpoint_beyond_loopback_is_warned_about(self):
        for endpoint, warned in (("tcp:4040", True), ("tcp:4040:interface=0.0.0.0", True),
                                 ("tcp:4040:interface=127.0.0.1", False)):
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            top = client.makeService(parse("--inspect", endpoint), MemoryReactorClock())
            [inspector] = [s for s in top if isinstance(s, Inspector)]
            inspector.startService()
            self.addCleanup(inspector.stopService)
            warnings = [e for e in events if "keep it on loopback" in e.get("log_format", "")]
            self.assertEqual(len(warnings), int(warned), endpoint)

    def test_the_connector_log_says_where_to_open_it(self):
        # `--inspect tcp:4040:...` logged only "Site starting on 4040": now the URL to open.
        for endpoint, url in (("tcp:4040:interface=127.0.0.1", "http://127.0.0.1:4040/"),
                              ("tcp:4041", "http://127.0.0.1:4041/"),
                              ("tcp6:4042:interface=\\:\\:1", "http://[::1]:4042/")):
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            top = client.makeService(parse("--inspect", endpoint), MemoryReactorClock())
            [inspector] = [s for s in top if isinstance(s, Inspector)]
            inspector.privilegedStartService()
            inspector.startService()
            self.addCleanup(inspector.stopService)
            lines = [e["url"] for e in events if "request inspector" in e.get("log_format", "")]
            self.assertEqual(lines, [url], endpoint)

    def test_bad_values_name_the_option(self):
        for args, env, name in [
            (["--inspect", "tcpp:4040"], {}, "--inspect"),
            (["--inspect-max", "0"], {}, "--inspect-max"),
            ([], {"PIPEGATE_INSPECT_MAX": "many"}, "--inspect-max"),
            (["--inspect-body-bytes", "-1"], {}, "--inspect-body-bytes"),
        ]:
            e = self.assertRaises(usage.UsageError, parse, *args, **env)
            self.assertTrue(str(e).startswith(name + ":"), str(e))


class DemoInspector(unittest.TestCase):
    async def test_demo_prints_the_inspector_which_records_its_requests(self):
        # The child imports this checkout's pipegate, whatever the venv has installed.
        root = os.path.dirname(os.path.dirname(os.path.abspath(pipegate.__file__)))
        child = spawn(self, [sys.executable, "-m", "pipegate", "demo", "--port", "0", "--inspect-port", "0"],
                      child_env(PYTHONPATH=root))
        await eventually(lambda: b"Inspector:" in child.output, timeout=30)
        url = re.search(rb"Public URL: (\S+)", child.output).group(1).decode()
        inspector = re.search(rb"Inspector: +(http://127\.0\.0\.1:\d+/)", child.output).group(1).decode()
        agent = Loopback(self).agent()
        response, _ = await request(agent, b"GET", url + "hello?name=world")
        self.assertEqual(response.code, 200)
        response, body = await request(agent, b"GET", inspector + "api/requests")
        [entry] = json.loads(body)["requests"]
        self.assertEqual((entry["method"], entry["path"], entry["status"]), ("GET", "/hello?name=world", 200))
