"""
The port plane as users run it: `twistd -n pipegate-gateway` and `twistd -n
pipegate-provider` as real processes, `pipegate scan`, and clean SIGTERM.
"""

from __future__ import annotations

import json
import signal
import socket
import sys

from twisted.internet import endpoints, protocol, reactor
from twisted.trial import unittest

from tests.support import eventually, free_ports
from tests.test_ports_e2e import Client, Echo
from tests.test_processes import TWISTD, child_env, run, spawn

SECRET = "ab" * 32


class Processes(unittest.TestCase):
    async def test_gateway_and_provider_processes(self):
        factory = protocol.Factory.forProtocol(Echo)
        factory.noisy = False
        backend = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(backend.stopListening)
        mux, gate = free_ports(2)
        gateway = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-gateway", "--mux",
                                        f"tcp:{mux}:interface=127.0.0.1", "--listen", "127.0.0.1"],
                        child_env(PIPEGATE_ROUTER=SECRET))
        services = json.dumps([{"gatePort": gate, "serviceHost": "127.0.0.1",
                                "servicePort": backend.getHost().port, "protocol": "TCP", "tags": "web"}])
        provider = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-provider", "--services", services,
                                         "--connect", f"tcp:127.0.0.1:{mux}"],
                         child_env(PIPEGATE_ROUTER=SECRET))
        await eventually(lambda: b"gate %d/tcp open" % gate in gateway.output, timeout=30)

        client = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate), client)
        client.transport.write(b"through processes")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.closed, b"through processesbye")

        code, out = await run(self, [sys.executable, "-m", "pipegate", "scan", "--router", SECRET,
                                     "--connect", f"tcp:127.0.0.1:{mux}"])
        self.assertEqual(code, 0, out)
        self.assertIn("gateway, 1 route(s)", out)
        self.assertIn(f"{gate}/tcp -> 127.0.0.1:{backend.getHost().port} [web]", out)

        # Issue 18 item 11: a wrong secret used to wait out --timeout and then die with
        # "'NoneType' object has no attribute 'shutdown'".  Now it says so at once.
        code, out = await run(self, [sys.executable, "-m", "pipegate", "scan", "--router", "cd" * 32,
                                     "--connect", f"tcp:127.0.0.1:{mux}", "--timeout", "60"])
        self.assertEqual(code, 1, out)
        self.assertTrue(out.startswith("pipegate scan: admission refused (wrong router secret?): "), out)
        self.assertNotIn("no answer within", out)
        self.assertNotIn("NoneType", out)

        provider.transport.signalProcess(signal.SIGTERM)
        await provider.ended  # twistd re-raises SIGTERM on itself after a clean shutdown
        self.assertEqual(provider.signal, signal.SIGTERM)
        self.assertIn(b"Main loop terminated", provider.output)
        self.assertNotIn(b"Traceback", provider.output)
        await eventually(lambda: b"gate %d/tcp closed" % gate in gateway.output, timeout=30)
        with socket.socket() as s:
            self.assertNotEqual(s.connect_ex(("127.0.0.1", gate)), 0)
        gateway.transport.signalProcess(signal.SIGTERM)
        await gateway.ended
        self.assertIn(b"Main loop terminated", gateway.output)
        self.assertNotIn(b"Traceback", gateway.output)
        self.assertNotIn(SECRET.encode(), gateway.output + provider.output)

    async def test_bad_router_secret_stops_startup(self):
        code, out = await run(self, TWISTD + ["-n", "pipegate-gateway", "--router", "nothex", "--mux", "tcp:0"])
        self.assertNotEqual(code, 0)
        self.assertIn("--router: router secret must be 64 hex characters", out)
        self.assertNotIn("Traceback", out)

    async def test_invalid_service_entry_named(self):
        code, out = await run(self, TWISTD + ["-n", "pipegate-provider", "--router", SECRET, "--connect",
                                              "tcp:127.0.0.1:1", "--services",
                                              '[{"gatePort": 80, "serviceHost": "a", "servicePort": "80"}]'])
        self.assertNotEqual(code, 0)
        self.assertIn("entry 0: servicePort", out)
