"""
Faults (issue 7): peers killed with SIGKILL as real twistd processes, links cut or
stalled by an in-test TCP proxy (tests/faultproxy.py), reconnect storms, a stuck app.
Each case checks that the survivor resets only what was affected with a clear status,
that nothing hangs, and that traffic flows again once the peer is back; the cycles
check the survivor's file descriptors and memory before and after.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import signal

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.logger import Logger, globalLogPublisher
from twisted.trial import unittest

from pipegate.ports.services import Service
from tests.faultproxy import FaultProxy
from tests.support import (
    Loopback, TestApp, connect_raw, eventually, free_port, free_ports, raw_request, request, token_for,
)
from tests.test_ports_e2e import Client, Echo, PortPlane
from tests.test_processes import TWISTD, child_env, spawn
from tests.test_secrets import JWT_SECRET

ROUTER = "a1" * 32
_figures = Logger(namespace="reliability")


def figure(name: str, value: float, unit: str = "s") -> None:
    """Log a measured figure (for docs/reliability.md); never an assertion."""
    _figures.info("figure {name}: {value:.2f} {unit}", name=name, value=value, unit=unit)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def census() -> collections.Counter:
    """
    Live objects of PipeGate's and Twisted's own classes, by class.  Timers are counted
    apart: a few per site or idle pooled connection come and go (see L{timers_bounded}).
    """
    gc.collect()
    return collections.Counter(
        type(o).__qualname__ for o in gc.get_objects()
        if isinstance(type(o).__module__, str) and type(o).__qualname__ != "DelayedCall"
        and type(o).__module__.startswith(("pipegate", "twisted.internet", "twisted.protocols")))


def timers_bounded(testcase, before: int) -> None:
    """A leak of one timer per cycle would show as 100 more after 100 cycles."""
    testcase.assertLess(len(reactor.getDelayedCalls()), before + 20)


def quiet_logs(testcase) -> None:
    """Stop PortPlane's in-memory log capture: its events keep references to links."""
    globalLogPublisher.removeObserver(testcase.events.append)


async def settle():
    await task.deferLater(reactor, 0.2, lambda: None)


class Stream(protocol.Protocol):
    """A client that keeps writing until the connection ends; records how it ended."""

    def __init__(self) -> None:
        self.received = 0
        self.ended = defer.Deferred()
        self.writer = None

    def connectionMade(self):
        self.writer = task.LoopingCall(self.transport.write, b"x" * 16384)
        self.writer.start(0.01)

    def dataReceived(self, data):
        self.received += len(data)

    def connectionLost(self, reason):
        if self.writer is not None and self.writer.running:
            self.writer.stop()
        self.ended.callback(reason.value)


# -- real processes ----------------------------------------------------------------------------


class PortPlaneProcesses(unittest.TestCase):
    """pipegate-gateway and pipegate-provider as real processes, killed with SIGKILL."""

    async def setUp(self):
        factory = protocol.Factory.forProtocol(Echo)
        factory.noisy = False
        self.backend = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(self.backend.stopListening)
        self.mux, self.gate = free_ports(2)
        self.services = json.dumps([{"gatePort": self.gate, "serviceHost": "127.0.0.1",
                                     "servicePort": self.backend.getHost().port, "protocol": "TCP"}])

    def gateway(self):
        return spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-gateway", "--mux",
                                     f"tcp:{self.mux}:interface=127.0.0.1", "--listen", "127.0.0.1",
                                     "--ping-interval", "1", "--ping-deadline", "3"],
                     child_env(PIPEGATE_ROUTER=ROUTER))

    def provider(self):
        return spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-provider", "--services", self.services,
                                     "--connect", f"tcp:127.0.0.1:{self.mux}",
                                     "--ping-interval", "1", "--ping-deadline", "3"],
                     child_env(PIPEGATE_ROUTER=ROUTER))

    async def echo(self) -> bytes:
        client = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate), client)
        client.transport.write(b"ping")
        client.transport.loseWriteConnection()
        return await client.closed

    async def streaming(self) -> Stream:
        stream = Stream()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate), stream)
        self.addCleanup(lambda: stream.transport.abortConnection() if stream.transport.connected else None)
        await eventually(lambda: stream.received > 100_000, timeout=30)
        return stream

    def gate_open(self) -> bool:
        import socket
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.gate)) == 0

    async def test_provider_killed_mid_transfer(self):
        gateway = self.gateway()
        provider = self.provider()
        await eventually(lambda: b"gate %d/tcp open" % self.gate in gateway.output, timeout=30)
        stream = await self.streaming()
        provider.transport.signalProcess(signal.SIGKILL)
        await provider.ended
        await stream.ended                      # the client is cut off, not left hanging
        await eventually(lambda: b"gate %d/tcp closed" % self.gate in gateway.output, timeout=30)
        await eventually(lambda: not self.gate_open())   # no gate stays open without a provider
        start = reactor.seconds()
        self.provider()
        await eventually(lambda: gateway.output.count(b"gate %d/tcp open" % self.gate) == 2, timeout=30)
        self.assertEqual(await self.echo(), b"pingbye")
        figure("provider restarted -> echo through the gate", reactor.seconds() - start)
        self.assertNotIn(b"Traceback", gateway.output)

    async def test_gateway_killed_provider_reconnects(self):
        gateway = self.gateway()
        provider = self.provider()
        await eventually(lambda: b"gate %d/tcp open" % self.gate in gateway.output, timeout=30)
        stream = await self.streaming()
        gateway.transport.signalProcess(signal.SIGKILL)
        await gateway.ended
        await stream.ended
        await task.deferLater(reactor, 1.0, lambda: None)   # the provider is alone for a while
        lost_at = len(provider.output)
        start = reactor.seconds()
        gateway = self.gateway()
        await eventually(lambda: b"gate %d/tcp open" % self.gate in gateway.output, timeout=60)
        self.assertEqual(await self.echo(), b"pingbye")
        figure("gateway restarted -> echo through the gate", reactor.seconds() - start)
        self.assertNotIn(b"Traceback", provider.output)
        self.assertIn(b"admitted", provider.output[lost_at:])
        self.provider_log = provider.output


class HTTPPlaneProcesses(unittest.TestCase):
    """pipegate-server and pipegate-client as real processes, killed with SIGKILL."""

    async def setUp(self):
        self.loop = Loopback(self)
        self.app = TestApp()
        self.app_port = await self.loop.app(self.app)
        self.relay_port = free_port()
        self.base = f"http://127.0.0.1:{self.relay_port}"

    def relay(self):
        return spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-server", "--listen",
                                     f"tcp:{self.relay_port}:interface=127.0.0.1"],
                     child_env(PIPEGATE_JWT_SECRET=JWT_SECRET))

    def connector(self):
        return spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-client", "--token", token_for("t1"),
                                     f"http://127.0.0.1:{self.app_port.getHost().port}",
                                     f"ws://127.0.0.1:{self.relay_port}"], child_env())

    async def ok(self) -> bool:
        try:
            response, _ = await request(self.loop.agent(), b"GET", self.base + "/t1/ok")
        except Exception:
            return False
        return response.code == 200

    async def wait_ok(self, timeout=60):
        waited = 0.0
        while not await self.ok():
            if waited > timeout:
                raise AssertionError("tunnel not serving")
            await task.deferLater(reactor, 0.2, lambda: None)
            waited += 0.2

    async def test_connector_killed_in_flight_requests_get_502(self):
        relay = self.relay()
        connector = self.connector()
        await self.wait_ok()
        hanging = [await connect_raw(self.port_object(), b"GET /t1/hang HTTP/1.1\r\nHost: x\r\n\r\n")
                   for _ in range(3)]
        await eventually(lambda: len(self.app.hanging) == 3)
        start = reactor.seconds()
        connector.transport.signalProcess(signal.SIGKILL)
        await connector.ended
        for proto in hanging:
            await eventually(lambda p=proto: b"\r\n\r\n" in p.received, timeout=30)
        figure("connector killed -> 502 to 3 in-flight callers", reactor.seconds() - start)
        for proto in hanging:
            self.assertTrue(proto.received.startswith(b"HTTP/1.1 502"), proto.received[:40])
            proto.transport.loseConnection()
        raw = await raw_request(self.port_object(), b"GET /t1/ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 404") or raw.startswith(b"HTTP/1.1 502")
                        or raw.startswith(b"HTTP/1.1 503"), raw[:40])
        start = reactor.seconds()
        self.connector()
        await self.wait_ok()
        figure("connector restarted -> 200 through the tunnel", reactor.seconds() - start)
        self.assertNotIn(b"Traceback", relay.output)

    async def test_relay_killed_connector_reconnects(self):
        relay = self.relay()
        connector = self.connector()
        await self.wait_ok()
        hanging = await connect_raw(self.port_object(), b"GET /t1/hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: len(self.app.hanging) == 1)
        relay.transport.signalProcess(signal.SIGKILL)
        await relay.ended
        await hanging.done                       # the caller is cut off, not left hanging
        await eventually(lambda: self.app.hanging[0].finished or self.app.hanging[0]._disconnected, timeout=30)
        start = reactor.seconds()
        self.relay()
        await self.wait_ok()
        figure("relay restarted -> 200 through the tunnel", reactor.seconds() - start)
        self.assertNotIn(b"Traceback", connector.output)

    def port_object(self):
        port = self.relay_port

        class Address:
            def getHost(self):
                return type("Host", (), {"port": port})()
        return Address()


# -- in process: links cut, stalled, storms, cycles --------------------------------------------


class LinkFaults(PortPlane):
    async def setUp(self):
        super().setUp()
        self.backend = await self.backend_echo()
        self.gw, self.mux = await self.gateway()

    async def via_proxy(self) -> FaultProxy:
        proxy = FaultProxy("127.0.0.1", self.mux.getHost().port, record=False)
        await proxy.listen()
        self.cleanups.append(proxy.close)
        return proxy

    async def echo(self, gate: int, data: bytes = b"hello") -> bytes:
        # Not self.connect(): no cleanup entry per connection, so cycles keep no references.
        client = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate), client)
        client.transport.write(data)
        client.transport.loseWriteConnection()
        return await client.closed

    async def test_stalled_link_fails_over_to_the_other_provider(self):
        gate = free_port()
        service = [Service(gate, "127.0.0.1", self.backend.getHost().port)]
        stalled_proxy = await self.via_proxy()
        self.provider(stalled_proxy.listening, service)
        await self.open_tcp_gate(self.gw, gate)
        self.provider(self.mux, service)
        await eventually(lambda: len(self.gw.exposed()[(gate, "tcp")]) == 2)
        stalled_proxy.stall()                   # packets stop; no FIN, no RST
        start = reactor.seconds()
        await eventually(lambda: self.logged("ping deadline"), timeout=30)
        self.assertGreaterEqual(reactor.seconds() - start, 1.5)
        figure("link stalled -> closed by the ping deadline (interval 0.5 s, deadline 2 s)",
               reactor.seconds() - start)
        await eventually(lambda: len(self.gw.exposed().get((gate, "tcp"), [])) == 1)
        for _ in range(6):                       # round robin has only the healthy provider left
            self.assertEqual(await self.echo(gate), b"hellobye")
        self.assertIn((gate, "tcp"), self.gw.gates)

    async def test_stalled_only_link_closes_the_gate(self):
        gate = free_port()
        proxy = await self.via_proxy()
        self.provider(proxy.listening, [Service(gate, "127.0.0.1", self.backend.getHost().port)])
        await self.open_tcp_gate(self.gw, gate)
        proxy.stall()
        await eventually(lambda: (gate, "tcp") not in self.gw.gates, timeout=30)
        proxy.resume()

    async def test_reconnect_storm_of_50_providers(self):
        proxy = await self.via_proxy()
        gates = free_ports(50)
        providers = [self.provider(proxy.listening, [Service(g, "127.0.0.1", self.backend.getHost().port)])
                     for g in gates]
        await eventually(lambda: all((g, "tcp") in self.gw.gates for g in gates), timeout=60)
        self.assertEqual(len(self.gw.links), 50)
        for round_ in range(2):
            old = set(self.gw.links)
            start = reactor.seconds()
            proxy.drop()                          # every link cut at once; all dial back together
            await eventually(lambda: not (old & self.gw.links) and len(self.gw.links) == 50
                             and all((g, "tcp") in self.gw.gates for g in gates)
                             and len(self.gw.routes) == 50, timeout=60)
            figure("50 links cut at once -> all readmitted, 50 gates open (retry 0.2 s)",
                   reactor.seconds() - start)
        self.assertEqual(sorted(p for p, _ in self.gw.gates), sorted(gates))
        for g in gates[::10]:
            self.assertEqual(await self.echo(g), b"hellobye")
        self.assertEqual(len(providers), 50)

    test_reconnect_storm_of_50_providers.timeout = 180

    async def test_100_link_cuts_leak_nothing(self):
        gate = free_port()
        proxy = await self.via_proxy()
        prov = self.provider(proxy.listening, [Service(gate, "127.0.0.1", self.backend.getHost().port)])
        await self.open_tcp_gate(self.gw, gate)
        quiet_logs(self)
        # Warm up so that lazily created objects exist before the first count.
        for _ in range(3):
            await self.cut_and_recover(proxy, gate, mid_transfer=True)
        await settle()
        fds, rss, objects, timers = open_fds(), rss_bytes(), census(), len(reactor.getDelayedCalls())
        for _ in range(100):
            await self.cut_and_recover(proxy, gate, mid_transfer=True)
        await settle()
        self.assertLessEqual(open_fds(), fds)
        self.assertEqual(census() - objects, collections.Counter())
        timers_bounded(self, timers)
        figure("port plane: RSS growth over 100 link cuts mid-transfer", (rss_bytes() - rss) / 2**20, "MiB")
        self.assertLess(rss_bytes() - rss, 8 * 2**20)
        self.assertEqual(len(self.gw.links), 1)
        self.assertEqual(len(prov.links), 1)
        self.assertEqual(self.gw.tcp_clients, set())
        self.assertEqual(next(iter(self.gw.links)).channels, {})
        self.assertEqual(proxy.connections, 104)

    test_100_link_cuts_leak_nothing.timeout = 240

    async def cut_and_recover(self, proxy, gate, mid_transfer=False):
        if mid_transfer:
            stream = Stream()
            await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate), stream)
            await eventually(lambda: stream.received > 0, timeout=30)
        old = set(self.gw.links)
        proxy.drop()
        if mid_transfer:
            await stream.ended
        await eventually(lambda: not (old & self.gw.links) and len(self.gw.links) == 1
                         and (gate, "tcp") in self.gw.gates, timeout=30)
        self.assertEqual(await self.echo(gate), b"hellobye")


class RelayFaults(unittest.TestCase):
    async def setUp(self):
        self.loop = Loopback(self)
        self.app1, self.app2 = TestApp(), TestApp()
        self.app1_port = await self.loop.app(self.app1)
        self.app2_port = await self.loop.app(self.app2)

    async def test_stuck_app_times_out_only_its_own_requests(self):
        relay, port = await self.loop.relay(request_timeout=1.0)
        await self.loop.connector(port, self.app1_port, "t1")
        await self.loop.connector(port, self.app2_port, "t2")
        base = f"http://127.0.0.1:{port.getHost().port}"
        agent = self.loop.agent()
        stuck = [defer.ensureDeferred(request(agent, b"GET", f"{base}/t1/hang")) for _ in range(5)]
        start = reactor.seconds()
        for _ in range(10):   # meanwhile the other tunnel, and the same tunnel's quick paths, answer
            for tunnel in ("t1", "t2"):
                response, _ = await request(agent, b"GET", f"{base}/{tunnel}/ok")
                self.assertEqual(response.code, 200)
        for d in stuck:
            response, body = await d
            self.assertEqual(response.code, 504)
        self.assertGreaterEqual(reactor.seconds() - start, 1.0)
        self.assertEqual(relay.tunnels["t1"].in_flight, 0)

    async def test_100_connector_link_cuts_leak_nothing(self):
        relay, port = await self.loop.relay()
        proxy = FaultProxy("127.0.0.1", port.getHost().port, record=False)
        await proxy.listen()
        self.addCleanup(proxy.close)
        connector = await self.loop.connector(proxy.listening, self.app1_port, "t1",
                                              retry_policy=lambda attempt: 0.02)
        base = f"http://127.0.0.1:{port.getHost().port}"
        agent = self.loop.agent()

        async def cycle(with_request: bool):
            pending = None
            if with_request:
                pending = defer.ensureDeferred(request(agent, b"GET", f"{base}/t1/hang"))
                await eventually(lambda: self.app1.hanging)
            old = list(relay.tunnels["t1"].links)
            proxy.drop()
            if pending is not None:
                response, _ = await pending
                self.assertEqual(response.code, 502)
                self.app1.hanging.clear()
            await eventually(lambda: "t1" in relay.tunnels and len(relay.tunnels["t1"].links) == 1
                             and relay.tunnels["t1"].links[0] not in old and connector.links, timeout=30)
            response, _ = await request(agent, b"GET", f"{base}/t1/ok")
            self.assertEqual(response.code, 200)

        for i in range(4):
            await cycle(i % 2 == 0)
        await settle()
        fds, rss, objects, timers = open_fds(), rss_bytes(), census(), len(reactor.getDelayedCalls())
        for i in range(100):
            await cycle(i % 2 == 0)
        await settle()
        self.assertLessEqual(open_fds(), fds)
        self.assertEqual(census() - objects, collections.Counter())
        timers_bounded(self, timers)
        figure("HTTP plane: RSS growth over 100 connector link cuts", (rss_bytes() - rss) / 2**20, "MiB")
        self.assertLess(rss_bytes() - rss, 8 * 2**20)
        self.assertEqual(len(relay.tunnels["t1"].links), 1)
        self.assertEqual(relay.tunnels["t1"].in_flight, 0)

    test_100_connector_link_cuts_leak_nothing.timeout = 240

