"""
File-descriptor exhaustion attacks on the port plane (issue 17 items 3, 4 and 13) against
real `twistd pipegate-gateway` and `twistd pipegate-provider` processes, each started
under `prlimit --nofile=SOFT:HARD` (1,024:1,024 is systemd's default soft limit with no
room to raise it), attackers spread over 127.0.0.x.  Each test checks that the attacker
is held to the caps AND that a TCP gate, a UDP gate and /metrics keep answering, with no
traceback in the services' output.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket

from twisted.internet import endpoints, protocol, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

from tests.support import eventually, free_ports
from tests.test_ports_e2e import Client, Echo, UDPEcho
from tests.test_processes import TWISTD, child_env, spawn

SECRET = "ab" * 32
PRLIMIT = shutil.which("prlimit")
# The children run this checkout's code (trial runs them in _trial_temp, where an
# installed pipegate would win); PIPEGATE_EDGE_CODE names another tree, to measure it.
CODE = os.environ.get("PIPEGATE_EDGE_CODE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env() -> dict[str, str]:
    return child_env(PIPEGATE_ROUTER=SECRET, PYTHONPATH=CODE)


def limited(nofile: str) -> list[str]:
    return [PRLIMIT, f"--nofile={nofile}", "--"]


class EdgeProcesses(unittest.TestCase):
    timeout = 180

    def setUp(self):
        if PRLIMIT is None:
            raise unittest.SkipTest("prlimit (util-linux) is not installed")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 4096 and hard >= 4096:  # the attackers here hold a few thousand sockets
            resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))

    async def start(self, provider_nofile: str, gateway_nofile: str = "4096:4096",
                    provider_args: tuple = (), gateway_args: tuple = ()):
        factory = protocol.Factory.forProtocol(Echo)
        factory.noisy = False
        self.backend = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(self.backend.stopListening)
        self.udp_backend = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")
        self.addCleanup(self.udp_backend.stopListening)
        mux, self.gate, self.gw_metrics, self.prov_metrics = free_ports(4)
        (self.udp_gate,) = free_ports(1, socket.SOCK_DGRAM)
        self.gateway = spawn(self, limited(gateway_nofile) + TWISTD + [
            "-n", "--pidfile=", "pipegate-gateway", "--mux", f"tcp:{mux}:interface=127.0.0.1",
            "--listen", "127.0.0.1", "--metrics", f"tcp:{self.gw_metrics}:interface=127.0.0.1",
            *gateway_args], env())
        # (--service's short form, through a real twistd, for TCP and UDP)
        self.provider = spawn(self, limited(provider_nofile) + TWISTD + [
            "-n", "--pidfile=", "pipegate-provider",
            "--service", f"{self.gate}:127.0.0.1:{self.backend.getHost().port}",
            "--service", f"{self.udp_gate}:127.0.0.1:{self.udp_backend.getHost().port}/udp",
            "--connect", f"tcp:127.0.0.1:{mux}", "--metrics", f"tcp:{self.prov_metrics}:interface=127.0.0.1",
            *provider_args], env())
        self.addCleanup(self.keep_output)
        await eventually(lambda: b"gate %d/tcp open" % self.gate in self.gateway.output
                         and b"gate %d/udp open" % self.udp_gate in self.gateway.output, timeout=30)

    def keep_output(self) -> None:
        """The services' output goes to the test's temp directory (see it when a test fails)."""
        for name, child in (("gateway", self.gateway), ("provider", self.provider)):
            with open(f"{self._testMethodName}.{name}.log", "wb") as f:
                f.write(child.output)

    async def tcp_echo(self, source: str = "127.0.0.1") -> bytes:
        client = Client()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate, timeout=5,
                                                bindAddress=(source, 0))
        await endpoints.connectProtocol(endpoint, client)
        client.transport.write(b"echo")
        try:
            await eventually(lambda: client.received == b"echo", timeout=10)
        finally:
            client.transport.abortConnection()
        return bytes(client.received)

    async def udp_echo(self, source: str) -> bytes | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind((source, 0))
        s.setblocking(False)
        got = []

        def answered():
            s.sendto(b"udp-echo", ("127.0.0.1", self.udp_gate))
            try:
                got.append(s.recv(100))
            except BlockingIOError:
                pass
            return got
        await eventually(answered, timeout=15)
        return got[0]

    async def metrics(self, port: int) -> str:
        response = await Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/metrics" % port)
        return (await readBody(response)).decode()

    def udp_flood(self, count: int, sources: list[str]) -> None:
        """C{count} UDP source ports, one datagram each, spread over C{sources}."""
        held = []
        try:
            for n in range(count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(s)
                s.bind((sources[n % len(sources)], 0))
                s.sendto(b"flood", ("127.0.0.1", self.udp_gate))
        finally:
            for s in held:
                s.close()

    async def tcp_flood(self, count: int, sources: list[str]) -> list:
        """C{count} idle TCP connections to the TCP gate, spread over C{sources}."""
        clients = []
        for n in range(count):
            client = Client()
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate,
                                                    bindAddress=(sources[n % len(sources)], 0))
            await endpoints.connectProtocol(endpoint, client)
            clients.append(client)
        self.addCleanup(lambda: [c.transport.abortConnection() for c in clients if c.transport.connected])
        return clients

    def assert_clean(self) -> None:
        for child in (self.gateway, self.provider):
            self.assertNotIn(b"Traceback", child.output)
            self.assertNotIn(b"Unhandled", child.output)
            self.assertFalse(child.ended.called, child.output[-2000:])

    async def test_udp_source_port_flood_against_a_provider_with_1024_fds(self):
        await self.start("1024:1024")
        self.assertEqual(await self.tcp_echo(), b"echo")
        self.assertIn(b"fd budget: 1024 descriptors", self.provider.output)
        self.udp_flood(1500, [f"127.0.0.{n}" for n in range(2, 8)])
        await task.deferLater(reactor, 2, lambda: None)
        # The provider is alive and serves TCP at once; /metrics answers.
        self.assertEqual(await self.tcp_echo("127.0.0.20"), b"echo")
        text = await self.metrics(self.prov_metrics)
        self.assertIn('pipegate_cap_refusals_total{cap="udp-total"}', text)
        # A new UDP client is served once the flood's flows have idled (5 s): the
        # longest-idle flow makes room.
        self.assertEqual(await self.udp_echo("127.0.0.21"), b"udp-echo")
        self.assert_clean()
        # One refusal line per 10 s, not one per flow.
        self.assertLess(self.provider.output.count(b"refused: udp total cap reached"), 5)

    async def test_idle_tcp_flood_against_a_gateway_and_provider_with_1024_fds(self):
        await self.start("1024:1024", "1024:1024")
        clients = await self.tcp_flood(1100, ["127.0.0.2", "127.0.0.3"])
        await eventually(lambda: sum(not c.transport.connected for c in clients) >= 1100 - 2 * 240, timeout=30)
        self.assertEqual(sum(c.transport.connected for c in clients), 2 * 240)
        self.assertEqual(await self.tcp_echo("127.0.0.9"), b"echo")
        self.assertEqual(await self.udp_echo("127.0.0.9"), b"udp-echo")
        text = await self.metrics(self.gw_metrics)
        self.assertIn('pipegate_cap_refusals_total{cap="tcp-per-source"} 620.0', text)
        self.assert_clean()

    async def test_a_provider_out_of_fds_answers_open_fail_at_once(self):
        # No caps of its own (--max-backends 0) and only 128 descriptors: UDP sockets
        # for new flows cannot be opened.  Every OPEN is answered at once (OPEN_FAIL)
        # rather than left to the gateway's open timeout, and nothing is unhandled.
        await self.start("128:128", provider_args=(
            "--max-backends", "0", "--max-backends-per-ip", "0", "--max-udp-backends", "0"), gateway_args=("--open-timeout", "30"))
        self.udp_flood(300, [f"127.0.0.{n}" for n in range(2, 5)])
        await eventually(lambda: b"cannot open a UDP socket" in self.gateway.output, timeout=15)
        self.assert_clean()

    async def test_a_gateway_out_of_fds_pauses_accepting_and_resumes(self):
        # No caps or rate (0) and 256 descriptors: a flood of idle connections runs the gateway into
        # EMFILE.  The gate stays open: accepting pauses (the kernel's queue holds new
        # connections) and resumes once descriptors are free again.
        await self.start("1024:1024", "256:256", gateway_args=("--max-conns", "0", "--max-conns-per-ip", "0",
                                                                      "--conn-rate-per-ip", "0"))
        clients = await self.tcp_flood(400, ["127.0.0.2", "127.0.0.3"])
        await eventually(lambda: b"accepting paused" in self.gateway.output, timeout=30)
        for client in clients:
            client.transport.abortConnection()
        self.assertEqual(await self.tcp_echo("127.0.0.9"), b"echo")
        self.assertEqual(await self.udp_echo("127.0.0.9"), b"udp-echo")
        self.assert_clean()

    async def test_the_soft_limit_is_raised_to_the_hard_limit(self):
        await self.start("512:4096")
        self.assertIn(b"fd budget: 4096 descriptors (soft limit was 512, hard 4096)", self.provider.output)
        self.assertEqual(await self.tcp_echo(), b"echo")
        self.assert_clean()



