"""
Graceful shutdown: SIGTERM to a real `twistd pipegate-server` during a download and to
a real `twistd pipegate-gateway` during a transfer.  With the default drain timeout the
transfer finishes and the process exits afterwards; with `--drain-timeout 1` the
transfer is cut (the caller sees it end early, the log says why) while short work in
flight still completes.  Plus the pure drain helper on a task.Clock.
"""

from __future__ import annotations

import hashlib
import json
import signal

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from pipegate.drain import AfterDrain, Drainer, drain
from tests.support import SECRET, TestApp, eventually, free_port, free_ports, pattern, token_for
from tests.test_ports_e2e import Client
from tests.test_processes import TWISTD, child_env, spawn

CHUNK = 64 * 1024


class DrainHelper(unittest.TestCase):
    def test_fires_true_when_idle_in_time(self):
        clock = task.Clock()
        busy = [True]
        d = drain(clock, 5, lambda: not busy[0])
        clock.advance(1)
        self.assertFalse(d.called)
        busy[0] = False
        clock.advance(0.05)
        self.assertEqual(self.successResultOf(d), True)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_fires_false_at_the_timeout(self):
        clock = task.Clock()
        d = drain(clock, 2, lambda: False)
        clock.pump([0.5] * 3)
        self.assertFalse(d.called)
        clock.pump([0.5] * 2)
        self.assertEqual(self.successResultOf(d), False)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cut_ends_every_drain_under_way_at_once(self):
        # A second Ctrl-C (config.TopService): the drains end now, as at their timeout.
        from pipegate.drain import cut_drains

        clock = task.Clock()
        first, second = drain(clock, 30, lambda: False), drain(clock, 30, lambda: False)
        done = drain(clock, 30, lambda: True)
        clock.advance(1)
        self.assertEqual(cut_drains(), 2)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (False, False))
        self.assertTrue(self.successResultOf(done))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(cut_drains(), 0)

    def test_after_drain_waits_for_the_node(self):
        from twisted.application import service

        clock = task.Clock()
        node = Drainer()
        busy = [True]
        finished = []
        node.start_drain(clock, 10, lambda: not busy[0], finished.append)
        after = AfterDrain(node)
        child = service.Service()
        child.setServiceParent(after)
        after.startService()
        d = after.stopService()
        self.assertTrue(child.running)
        busy[0] = False
        clock.advance(0.05)
        self.successResultOf(d)
        self.assertFalse(child.running)
        self.assertEqual(finished, [True])

    def test_already_idle_finishes_at_once(self):
        node = Drainer()
        finished = []
        node.start_drain(task.Clock(), 10, lambda: True, finished.append)
        self.assertEqual(finished, [True])
        self.successResultOf(node.when_drained())


class Trickle(resource.Resource):
    """GET /trickle/N: N chunks of 64 KiB of the test pattern, one every 20 ms."""

    isLeaf = True

    def __init__(self, fallback: resource.Resource) -> None:
        super().__init__()
        self.fallback = fallback
        self.started = 0

    def render(self, request):
        if not request.path.startswith(b"/trickle/"):
            return self.fallback.render(request)
        count = int(request.path.rsplit(b"/", 1)[1])
        data = pattern(count * CHUNK)
        request.setHeader(b"content-length", str(len(data)).encode())
        self.started += 1
        state = {"i": 0}

        def step():
            if request.finished or request._disconnected:
                loop.stop()
                return
            i = state["i"]
            request.write(data[i * CHUNK:(i + 1) * CHUNK])
            state["i"] += 1
            if state["i"] == count:
                loop.stop()
                request.finish()
        loop = task.LoopingCall(step)
        loop.start(0.02)
        request.notifyFinish().addErrback(lambda f: loop.stop() if loop.running else None)
        return server.NOT_DONE_YET


class Body(protocol.Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(reason.value)


class RelayDrain(unittest.TestCase):
    timeout = 120

    async def setUp(self):
        app = Trickle(TestApp())
        site = server.Site(app)
        site.noisy = False
        self.app_port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(self.app_port.stopListening)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)

    def start_relay(self, *extra: str):
        return spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-server", "--listen",
                                     f"tcp:{self.port}:interface=127.0.0.1", *extra],
                     child_env(PIPEGATE_JWT_SECRET=SECRET))

    def start_connector(self):
        return spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-client", "--token", token_for("t1"),
                                     f"http://127.0.0.1:{self.app_port.getHost().port}",
                                     f"ws://127.0.0.1:{self.port}/t1"],
                     child_env())

    async def get(self, path: str):
        response = await self.agent.request(b"GET", (self.base + path).encode(), Headers())
        body = Body()
        response.deliverBody(body)
        return response, body

    async def online(self, connector, times: int = 1):
        try:
            await eventually(lambda: connector.output.count(b"tunnel t1 online") >= times, timeout=30)
        except AssertionError:
            self.fail(connector.output.decode("utf-8", "replace")[-3000:])

    async def test_download_finishes_and_the_connector_reconnects(self):
        metrics = free_port()
        relay = self.start_relay("--metrics", f"tcp:{metrics}:interface=127.0.0.1")
        connector = self.start_connector()
        await self.online(connector)
        response, big = await self.get("/t1/trickle/100")  # 6.25 MiB over ~2 s
        self.assertEqual(response.code, 200)
        await eventually(lambda: len(big.received) > 0)
        _, short = await self.get("/t1/trickle/10")
        relay.transport.signalProcess(signal.SIGTERM)
        await eventually(lambda: b"draining: " in relay.output, timeout=10)
        # The metrics listener still answers while the relay drains.
        response = await self.agent.request(b"GET", f"http://127.0.0.1:{metrics}/metrics".encode(), Headers())
        scraped = Body()
        response.deliverBody(scraped)
        await scraped.done
        self.assertIn(b"pipegate_draining 1.0", scraped.received)
        self.assertRegex(bytes(scraped.received), rb"pipegate_requests_in_flight [12]\.0")
        self.assertIsInstance(await big.done, ResponseDone)
        self.assertEqual(hashlib.sha256(big.received).digest(),
                         hashlib.sha256(pattern(100 * CHUNK)).digest())
        self.assertIsInstance(await short.done, ResponseDone)
        self.assertEqual(bytes(short.received), pattern(10 * CHUNK))
        await relay.ended
        self.assertIn(b"draining: 2 request(s) in flight", relay.output)
        self.assertIn(b"drained", relay.output)
        self.assertNotIn(b"Traceback", relay.output)
        # The connector saw a GOAWAY, not an error, and comes back to the next relay.
        await eventually(lambda: b"relay is going away" in connector.output, timeout=10)
        relay2 = self.start_relay()
        await self.online(connector, 2)
        response, body = await self.get("/t1/trickle/2")
        self.assertIsInstance(await body.done, ResponseDone)
        self.assertEqual(len(body.received), 2 * CHUNK)
        self.assertNotIn(b"Traceback", connector.output)
        self.assertNotIn(b"protocol error", connector.output)
        relay2.transport.signalProcess(signal.SIGTERM)
        await relay2.ended

    async def test_an_idle_relay_says_goaway_before_it_exits(self):
        """
        With nothing in flight the drain ended in the turn it began, and twistd's shutdown
        dropped every connection before the GOAWAY and the close frame it had queued were
        written: the connector logged "1006 connection was closed uncleanly" on every relay
        restart and waited out a backoff before it redialled.
        """
        relay = self.start_relay()
        connector = self.start_connector()
        await self.online(connector)
        relay.transport.signalProcess(signal.SIGTERM)
        await relay.ended
        await eventually(lambda: b"relay is going away" in connector.output, timeout=10)
        await eventually(lambda: b"link to the relay lost (1000 relay shutting down)" in connector.output,
                         timeout=10)
        self.assertNotIn(b"1006", connector.output)
        connector.transport.signalProcess(signal.SIGTERM)
        await connector.ended

    async def test_drain_timeout_cuts_with_a_clear_status(self):
        relay = self.start_relay("--drain-timeout", "1")
        connector = self.start_connector()
        await self.online(connector)
        response, big = await self.get("/t1/trickle/400")  # ~8 s at 20 ms a chunk
        await eventually(lambda: len(big.received) > 0)
        _, short = await self.get("/t1/trickle/10")
        relay.transport.signalProcess(signal.SIGTERM)
        self.assertIsInstance(await short.done, ResponseDone)  # work that fits the drain is kept
        self.assertEqual(bytes(short.received), pattern(10 * CHUNK))
        reason = await big.done
        self.assertNotIsInstance(reason, ResponseDone)
        self.assertLess(len(big.received), 400 * CHUNK)
        await relay.ended
        self.assertIn(b"drain timeout: 1 request(s) cut", relay.output)
        self.assertNotIn(b"Traceback", relay.output)
        with self.assertRaises(Exception):  # the listener is gone with the process
            await self.get("/t1/x")

    async def test_second_sigterm_while_draining(self):
        relay = self.start_relay("--drain-timeout", "30")
        connector = self.start_connector()
        await self.online(connector)
        response, big = await self.get("/t1/trickle/400")
        await eventually(lambda: len(big.received) > 0)
        relay.transport.signalProcess(signal.SIGTERM)
        await eventually(lambda: b"draining: " in relay.output, timeout=10)
        relay.transport.signalProcess(signal.SIGTERM)   # a second one: stop now, as Ctrl-C twice
        await eventually(lambda: b"second signal: stopping now, cutting 1 drain(s)" in relay.output, timeout=10)
        self.assertNotIsInstance(await big.done, ResponseDone)
        self.assertLess(len(big.received), 400 * CHUNK)
        await relay.ended
        self.assertNotIn(b"Traceback", relay.output)
        self.assertNotIn(b"ReactorNotRunning", relay.output)
        connector.transport.signalProcess(signal.SIGTERM)
        await connector.ended


class Trickler(protocol.Protocol):
    """Backend: sends N chunks, one every 20 ms, then closes."""

    count = 100

    def connectionMade(self):
        self.i = 0
        self.loop = task.LoopingCall(self.step)
        self.loop.start(0.02)

    def step(self):
        if self.transport is None or not self.transport.connected:
            self.loop.stop()
            return
        self.transport.write(pattern(CHUNK, seed=self.i))
        self.i += 1
        if self.i == self.count:
            self.loop.stop()
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.loop.running:
            self.loop.stop()


def trickled(count: int) -> bytes:
    return b"".join(pattern(CHUNK, seed=i) for i in range(count))


class GatewayDrain(unittest.TestCase):
    timeout = 120
    ROUTER = "ab" * 32

    async def start(self, count: int, *extra: str):
        factory = protocol.Factory.forProtocol(Trickler)
        factory.noisy = False
        Trickler.count = count
        backend = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(backend.stopListening)
        mux, self.gate = free_ports(2)
        gateway = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-gateway", "--mux",
                                        f"tcp:{mux}:interface=127.0.0.1", "--listen", "127.0.0.1", *extra],
                        child_env(PIPEGATE_ROUTER=self.ROUTER))
        services = json.dumps([{"gatePort": self.gate, "serviceHost": "127.0.0.1",
                                "servicePort": backend.getHost().port}])
        provider = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-provider", "--services", services,
                                         "--connect", f"tcp:127.0.0.1:{mux}"],
                         child_env(PIPEGATE_ROUTER=self.ROUTER))
        await eventually(lambda: b"gate %d/tcp open" % self.gate in gateway.output, timeout=30)
        return gateway, provider

    async def connect(self) -> Client:
        client = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    async def test_transfer_finishes_and_the_provider_stays_up(self):
        gateway, provider = await self.start(100)
        client = await self.connect()
        await eventually(lambda: len(client.received) > 0)
        gateway.transport.signalProcess(signal.SIGTERM)
        received = await client.closed
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(trickled(100)).digest())
        await gateway.ended
        self.assertIn(b"draining: 1 connection(s) open", gateway.output)
        self.assertNotIn(b"Traceback", gateway.output)
        # The provider heard GOAWAY, keeps running and redials (no error, no traceback).
        await eventually(lambda: b"going away: gateway stopping" in provider.output, timeout=10)
        self.assertFalse(provider.ended.called)
        self.assertNotIn(b"Traceback", provider.output)
        provider.transport.signalProcess(signal.SIGTERM)
        await provider.ended

    async def test_drain_timeout_cuts_only_the_long_transfer(self):
        gateway, provider = await self.start(400, "--drain-timeout", "1")
        client = await self.connect()
        await eventually(lambda: len(client.received) > 0)
        gateway.transport.signalProcess(signal.SIGTERM)
        received = await client.closed
        self.assertLess(len(received), 400 * CHUNK)
        self.assertEqual(received, trickled(400)[:len(received)])  # what arrived is intact
        await gateway.ended
        self.assertIn(b"drain timeout: 1 connection(s) cut", gateway.output)
        self.assertNotIn(b"Traceback", gateway.output)
        provider.transport.signalProcess(signal.SIGTERM)
        await provider.ended


class ConnectorMovesOn(unittest.TestCase):
    """In process: a relay drains while another takes its address; the connector moves over."""

    async def test_goaway_dials_a_fresh_link_while_the_old_one_finishes(self):
        from tests.support import Loopback, request

        loop = Loopback(self)
        app = TestApp()
        app_port = await loop.app(app)
        relay_a, port_a = await loop.relay(drain_timeout=60)
        connector = await loop.connector(port_a, app_port, "t1")
        agent = loop.agent()
        number = port_a.getHost().port
        base = f"http://127.0.0.1:{number}"
        pending = defer.Deferred.fromCoroutine(request(agent, b"GET", base + "/t1/hang"))
        await eventually(lambda: app.hanging)
        await port_a.stopListening()  # what the relay's own listener does first on SIGTERM
        loop.ports.remove(port_a)
        stopping = relay_a.stopService()

        async def finish_drain():
            for hung in app.hanging:
                if not hung.finished and not hung._disconnected:
                    hung.finish()
            await stopping
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(finish_drain()))
        relay_b, port_b = await loop.relay(port=number)
        await eventually(lambda: "t1" in relay_b.tunnels and relay_b.tunnels["t1"].links)
        await eventually(lambda: len(connector.links) == 2)  # the old link still carries its request
        response, body = await request(agent, b"GET", base + "/t1/echo")
        self.assertEqual(response.code, 200)
        self.assertFalse(stopping.called)
        app.hanging[0].write(b"finished on the old relay")
        app.hanging[0].finish()
        response, body = await pending
        self.assertEqual((response.code, body), (200, b"finished on the old relay"))
        await stopping
        await eventually(lambda: len(connector.links) == 1)
        self.assertEqual(relay_a.stats.get("drain_cut"), 0)
        self.assertEqual(connector.stats.get("reconnects"), 1)


class ProviderMovesOn(unittest.TestCase):
    """In process: a gateway drains while another takes its address; the provider moves over."""

    async def test_goaway_redials_while_the_old_link_finishes(self):
        from twisted.application import service

        from pipegate.mux import frames, tls
        from pipegate.mux.node import link_services
        from pipegate.mux.session import LinkConfig, LinkFactory
        from pipegate.ports.gateway import Gateway, GatewayConfig
        from pipegate.ports.provider import Provider, ProviderConfig
        from pipegate.ports.services import Service
        from tests.test_ports_e2e import CERT, SECRET, Echo

        echo = protocol.Factory.forProtocol(Echo)
        echo.noisy = False
        backend = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(echo)
        self.addCleanup(backend.stopListening)
        gate, mux_port = free_ports(2)

        async def gateway():
            gw = Gateway(GatewayConfig(drain_timeout=60), reactor)
            gw.startService()
            config = LinkConfig(secret=SECRET, role=frames.ROLE_GATEWAY)
            factory = tls.server_factory(CERT, LinkFactory(gw, config, reactor, False))
            listening = await endpoints.TCP4ServerEndpoint(
                reactor, mux_port, interface="127.0.0.1").listen(factory)
            return gw, listening

        gw_a, mux_a = await gateway()
        provider = Provider(ProviderConfig(services=(Service(gate, "127.0.0.1", backend.getHost().port),)),
                            reactor)
        top = service.MultiService()
        provider.setServiceParent(top)
        dialers = service.MultiService()
        dialers.setServiceParent(top)
        config = LinkConfig(secret=SECRET, role=frames.ROLE_PROVIDER)
        for svc in link_services(provider, config, reactor, [], [f"tcp:127.0.0.1:{mux_port}"],
                                 certificate=CERT, retry_policy=lambda n: 0.1):
            svc.setServiceParent(dialers)
        top.startService()
        await eventually(lambda: (gate, "tcp") in gw_a.gates)

        old = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate), old)
        old.transport.write(b"before")
        await eventually(lambda: bytes(old.received) == b"before")

        await mux_a.stopListening()
        stopping = gw_a.stopService()
        gw_b, mux_b = await gateway()

        async def cleanup():
            if old.transport.connected:
                old.transport.abortConnection()
            await stopping
            await top.stopService()
            for link in list(gw_b.links):
                link.fail("test over")
            await gw_b.stopService()
            await mux_b.stopListening()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cleanup()))

        await eventually(lambda: (gate, "tcp") in gw_b.gates)  # the provider redialled
        self.assertEqual(len(provider.links), 2)
        new = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate), new)
        new.transport.write(b"through b")
        new.transport.loseWriteConnection()
        self.assertEqual(await new.closed, b"through bbye")
        old.transport.write(b" after")  # still carried by the draining gateway
        old.transport.loseWriteConnection()
        self.assertEqual(await old.closed, b"before afterbye")
        await stopping
        self.assertEqual(gw_a.stats.get("drain_cut"), 0)
        await eventually(lambda: len(provider.links) == 1)
        await eventually(lambda: len(list(dialers)) == 1)  # the old dialler is gone


class ConnectorDrain(unittest.TestCase):
    """
    Issue 18 item 2: SIGTERM to a real `twistd pipegate-client` with 20 requests in flight
    used to fail all 20 with 502 "connector disconnected".  Now the connector says GOAWAY
    (the relay sends it nothing new), finishes what is in flight within --drain-timeout,
    and exits 0; requests that arrive meanwhile go to the other connector.
    """

    timeout = 120

    async def setUp(self):
        from tests.support import Loopback

        self.loop = Loopback(self)
        self.app = TestApp()
        self.app_port = await self.loop.app(self.app)
        self.relay, self.relay_port = await self.loop.relay()
        self.base = f"http://127.0.0.1:{self.relay_port.getHost().port}"
        self.agent = self.loop.agent()

    def start_connector(self, *extra: str):
        # One token for both connectors of t1: a second, unshared token would get 409 (issue 20).
        self.token = token_for("t1")
        return spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-client", "--token", self.token,
                                     *extra, f"http://127.0.0.1:{self.app_port.getHost().port}",
                                     f"ws://127.0.0.1:{self.relay_port.getHost().port}/t1"],
                     child_env())

    async def answer(self, path: str):
        response = await self.agent.request(b"GET", (self.base + path).encode(), Headers())
        body = Body()
        response.deliverBody(body)
        await body.done
        return response.code, bytes(body.received)

    async def clean_exit(self, child):
        # twistd ends an orderly SIGTERM shutdown by re-raising SIGTERM on itself, so the
        # exit status says "terminated by SIGTERM" (systemd counts it as clean), as for
        # the relay and the gateway; python -m pipegate.client exits 0.
        code = await child.ended
        self.assertTrue(code == 0 or child.signal == signal.SIGTERM, (code, child.signal))
        self.assertIn(b"Server Shut Down.", child.output)

    async def test_requests_in_flight_finish_and_the_process_exits_cleanly(self):
        child = self.start_connector()
        await eventually(lambda: b"tunnel t1 online" in child.output, timeout=30)
        tunnel = self.relay.tunnels["t1"]
        child_link = tunnel.links[0]
        # A second connector (in this process) takes what arrives during the drain.
        await self.loop.connector(self.relay_port, self.app_port, "t1", token=self.token)
        calls = [defer.ensureDeferred(self.answer(f"/t1/slow/1.5?i={i}")) for i in range(40)]
        await eventually(lambda: len(child_link.streams) >= 20, timeout=10)
        child.transport.signalProcess(signal.SIGTERM)
        await eventually(lambda: child_link not in tunnel.links, timeout=10)
        late = await self.answer("/t1/after?x=1")  # served by the other connector
        self.assertEqual(late[0], 200)
        results = await defer.gatherResults(calls)
        self.assertEqual([code for code, _ in results], [200] * 40)
        self.assertTrue(all(body == b"late answer" for _, body in results))
        await self.clean_exit(child)
        self.assertRegex(bytes(child.output), rb"draining: \d+ request\(s\) in flight, up to 30 s")
        self.assertNotIn(b"Traceback", child.output)

    async def test_drain_timeout_cuts_what_is_left(self):
        child = self.start_connector("--drain-timeout", "0.5")
        await eventually(lambda: b"tunnel t1 online" in child.output, timeout=30)
        call = defer.ensureDeferred(self.answer("/t1/hang"))
        await eventually(lambda: self.app.hanging)
        child.transport.signalProcess(signal.SIGTERM)
        code, body = await call
        self.assertEqual(code, 502)
        await self.clean_exit(child)
        self.assertIn(b"drain timeout: 1 request(s) cut", child.output)
