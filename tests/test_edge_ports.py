"""
The port plane's public edge against hostile clients (issue 17, items 3, 4, 13, 15 and
issue 18 item 16), on real loopback sockets: a real gateway and real providers joined by
real TLS mux links, real TCP and UDP backends, attackers spread over 127.0.0.x.  Each
test runs the attack and checks that the attacker is held to its cap AND that other
clients keep working.  The fd-exhaustion attacks against real twistd processes under a
lowered RLIMIT_NOFILE are in tests/test_edge_processes.py.
"""

from __future__ import annotations

import socket

from twisted.application import service
from twisted.internet import defer, endpoints, protocol, reactor, task, threads
from twisted.logger import Logger, formatEvent
from twisted.python import usage
from twisted.trial import unittest

from pipegate.accept import ConnectionGate, EmfileGuard
from pipegate.core.budget import Budget
from pipegate.mux import frames
from pipegate.mux.node import link_services
from pipegate.mux.session import LinkConfig
from pipegate.ports import gateway as gateway_module
from pipegate.ports import provider as provider_module
from pipegate.ports.gateway import GatewayConfig
from pipegate.ports.services import Service
from pipegate.ports.udp import Flow, Hold
from pipegate.tap import gateway as gateway_tap
from tests.support import eventually, free_port, read_steadily

from tests.test_ports_e2e import CERT, SECRET, Client, Echo, PortPlane, UDPEcho


class Held(Client):
    """A client connection that records whether it is still open."""

    def connectionMade(self):
        self.open = True

    def connectionLost(self, reason):
        self.open = False
        super().connectionLost(reason)


class TCPGateCaps(PortPlane):
    async def setUp(self):
        super().setUp()
        self.backend = await self.backend_echo()
        self.gate = free_port()

    async def serve(self, **config):
        self.gw, self.mux = await self.gateway(**config)
        self.prov = self.provider(self.mux, [Service(self.gate, "127.0.0.1", self.backend.getHost().port)])
        await self.open_tcp_gate(self.gw, self.gate)

    async def connect_from(self, source: str) -> Held:
        client = Held()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate, bindAddress=(source, 0))
        await endpoints.connectProtocol(endpoint, client)
        self.cleanups.append(lambda: client.transport.abortConnection() if client.open else None)
        return client

    async def echo_from(self, source: str, data: bytes = b"ping") -> bytes:
        client = await self.connect_from(source)
        client.transport.write(data)
        client.transport.loseWriteConnection()
        return await client.closed

    async def test_idle_connections_from_one_ip_are_capped_and_others_still_served(self):
        await self.serve(tcp_per_source=5, tcp_total=100)
        held = [await self.connect_from("127.0.0.2") for _ in range(12)]
        await eventually(lambda: sum(not c.open for c in held) == 7)
        await task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual([c.open for c in held], [True] * 5 + [False] * 7)
        self.assertEqual(self.gw.stats.get("cap_refusals", "tcp-per-source"), 7)
        # The five held connections still work, and so does everybody else.
        held[0].transport.write(b"still here")
        await eventually(lambda: bytes(held[0].received) == b"still here")
        self.assertEqual(await self.echo_from("127.0.0.3"), b"pingbye")
        # One log line for the burst, not one per refusal.
        lines = [e for e in self.events if "new connection refused" in formatEvent(e)]
        self.assertEqual(len(lines), 1)
        self.assertTrue(self.logged("per-source cap of 5 reached"))
        # A slot comes back when a held connection goes.
        held[1].transport.loseConnection()
        await eventually(lambda: self.gw.tcp_budget.held("127.0.0.2") == 4)
        self.assertEqual(await self.echo_from("127.0.0.2"), b"pingbye")

    async def test_one_ip_opening_and_closing_connections_is_rate_limited(self):
        # The per-IP cap bounds connections held at once, not an address that opens one,
        # sends a byte and closes, over and over: each costs the gateway and the provider a
        # channel and a connection to the service.  --conn-rate-per-ip bounds that.
        await self.serve(tcp_per_source=5, tcp_total=100, tcp_rate_per_source=1)
        echoed = 0
        for _ in range(20):
            echoed += await self.echo_from("127.0.0.2") == b"pingbye"
        self.assertLessEqual(echoed, 6)          # the burst of 5, and what 1/s refilled meanwhile
        self.assertGreaterEqual(echoed, 5)
        self.assertEqual(self.gw.stats.get("cap_refusals", "tcp-rate"), 20 - echoed)
        lines = [formatEvent(e) for e in self.events if "new connection refused" in formatEvent(e)]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("rate cap of 1 new connections a second (bursts of 5) reached", lines[0])
        self.assertEqual(self.gw.tcp_budget.held("127.0.0.2"), 0)   # a refusal gives its unit back
        self.assertEqual(await self.echo_from("127.0.0.3"), b"pingbye")   # everyone else still gets in

    async def test_total_cap_spread_over_many_ips(self):
        await self.serve(tcp_per_source=3, tcp_total=8)
        held = []
        for n in range(2, 7):   # five IPs, three each: 15 tries, 8 held
            held += [await self.connect_from(f"127.0.0.{n}") for _ in range(3)]
        await eventually(lambda: sum(not c.open for c in held) == 7)
        self.assertEqual(self.gw.tcp_budget.held(), 8)
        self.assertEqual(self.gw.stats.get("cap_refusals", "tcp-total"), 7)
        for client in held:
            if client.open:
                client.transport.loseConnection()
        await eventually(lambda: self.gw.tcp_budget.held() == 0)
        self.assertEqual(await self.echo_from("127.0.0.7"), b"pingbye")

    async def test_idle_connections_are_closed_by_default(self):
        self.assertGreater(GatewayConfig().tcp_idle_timeout, 0)
        options = gateway_tap.Options()
        options.environ = {}
        options.parseOptions(["--router", "ab" * 32, "--mux", "tcp:0"])
        self.assertEqual(options["tcp-idle-timeout"], 900)
        await self.serve(tcp_idle_timeout=0.5)
        idle = await self.connect_from("127.0.0.2")
        await idle.closed
        self.assertEqual(self.gw.tcp_budget.held(), 0)

    async def test_gates_listen_with_a_deep_accept_queue(self):
        """
        300 clients connect at once, each writes one byte and half-closes.  With Twisted's
        default queue of 50 the kernel overflows it; with SYN cookies (Linux's default) a
        connection is then rebuilt from a later segment and the bytes before it are lost
        for good: clients got only "bye".  A queue of 1,024 serves them all.
        """
        factory = protocol.Factory.forProtocol(Echo)
        factory.noisy = False
        deep = await endpoints.TCP4ServerEndpoint(reactor, 0, backlog=1024, interface="127.0.0.1").listen(factory)
        self.cleanups.append(deep.stopListening)   # the backend's own queue is not under test
        self.backend = deep
        await self.serve()
        listening = self.gw.gates[(self.gate, "tcp")][0]
        self.assertEqual(listening.backlog, 1024)
        answers = await defer.gatherResults([
            defer.ensureDeferred(self.echo_from(f"127.0.0.{2 + i % 100}", b"x")) for i in range(300)])
        self.assertEqual({a: answers.count(a) for a in set(answers)}, {b"xbye": 300})

class ProviderCaps(PortPlane):
    async def setUp(self):
        super().setUp()
        self.backend = await self.backend_echo()
        self.gate = free_port()

    async def test_a_full_provider_answers_open_fail_and_the_next_one_serves(self):
        gw, mux = await self.gateway(open_timeout=30)
        small = self.provider(mux, [Service(self.gate, "127.0.0.1", self.backend.getHost().port)], max_backends=2)
        await eventually(lambda: (self.gate, "tcp") in gw.gates)
        held = [await self.connect(self.gate) for _ in range(2)]
        for client in held:
            client.transport.write(b"x")
        await eventually(lambda: all(c.received == b"x" for c in held))
        self.assertEqual(small.backends.held(), 2)
        # The only provider is full: the client is closed at once, not after the open timeout.
        start = reactor.seconds()
        self.assertEqual(await self.echo_through(self.gate), b"")
        self.assertLess(reactor.seconds() - start, 5)
        self.assertEqual(small.stats.get("cap_refusals", "backend-total"), 1)
        self.assertTrue(self.logged("backend total cap reached"))
        # A second provider for the same gate: the OPEN_FAIL sends every client there.
        big = self.provider(mux, [Service(self.gate, "127.0.0.1", self.backend.getHost().port)])
        await eventually(lambda: len(gw.exposed().get((self.gate, "tcp"), [])) == 2)
        for _ in range(4):
            self.assertEqual(await self.echo_through(self.gate), b"pingbye")
        self.assertEqual(small.backends.held(), 2)
        await eventually(lambda: big.backends.held() == 0)  # all four finished
        self.assertEqual(big.stats.get("cap_refusals", "backend-total"), 0)
        # Slots come back when channels end.
        for client in held:
            client.transport.loseConnection()
        await eventually(lambda: small.backends.held() == 0)

    async def test_udp_flows_take_at_most_their_share_of_backends(self):
        self.patch(provider_module, "EVICT_MIN_IDLE", 0.3)
        udp_backend = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")
        self.cleanups.append(udp_backend.stopListening)
        udp_gate = free_port(socket.SOCK_DGRAM)
        gw, mux = await self.gateway()
        prov = self.provider(mux, [Service(udp_gate, "127.0.0.1", udp_backend.getHost().port, protocol="udp"),
                                   Service(self.gate, "127.0.0.1", self.backend.getHost().port)],
                             max_backends=10, max_udp_flows=4)
        await eventually(lambda: (udp_gate, "udp") in gw.gates and (self.gate, "tcp") in gw.gates)
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(12)]
        for n, s in enumerate(senders):
            self.addCleanup(s.close)
            s.bind((f"127.0.0.{2 + n}", 0))
            s.sendto(b"flood", ("127.0.0.1", udp_gate))
        await eventually(lambda: prov.stats.get("cap_refusals", "udp-total") == 8)
        self.assertEqual(prov.udp_flows.held(), 4)
        # TCP still has its room.
        for _ in range(3):
            self.assertEqual(await self.echo_through(self.gate), b"pingbye")
        # Once the flood's flows have idled, a new client's flow takes the place of the
        # longest-idle one.
        await task.deferLater(reactor, 0.5, lambda: None)
        legit = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(legit.close)
        legit.bind(("127.0.0.60", 0))
        legit.settimeout(0)
        legit.sendto(b"legit", ("127.0.0.1", udp_gate))
        got = []

        def answered():
            try:
                got.append(legit.recv(100))
            except BlockingIOError:
                pass
            return got
        await eventually(answered)
        self.assertEqual(got, [b"legit"])
        self.assertEqual(prov.stats.get("evicted_flows"), 1)
        self.assertEqual(prov.udp_flows.held(), 4)


class FailureLogs(PortPlane):
    """Issue 17 review: a dead backend, or a provider that never answers, logged one line per client."""

    async def test_a_dead_backend_logs_one_line_per_interval(self):
        gate = free_port()
        gw, mux = await self.gateway()
        self.provider(mux, [Service(gate, "127.0.0.1", free_port())])   # nothing listens there
        await eventually(lambda: (gate, "tcp") in gw.gates)
        for _ in range(8):
            self.assertEqual(await self.echo_through(gate), b"")
        lines = [formatEvent(e) for e in self.events if "failed: Connection was refused" in formatEvent(e)]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("(0 more failures of this service in the last interval)", lines[0])

    def test_open_timeouts_log_one_line_per_gate_per_interval(self):
        from tests.test_udp_flow import OpenLink, open_through

        clock = task.Clock()
        gw = gateway_module.Gateway(GatewayConfig(open_timeout=5), clock)
        events = []
        gw.log = Logger(observer=events.append)
        for n in range(6):
            flow = Flow(clock, 0, lambda d: None, lambda f: None)
            flow.client_address = ("127.0.0.2", 4000 + n)
            flow.open_failed = lambda f=flow: f.close(notify=False)
            open_through(gw, (5353, "udp"), flow, OpenLink())
        clock.advance(5)
        lines = [formatEvent(e) for e in events if "did not answer" in formatEvent(e)]
        self.assertEqual(len(lines), 1, lines)
        clock.advance(10)
        flow = Flow(clock, 0, lambda d: None, lambda f: None)
        flow.client_address = ("127.0.0.2", 5000)
        flow.open_failed = lambda: flow.close(notify=False)
        open_through(gw, (5353, "udp"), flow, OpenLink())
        clock.advance(5)
        lines = [formatEvent(e) for e in events if "did not answer" in formatEvent(e)]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("(5 more timeouts on this gate in the last interval)", lines[1])


class MuxListenerCaps(PortPlane):
    """
    Issue 17 review: the gateway's and provider's own --mux listeners had no connection
    caps, Twisted's default backlog, no EMFILE guard, and one warning per pre-admission failure.
    """

    async def gateway_mux(self, budget: Budget, rate=None):
        """A gateway and its --mux listener held to C{budget} and C{rate}: (gateway, listening port)."""
        gw = gateway_module.Gateway(GatewayConfig(), reactor)
        gw.startService()
        self.cleanups.append(gw.stopService)
        self.cleanups.append(lambda: self._drop_links(gw))
        guard = EmfileGuard(reactor)
        config = LinkConfig(secret=SECRET, role=frames.ROLE_GATEWAY, ping_interval=0.5, ping_deadline=2,
                            handshake_timeout=30)
        (listening,) = link_services(gw, config, reactor, [f"tcp:{free_port()}:interface=127.0.0.1"], [],
                                     certificate=CERT, budget=budget, guard=guard, rate=rate)
        listening.startService()
        self.cleanups.append(listening.stopService)
        await eventually(lambda: guard.ports)
        return gw, guard.ports[0]

    async def test_strangers_are_capped_and_logged_once_and_a_provider_still_joins(self):
        budget = Budget(3, 10)
        gw, mux = await self.gateway_mux(budget)
        port = mux.getHost().port
        strangers = []
        for _ in range(8):
            client = Held()
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=("127.0.0.2", 0))
            await endpoints.connectProtocol(endpoint, client)
            self.cleanups.append(lambda c=client: c.transport.abortConnection() if c.open else None)
            strangers.append(client)
        await eventually(lambda: sum(not c.open for c in strangers) == 5)
        self.assertEqual(gw.stats.get("admission_failures", "cap"), 5)
        refusals = [e for e in self.events if "connection refused, per-source cap of 3" in formatEvent(e)]
        self.assertEqual(len(refusals), 1)
        # Another address still gets in: a provider joins and serves.
        backend = await self.backend_echo()
        gate = free_port()
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await self.open_tcp_gate(gw, gate)
        self.assertEqual(await self.echo_through(gate), b"pingbye")
        # The three held strangers fail the handshake: one warning, not three.
        for client in strangers:
            if client.open:
                client.transport.write(b"\x16\x03\x01\x00\x05hello")
        await eventually(lambda: budget.held() == 1)   # only the provider's link is left
        warnings = [formatEvent(e) for e in self.events if "link with 127.0.0.2" in formatEvent(e)]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("more links ended before admission in the last interval", warnings[0])

    async def test_new_connections_per_ip_are_rate_limited_and_a_provider_still_joins(self):
        # A per-IP cap on connections held at once does not stop a stranger who opens and
        # closes them one after another, each a TLS handshake: --mux-conn-rate-per-ip does.
        from pipegate.core.budget import SourceRate

        gw, mux = await self.gateway_mux(Budget(100, 1000), SourceRate(rate=1, burst=5))
        accepted = 0
        for _ in range(20):                        # one after another, each closed at once
            client = Held()
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", mux.getHost().port,
                                                    bindAddress=("127.0.0.2", 0))
            await endpoints.connectProtocol(endpoint, client)
            await task.deferLater(reactor, 0.02, lambda: None)
            accepted += client.open
            if client.open:
                client.transport.abortConnection()
        self.assertLessEqual(accepted, 6)          # the burst of 5, and what 1/s refilled meanwhile
        self.assertGreaterEqual(gw.stats.get("admission_failures", "cap"), 14)
        refusals = [formatEvent(e) for e in self.events if "connection refused, rate cap" in formatEvent(e)]
        self.assertEqual(len(refusals), 1, refusals)
        self.assertIn("1 new connections a second (bursts of 5)", refusals[0])
        # Another address still gets in: a provider joins and serves.
        backend = await self.backend_echo()
        gate = free_port()
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await self.open_tcp_gate(gw, gate)
        self.assertEqual(await self.echo_through(gate), b"pingbye")


class UDPGateCaps(PortPlane):
    async def setUp(self):
        super().setUp()
        self.backend = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")
        self.cleanups.append(self.backend.stopListening)
        self.gate = free_port(socket.SOCK_DGRAM)

    async def serve(self, **config):
        self.gw, self.mux = await self.gateway(**config)
        self.prov = self.provider(self.mux, [Service(self.gate, "127.0.0.1", self.backend.getHost().port,
                                                     protocol="udp")])
        await eventually(lambda: (self.gate, "udp") in self.gw.gates)

    def sender(self, source: str) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind((source, 0))
        s.setblocking(False)
        return s

    @staticmethod
    def answers(s: socket.socket) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(s.recv(65535))
            except BlockingIOError:
                return out

    async def test_flows_per_ip_are_capped_and_others_still_served(self):
        await self.serve(udp_per_source=4)
        flood = [self.sender("127.0.0.2") for _ in range(10)]
        for s in flood:
            s.sendto(b"hi", ("127.0.0.1", self.gate))
        await eventually(lambda: self.gw.stats.get("cap_refusals", "udp-per-source") == 6)
        self.assertEqual(self.gw.udp_budget.held("127.0.0.2"), 4)
        got = {}

        def answered():
            for n, s in enumerate(flood):
                got.setdefault(n, []).extend(self.answers(s))
            return sum(1 for v in got.values() if v) == 4
        await eventually(answered)
        other = self.sender("127.0.0.3")
        other.sendto(b"legit", ("127.0.0.1", self.gate))
        seen = []
        await eventually(lambda: seen.extend(self.answers(other)) or seen == [b"legit"])
        self.assertTrue(self.logged("new flow refused: per-source cap of 4 reached"))

    async def test_a_full_table_evicts_only_flows_idle_long_enough(self):
        self.patch(gateway_module, "EVICT_MIN_IDLE", 0.4)
        await self.serve(udp_per_source=0, udp_total=4)
        legit = self.sender("127.0.0.9")
        echoes = []

        def talk():
            legit.sendto(b"legit", ("127.0.0.1", self.gate))
            echoes.extend(self.answers(legit))
        talking = task.LoopingCall(talk)
        talking.start(0.05)
        self.addCleanup(lambda: talking.running and talking.stop())
        await eventually(lambda: echoes)
        # The attacker fills the table from three addresses...
        for n in range(2, 5):
            self.sender(f"127.0.0.{n}").sendto(b"x", ("127.0.0.1", self.gate))
        await eventually(lambda: self.gw.udp_budget.held() == 4)
        # ... and new flows right away are dropped: nothing is idle long enough to go.
        for n in range(10, 20):
            self.sender(f"127.0.0.{n}").sendto(b"x", ("127.0.0.1", self.gate))
        await eventually(lambda: self.gw.stats.get("cap_refusals", "udp-total") == 10)
        self.assertEqual(self.gw.stats.get("evicted_flows"), 0)
        # Once the attacker's flows have idled, new flows replace them: the longest-idle
        # first, never the legitimate flow that keeps talking.
        await task.deferLater(reactor, 0.6, lambda: None)
        for n in range(20, 40):
            self.sender(f"127.0.0.{n}").sendto(b"x", ("127.0.0.1", self.gate))
        await eventually(lambda: self.gw.stats.get("evicted_flows") >= 3)
        self.assertEqual(self.gw.udp_budget.held("127.0.0.9"), 1)
        before = len(echoes)
        await eventually(lambda: len(echoes) > before + 3)
        self.assertLessEqual(self.gw.udp_budget.held(), 4)

    async def test_a_sender_at_its_own_cap_never_evicts_other_flows(self):
        """
        Issue 17 review: with the table full, a sender already at its per-IP cap made the
        gateway evict somebody else's idle flow and only then refused the sender.
        """
        self.patch(gateway_module, "EVICT_MIN_IDLE", 0.2)
        await self.serve(udp_per_source=2, udp_total=4)
        victims = [self.sender("127.0.0.3") for _ in range(2)]
        for s in victims:
            s.sendto(b"v", ("127.0.0.1", self.gate))
        await eventually(lambda: self.gw.udp_budget.held("127.0.0.3") == 2)
        for _ in range(2):
            self.sender("127.0.0.2").sendto(b"x", ("127.0.0.1", self.gate))
        await eventually(lambda: self.gw.udp_budget.held() == 4)
        await task.deferLater(reactor, 0.4, lambda: None)   # every flow is now evictable
        for _ in range(6):
            self.sender("127.0.0.2").sendto(b"x", ("127.0.0.1", self.gate))
        await eventually(lambda: self.gw.stats.get("cap_refusals", "udp-per-source") == 6)
        self.assertEqual(self.gw.stats.get("evicted_flows"), 0)
        self.assertEqual(self.gw.udp_budget.held("127.0.0.3"), 2)
        # A sender under its cap still makes room: the longest-idle flow goes.
        self.sender("127.0.0.4").sendto(b"x", ("127.0.0.1", self.gate))
        await eventually(lambda: self.gw.stats.get("evicted_flows") == 1)
        self.assertEqual(self.gw.udp_budget.held("127.0.0.4"), 1)

    async def test_a_burst_before_the_flow_opens_is_held_up_to_its_bound(self):
        await self.serve(udp_hold=10 * 1064, udp_hold_total=1_000_000)   # 1000 + 64 bytes each
        s = self.sender("127.0.0.2")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        for _ in range(40):   # 40 kB at once: 10 kB is held until the flow opens
            s.sendto(b"d" * 1000, ("127.0.0.1", self.gate))
        got = []
        await eventually(lambda: got.extend(self.answers(s)) or len(got) >= 10)
        await task.deferLater(reactor, 0.3, lambda: None)
        got.extend(self.answers(s))
        self.assertEqual(len(got), 10)
        self.assertEqual(self.gw.stats.get("held_datagrams_dropped"), 30)
        self.assertEqual(self.gw.hold.used, 0)


class OversizedDatagrams(PortPlane):
    """
    A UDP datagram over IPv6 may carry up to 65,527 bytes, more than a DATAGRAM frame's
    65,507 (the largest IPv4 payload).  One such datagram from anyone, to a gate on an
    IPv6 address, closed the gateway's whole link to the provider: every channel on it.
    """

    async def test_an_oversized_datagram_is_dropped_and_the_link_stays(self):
        backend = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")
        self.cleanups.append(backend.stopListening)
        gate = free_port(socket.SOCK_DGRAM)
        gw, mux = await self.gateway(listen="::1")
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port, protocol="udp")])
        await eventually(lambda: (gate, "udp") in gw.gates)
        link = gw.links[0] if isinstance(gw.links, list) else next(iter(gw.links))
        senders = []
        for _ in range(2):
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.addCleanup(s.close)
            s.bind(("::1", 0))
            s.setblocking(False)
            senders.append(s)

        async def echoed(s, data):
            s.sendto(data, ("::1", gate))
            got = []
            await eventually(lambda: got.extend(UDPGateCaps.answers(s)) or data in got)
        attached, fresh = senders
        await echoed(attached, b"hello")            # its flow's channel is open below
        for s in (attached, fresh):                 # an open flow, and a new one
            s.sendto(b"x" * 65_520, ("::1", gate))
        await eventually(lambda: gw.dropped_datagrams >= 2)
        for s in (attached, fresh):
            await echoed(s, b"still here")
        self.assertEqual(list(gw.links), [link])
        self.assertFalse(self.logged("DATAGRAM payload"))


class HoldTests(unittest.SynchronousTestCase):
    def test_default_holds_one_round_trip_at_one_gigabit(self):
        hold = Hold()
        self.assertGreaterEqual(hold.per_flow, 1_000_000_000 // 8 * 20 // 1000)  # 20 ms at 1 Gbit/s
        clock = task.Clock()
        flow = Flow(clock, 0, lambda d: None, lambda f: None, Hold(per_flow=3000, total=5000))
        for _ in range(5):
            flow.outbound(b"x" * 1000)
        self.assertEqual((flow.held, flow.dropped, flow.hold.used), (2128, 3, 2128))  # 1000 + 64 each
        flow.close(notify=False)
        self.assertEqual(flow.hold.used, 0)

    def test_total_hold_is_shared(self):
        clock = task.Clock()
        shared = Hold(per_flow=3000, total=4000)
        a = Flow(clock, 0, lambda d: None, lambda f: None, shared)
        b = Flow(clock, 0, lambda d: None, lambda f: None, shared)
        for _ in range(3):
            a.outbound(b"x" * 936)
            b.outbound(b"x" * 936)
        self.assertEqual((a.held, b.held, shared.used, shared.dropped), (2000, 2000, 4000, 2))

    def test_empty_datagrams_are_not_free(self):
        """Issue 17 review: the hold counted payload bytes only, so empty datagrams piled up unbounded."""
        clock = task.Clock()
        flow = Flow(clock, 0, lambda d: None, lambda f: None, Hold(per_flow=640, total=10_000))
        for _ in range(1000):
            flow.outbound(b"")
        self.assertEqual((len(flow.backlog), flow.held, flow.dropped), (10, 640, 990))


class UnlimitedFlood(PortPlane):
    """Bad /unlimited tokens from rotating IPs: the key derivations are bounded, others are served."""

    async def test_bad_tokens_from_rotating_ips_cost_at_most_the_kdf_rate(self):
        from twisted.web import server

        from pipegate.ports.unlimited import UnlimitedGate, UnlimitedResource, make_token

        backend = await self.backend_echo()
        gate = free_port()
        gw, mux = await self.gateway()
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await self.open_tcp_gate(gw, gate)
        unlimited = UnlimitedGate("a-long-enough-secret", kdf_rate=10)
        site = server.Site(UnlimitedResource(unlimited, gw.grants, reactor))
        site.noisy = False
        http = await self.listen_tcp(site)
        start = reactor.seconds()

        async def attempt(n: int) -> int:
            source = f"127.0.{1 + n // 250}.{2 + n % 250}"   # a new IP every time
            token = make_token("not-the-secret!!", source, reactor.seconds() * 1000)
            client = Client()
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", http.getHost().port,
                                                    bindAddress=(source, 0))
            await endpoints.connectProtocol(endpoint, client)
            client.transport.write(b"GET /unlimited?payload=%s HTTP/1.0\r\n\r\n" % token.encode())
            return int((await client.closed).split(b" ", 2)[1])

        codes = await defer.gatherResults([defer.ensureDeferred(attempt(n)) for n in range(200)])
        elapsed = reactor.seconds() - start
        # Every answer is a refusal; at most burst + rate * elapsed of them cost a key derivation.
        self.assertEqual(set(codes) - {403, 503}, set())
        self.assertLessEqual(codes.count(403), 10 + 10 * elapsed + 1)
        self.assertEqual(codes.count(503), unlimited.kdf_refused)
        self.assertGreater(unlimited.kdf_refused, 0)
        # Other traffic is served meanwhile and after.
        self.assertEqual(await self.echo_through(gate), b"pingbye")
        # A legitimate token still works once the budget has refilled.
        await task.deferLater(reactor, 0.2, lambda: None)
        status, body = unlimited.check(make_token("a-long-enough-secret", "127.0.0.1", reactor.seconds() * 1000),
                                       "127.0.0.1", reactor.seconds() * 1000)
        self.assertEqual(status, 200)


class Options(unittest.SynchronousTestCase):
    def parse(self, *args):
        options = gateway_tap.Options()
        options.environ = {}
        options.parseOptions(["--router", "ab" * 32, "--mux", "tcp:0", *args])
        return options

    def test_a_short_unlimited_secret_is_refused_with_advice(self):
        with self.assertRaises(usage.UsageError) as e:
            self.parse("--unlimited-secret", "hunter2hunter2")
        message = str(e.exception)
        self.assertTrue(message.startswith("--unlimited-secret: at least 16 characters"), message)
        self.assertIn("openssl rand -hex 32", message)
        self.assertNotIn("\n", message)
        self.assertEqual(self.parse("--unlimited-secret", "x" * 16)["unlimited-secret"], "x" * 16)

    def test_caps_default_to_the_fd_budget(self):
        from pipegate.fdlimit import FdBudget

        options = self.parse()
        caps = gateway_tap.gate_caps(options, FdBudget(before=1024, soft=1024, hard=1024))
        self.assertEqual(caps, {"max-conns-per-ip": 240, "max-conns": 960,
                                "max-flows-per-ip": 256, "max-flows": 16384})
        options = self.parse("--max-conns-per-ip", "0", "--max-conns", "50")
        caps = gateway_tap.gate_caps(options, FdBudget(before=1024, soft=1024, hard=1024))
        self.assertEqual((caps["max-conns-per-ip"], caps["max-conns"]), (0, 50))
        self.assertEqual((self.parse()["conn-rate-per-ip"], self.parse("--conn-rate-per-ip", "0")["conn-rate-per-ip"]),
                         (100, 0))
        with self.assertRaises(usage.UsageError):
            self.parse("--max-flows", "-1")

    def test_provider_caps_default_to_the_fd_budget(self):
        from pipegate.fdlimit import FdBudget
        from pipegate.tap import provider as provider_tap

        options = provider_tap.Options()
        options.environ = {"PIPEGATE_MAX_UDP_BACKENDS": "100"}
        options.parseOptions(["--router", "ab" * 32, "--connect", "tcp:127.0.0.1:1"])
        caps = provider_tap.backend_caps(options, FdBudget(before=1024, soft=1024, hard=1024))
        self.assertEqual(caps, {"max-backends": 960, "max-backends-per-ip": 480, "max-udp-backends": 100})
        # With room, one client IP may hold at the provider what a gateway lets it hold (256
        # TCP + 256 UDP), so the provider's per-IP cap does not bind first (issue 17 review).
        caps = provider_tap.backend_caps(options, FdBudget(before=65536, soft=65536, hard=65536))
        gate = gateway_tap.gate_caps(self.parse(), FdBudget(before=65536, soft=65536, hard=65536))
        self.assertEqual(caps["max-backends-per-ip"], gate["max-conns-per-ip"] + gate["max-flows-per-ip"])

    def test_both_services_cap_and_guard_their_mux_listeners(self):
        from pipegate.accept import _Watched
        from pipegate.tap import provider as provider_tap

        self.assertEqual((self.parse()["mux-max-conns-per-ip"], self.parse()["mux-max-conns"]), (100, 2000))
        options = provider_tap.Options()
        options.environ = {"PIPEGATE_MUX_MAX_CONNS_PER_IP": "7"}
        options.parseOptions(["--router", "ab" * 32, "--mux", "tcp:0:interface=127.0.0.1"])
        self.assertEqual(options["mux-max-conns-per-ip"], 7)
        for top in (provider_tap.makeService(options, reactor),
                    gateway_tap.makeService(self.parse(), reactor)):
            guards = [s for s in top if isinstance(s, EmfileGuard)]
            self.assertEqual(len(guards), 1)
            (mux,) = [s for s in top if isinstance(getattr(s, "endpoint", None), _Watched)
                      and isinstance(s.factory, ConnectionGate)]
            self.assertIs(mux.endpoint.guard, guards[0])
            # _backlog is private (TCP4ServerEndpoint, Twisted 26.10): the only way to see the
            # backlog short of listening.  Twisted's default is 50.
            self.assertEqual(mux.endpoint.endpoint._backlog, 1024)
        self.assertEqual(mux.factory.budget.per_source, 100)


def unread_socket(source: str, port: int) -> socket.socket:
    """A client socket from C{source} that will never read: a tiny receive buffer, set before it connects."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


class UnreadAnswer(PortPlane):
    """
    A client that sends, half-closes and never reads what comes back.  Once both directions
    have ended, the channel is done and its idle timer went with it, while its socket still
    held the answer the client does not read; Twisted's loseConnection waits to flush it, so
    the connection (its fd and its unit of the per-IP and total caps) stayed for ever.
    """

    async def half_closed_client(self, size: int) -> socket.socket:
        """A client from 127.0.0.2 (4 KiB receive buffer) that has sent C{size} bytes to an echo
        service through a gate, read none of the echo, and half-closed."""
        backend = await self.backend_echo()
        gate = free_port()
        # Windows of 8 MiB both ways (a response window grows to 4 MiB by default while the
        # client reads): the whole echo reaches the gateway, more than the kernel's buffers hold.
        self.gw, mux = await self.gateway(tcp_idle_timeout=1.0, tcp_per_source=5, tcp_total=100, window=8 << 20)
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)], window=8 << 20)
        await self.open_tcp_gate(self.gw, gate)
        sock = socket.socket()
        self.cleanups.append(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # (before it connects)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", gate))
        sock.setblocking(False)
        payload, sent = b"x" * size, 0
        while sent < len(payload):
            try:
                sent += sock.send(payload[sent:])
            except BlockingIOError:
                await task.deferLater(reactor, 0.01, lambda: None)
        sock.shutdown(socket.SHUT_WR)
        return sock

    async def test_a_finished_connection_whose_client_never_reads_is_closed_after_the_idle_timeout(self):
        await self.half_closed_client(6 << 20)
        await eventually(lambda: not self.gw.tcp_clients)   # the channel is done: FIN both ways
        self.assertEqual(self.gw.tcp_budget.held("127.0.0.2"), 1)   # its socket still flushing
        done = reactor.seconds()
        await eventually(lambda: self.gw.tcp_budget.held("127.0.0.2") == 0, timeout=5)
        self.assertGreater(reactor.seconds() - done, 0.5)   # not at once: an idle timeout after

    async def test_a_client_that_reads_slowly_but_steadily_gets_the_whole_echo(self):
        # The review found these cut mid-answer: the timer now moves on while the client
        # takes its bytes (pipegate.sockets.UnreadAbort).
        size = 6 << 20
        sock = await self.half_closed_client(size)
        # every 5 ms, what the 4 KiB buffer holds: never 1 s without a byte
        ended, got = await read_steadily(sock, 65536, 0.005, timeout=60)
        self.assertEqual((ended, len(got)), ("eof", size + 3))   # (the echo service's "bye" too)


class SmallListeners(PortPlane):
    """
    The small HTTP listeners: the gateway's /unlimited (for clients, so reachable by
    strangers), the provider's resolver and every service's --metrics with /status, all
    plain twisted.web sites, which kept an idle connection for 12 hours and capped nothing:
    a stranger held connections until the process ran out of descriptors, and with it
    every gate.  They now go through a ConnectionGate with a short idle timeout.
    """

    async def attack(self, make, per_source: int):
        """C{make(description)}: the service holding the listener; C{per_source} its cap."""
        port = free_port()
        top = make(f"tcp:{port}:interface=127.0.0.1")
        top.startService()
        self.cleanups.append(top.stopService)
        held = []
        for _ in range(per_source + 4):
            client = Held()
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=("127.0.0.2", 0))
            await endpoints.connectProtocol(endpoint, client)
            self.cleanups.append(lambda c=client: c.transport.abortConnection() if c.open else None)
            held.append(client)
        await eventually(lambda: sum(not c.open for c in held) == 4)   # refused at accept
        self.assertEqual([c.open for c in held[:per_source]], [True] * per_source)
        await eventually(lambda: not any(c.open for c in held), timeout=5)   # closed when idle

    def added(self, add):
        """A MultiService with what C{add(top, description, limits)} adds: the default caps, 0.5 s idle."""
        from pipegate.accept import SiteLimits

        def make(description):
            top = service.MultiService()
            add(top, description, SiteLimits(idle=0.5))
            return top
        return make

    async def test_unlimited_and_resolver(self):
        from twisted.web import resource

        from pipegate.mux.node import add_http
        await self.attack(self.added(lambda top, description, limits: add_http(
            top, description, resource.Resource(), reactor, limits)), 16)

    async def test_metrics_and_status(self):
        from pipegate.opslistener import add_metrics_listener
        gw, _ = await self.gateway()
        await self.attack(self.added(lambda top, description, limits: add_metrics_listener(
            top, gw, "gateway", description, reactor, limits)), 16)

    async def test_a_huge_body_is_refused_at_its_head_and_never_spooled(self):
        # twisted.web reads a whole body before it renders, into a temporary file past
        # 100 KB: a stranger's POST to /unlimited (public) filled the disk at wire speed
        # (1.5 GB in 5 s on loopback) however small the answer.
        from twisted.web import resource

        from pipegate.accept import SiteLimits
        from pipegate.mux.node import add_http
        port = free_port()
        top = service.MultiService()
        add_http(top, f"tcp:{port}:interface=127.0.0.1", resource.Resource(), reactor,
                 SiteLimits(idle=5, max_body=65536))
        top.startService()
        self.cleanups.append(top.stopService)

        def post(head: bytes, stop: int, chunk: bytes = b"x" * 65536) -> tuple[int, bytes]:
            """Send C{head}, then C{chunk} until C{stop} bytes went out or the server stops taking them."""
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(2)
            s.sendall(head)
            sent = 0
            try:
                while sent < stop:
                    sent += s.send(chunk)
            except OSError:
                pass
            answer = b""
            try:
                while True:
                    data = s.recv(4096)
                    if not data:
                        break
                    answer += data
            except OSError:
                pass
            s.close()
            return sent, answer

        sent, answer = await threads.deferToThread(
            post, b"POST /unlimited HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n", 200_000_000)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:80])
        self.assertLess(sent, 50_000_000)   # (what the kernel buffers took, not the 200 MB)
        sent, answer = await threads.deferToThread(
            post, b"POST /unlimited HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 200_000_000,
            b"10000\r\n" + b"x" * 65536 + b"\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:80])
        self.assertLess(sent, 50_000_000)

    async def test_the_api_options_bound_the_listeners_a_service_makes(self):
        # PIPEGATE_API_* reach the gateway's /unlimited listener through its makeService.
        def make(description):
            options = gateway_tap.Options()
            options.environ = {"PIPEGATE_API_MAX_CONNS_PER_IP": "3", "PIPEGATE_API_IDLE_TIMEOUT": "0.5"}
            options.parseOptions(["--router", "ab" * 32, "--mux", f"tcp:{free_port()}:interface=127.0.0.1",
                                  "--unlimited", description, "--unlimited-secret", "u" * 32])
            return gateway_tap.makeService(options, reactor)
        await self.attack(make, 3)
