"""
The relay as a meeting point of the port plane, end to end: a real hub (the
C{pipegate-server --mux} node) on 127.0.0.1, and real providers and gateways that only
dial out to it over real TLS mux links, carrying real TCP connections and UDP datagrams.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys

import attrs

from twisted.application import internet
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.address import IPv4Address

from twisted.trial import unittest

from pipegate.mux import frames, tls
from pipegate.mux.hub import HubLinkFactory, HubNode
from pipegate.mux.hubcore import HubConfig
from pipegate.mux.session import LinkConfig, LinkFactory
from pipegate.ports.gateway import Gateway, GatewayConfig
from pipegate.ports.services import Service
from tests.support import eventually, free_port, free_ports, pattern
from tests.test_ports_e2e import CERT, SECRET, Client, PortPlane, Source, UDPEcho

OTHER = bytes(range(100, 132))     # a second router's secret
STRANGER = bytes(range(200, 232))  # a secret the hub does not know


def dialling_gateway(case: PortPlane, port: int, secret=SECRET, **config) -> Gateway:
    """A gateway with no listener of its own: it only dials the hub on C{port}."""
    gw = Gateway(GatewayConfig(**config), reactor)
    gw.startService()
    link_config = LinkConfig(secret=secret, role=frames.ROLE_GATEWAY, ping_interval=0.5, ping_deadline=2)
    endpoint = tls.client_endpoint(reactor, f"tcp:127.0.0.1:{port}")
    client = internet.ClientService(endpoint, LinkFactory(gw, link_config, reactor, True),
                                    retryPolicy=lambda n: 0.2, clock=reactor)
    client.startService()
    case.cleanups.append(client.stopService)
    case.cleanups.append(gw.stopService)
    case.cleanups.append(lambda: case._drop_links(gw))
    return gw


class Hub(PortPlane):
    """A hub admitting two routers, SECRET and OTHER."""

    async def setUp(self):
        super().setUp()
        self.hub = HubNode(HubConfig(window=frames.INITIAL_WINDOW, max_peers=20))
        self.hub.startService()
        self.cleanups.append(self.hub.stopService)
        link_config = LinkConfig(secret=SECRET, role=frames.ROLE_GATEWAY, ping_interval=0.5, ping_deadline=2)
        self.hub_port = await self.listen_tcp(tls.server_factory(
            CERT, HubLinkFactory(self.hub, link_config, reactor, (SECRET, OTHER))))
        self.cleanups.append(lambda: self._drop_links(self.hub))

    def dialling_gateway(self, secret=SECRET, **config) -> Gateway:
        return dialling_gateway(self, self.hub_port.getHost().port, secret, **config)

    async def downloader(self, size: int):
        factory = protocol.Factory.forProtocol(Source)
        factory.noisy = False
        Source.size = size
        return await self.listen_tcp(factory)


class TCPAndUDP(Hub):

    async def setUp(self):
        await super().setUp()
        self.backend = await self.backend_echo()
        udp_echo = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1", maxPacketSize=65535)
        self.cleanups.append(udp_echo.stopListening)
        self.tcp_gate, self.udp_gate = free_port(), free_port(socket.SOCK_DGRAM)
        self.prov = self.provider(self.hub_port, [
            Service(self.tcp_gate, "127.0.0.1", self.backend.getHost().port),
            Service(self.udp_gate, "127.0.0.1", udp_echo.getHost().port, "udp"),
        ])
        self.gw = self.dialling_gateway()
        await eventually(lambda: {(self.tcp_gate, "tcp"), (self.udp_gate, "udp")} <= set(self.gw.gates))

    async def test_tcp_both_directions_with_half_close(self):
        payload = pattern(8 * 1024 * 1024, seed=11)
        client = await self.connect(self.tcp_gate)
        client.transport.write(payload)
        client.transport.loseWriteConnection()   # half-close: the echo still answers "bye"
        received = await client.closed
        self.assertEqual(hashlib.sha256(received).hexdigest(),
                         hashlib.sha256(payload + b"bye").hexdigest())
        await eventually(lambda: self.hub.core.splices() == 0)

    test_tcp_both_directions_with_half_close.timeout = 60

    async def test_download_with_flow_control(self):
        """A 20 MiB download to a client that stops reading for a while: nothing is lost,
        and the hub holds at most what the credit allows."""
        source = await self.downloader(20 * 1024 * 1024)
        gate = free_port()
        self.prov.set_services(list(self.prov.services) + [Service(gate, "127.0.0.1", source.getHost().port)])
        await eventually(lambda: (gate, "tcp") in self.gw.gates)
        client = await self.connect(gate)
        client.transport.pauseProducing()
        await task.deferLater(reactor, 0.5, lambda: None)
        (gateway_link,) = [link for link in self.hub.links if link.peer_role == frames.ROLE_GATEWAY]
        # While the client is not reading, the gateway grants no credit: the hub's
        # buffer towards the gateway stays within one window (plus frame headers).
        self.assertLessEqual(_tls_buffered(gateway_link), frames.INITIAL_WINDOW + 4096)
        client.transport.resumeProducing()
        received = await client.closed
        self.assertEqual(hashlib.sha256(received).hexdigest(),
                         hashlib.sha256(pattern(20 * 1024 * 1024)).hexdigest())

    test_download_with_flow_control.timeout = 60

    async def test_many_connections_at_once(self):
        payloads = [os.urandom(100_000 + n) for n in range(20)]
        clients = [await self.connect(self.tcp_gate) for _ in payloads]
        for client, payload in zip(clients, payloads):
            client.transport.write(payload)
            client.transport.loseWriteConnection()
        received = await defer.gatherResults([c.closed for c in clients])
        self.assertEqual(received, [p + b"bye" for p in payloads])

    async def test_udp(self):
        client = await self.udp_client()
        sent = [os.urandom(1000 + n) for n in range(30)] + [b""]
        for datagram in sent:
            client.transport.write(datagram, ("127.0.0.1", self.udp_gate))
            await task.deferLater(reactor, 0.002, lambda: None)
        # The gateway holds the first datagrams until the channel is open; every one
        # comes back whole, the empty one included.
        await eventually(lambda: len(client.received) == len(sent))
        self.assertEqual(sorted(client.received), sorted(sent))
        big = os.urandom(65000)
        client.transport.write(big, ("127.0.0.1", self.udp_gate))
        await eventually(lambda: big in client.received)

    async def test_removing_the_provider_withdraws_the_gate(self):
        client = await self.connect(self.tcp_gate)
        client.transport.write(b"hi")
        await eventually(lambda: bytes(client.received) == b"hi")
        stopped = self.prov.client.stopService()   # no redial ...
        self._drop_links(self.prov)                 # ... and the link is gone
        await stopped
        await eventually(lambda: not self.gw.gates)
        await client.closed   # the open connection is reset with the provider's link
        self.assertEqual(self.hub.core.routes_for(0), ())
        self.assertEqual(self.hub.core.splices(), 0)


class Routers(Hub):

    async def test_routers_are_isolated_and_strangers_refused(self):
        backend = await self.backend_echo()
        port = backend.getHost().port
        gate_a, gate_b = free_ports(2)
        self.provider(self.hub_port, [Service(gate_a, "127.0.0.1", port)], secret=SECRET)
        self.provider(self.hub_port, [Service(gate_b, "127.0.0.1", port)], secret=OTHER)
        gw_a = self.dialling_gateway(secret=SECRET)
        gw_b = self.dialling_gateway(secret=OTHER)
        await eventually(lambda: (gate_a, "tcp") in gw_a.gates and (gate_b, "tcp") in gw_b.gates)
        stranger = self.dialling_gateway(secret=STRANGER)
        await eventually(lambda: self.logged("knows none of the hub's router secrets"))
        await task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(set(gw_a.gates), {(gate_a, "tcp")})
        self.assertEqual(set(gw_b.gates), {(gate_b, "tcp")})
        self.assertEqual(stranger.gates, {})
        self.assertEqual(len(self.hub.core.peers), 4)
        for gate in (gate_a, gate_b):
            self.assertEqual(await self.echo_through(gate, b"ping"), b"pingbye")


class PeersPerRouter(Hub):

    async def test_one_routers_flood_of_peers_does_not_lock_out_another(self):
        self.hub.core.config = attrs.evolve(self.hub.core.config, max_peers_per_router=3)
        backend = await self.backend_echo()
        port = backend.getHost().port
        gate_a, gate_b = free_ports(2)
        # Router OTHER dials in ten providers; the hub keeps three of them.
        for _ in range(10):
            self.provider(self.hub_port, [Service(gate_b, "127.0.0.1", port)], secret=OTHER)
        await eventually(lambda: self.logged("the hub serves at most 3 peers per router"))
        self.assertEqual(sum(1 for p in self.hub.core.peers.values() if p.router == 1), 3)
        # Router SECRET's provider and gateway still get in, and its gate works.
        self.provider(self.hub_port, [Service(gate_a, "127.0.0.1", port)], secret=SECRET)
        gw_a = self.dialling_gateway(secret=SECRET)
        await eventually(lambda: (gate_a, "tcp") in gw_a.gates)
        self.assertEqual(await self.echo_through(gate_a, b"ping"), b"pingbye")


class MixedLinks(Hub):

    async def test_direct_and_hub_links_at_once(self):
        """A gateway with its own --mux listener and a link to the hub serves both a
        direct provider's gate and a hub provider's gate, and one gate offered both ways."""
        backend = await self.backend_echo()
        port = backend.getHost().port
        gw, mux = await self.gateway()
        link_config = LinkConfig(secret=SECRET, role=frames.ROLE_GATEWAY, ping_interval=0.5, ping_deadline=2)
        endpoint = tls.client_endpoint(reactor, f"tcp:127.0.0.1:{self.hub_port.getHost().port}")
        client = internet.ClientService(endpoint, LinkFactory(gw, link_config, reactor, True),
                                        retryPolicy=lambda n: 0.2, clock=reactor)
        client.startService()
        self.cleanups.append(client.stopService)
        self.cleanups.append(lambda: self._drop_links(gw))
        direct, via_hub, both = free_ports(3)
        self.provider(mux, [Service(direct, "127.0.0.1", port), Service(both, "127.0.0.1", port)])
        self.provider(self.hub_port, [Service(via_hub, "127.0.0.1", port), Service(both, "127.0.0.1", port)])
        await eventually(lambda: {(direct, "tcp"), (via_hub, "tcp"), (both, "tcp")} <= set(gw.gates))
        self.assertEqual(len(gw.exposed()[(both, "tcp")]), 2)
        for gate in (direct, via_hub, both, both, both):
            c = await self.connect(gate)
            c.transport.write(b"x" * 1000)
            c.transport.loseWriteConnection()
            self.assertEqual(await c.closed, b"x" * 1000 + b"bye")


def _tls_buffered(link) -> int:
    """Bytes the hub holds for a link in user space: the TCP transport's write buffer
    under the link's TLS layer (what the kernel has not taken yet)."""
    tcp = link.transport.transport
    return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen


class MuxPort:
    """What L{PortPlane.provider} reads of a listening port, for a port opened elsewhere."""

    def __init__(self, port: int) -> None:
        self.port = port

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", self.port)


class FromTheTap(PortPlane):

    def relay_with_hub(self, metrics: bool = False, extra: tuple = ()) -> tuple[HubNode, int, int]:
        """Start makeService of `pipegate-server --mux ...`; its hub, mux port and --metrics port."""
        from pipegate.tap import server as server_tap

        http_port, mux_port, ops = free_ports(3)
        options = server_tap.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": "s" * 40}
        options.parseOptions(["--listen", f"tcp:{http_port}:interface=127.0.0.1",
                              "--mux", f"tcp:{mux_port}:interface=127.0.0.1", "--mux-router", SECRET.hex(),
                              "--mux-ping-interval", "0.5", "--mux-ping-deadline", "2", *extra]
                             + (["--metrics", f"tcp:{ops}:interface=127.0.0.1"] if metrics else []))
        top = server_tap.makeService(options, reactor)
        top.startService()
        self.cleanups.append(top.stopService)
        (hub,) = [s for s in top if isinstance(s, HubNode)]
        self.cleanups.append(lambda: self._drop_links(hub))
        return hub, mux_port, ops

    async def test_pipegate_server_mux(self):
        """makeService of pipegate-server with --mux: the relay's HTTP port and the hub's
        mux port both serve; a provider and a gateway meet through the latter."""
        hub, mux_port, _ = self.relay_with_hub()
        backend = await self.backend_echo()
        gate = free_port()
        self.provider(MuxPort(mux_port), [Service(gate, "127.0.0.1", backend.getHost().port)])
        gw = dialling_gateway(self, mux_port)
        await eventually(lambda: (gate, "tcp") in gw.gates)
        self.assertEqual(await self.echo_through(gate, b"through the relay"), b"through the relaybye")

    async def test_connections_per_ip_are_capped_before_admission(self):
        """Idle connections (no TLS, no Hello) from one IP hold at most --mux-max-conns-per-ip
        slots; peers from another address are still admitted and served."""
        hub, mux_port, _ = self.relay_with_hub(extra=("--mux-max-conns-per-ip", "5", "--mux-max-conns", "50"))
        held = []
        for _ in range(12):
            client = Client()
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", mux_port, bindAddress=("127.0.0.2", 0))
            await endpoints.connectProtocol(endpoint, client)
            self.cleanups.append(lambda c=client: c.transport.abortConnection() if c.transport.connected else None)
            held.append(client)
        await eventually(lambda: sum(c.closed.called for c in held) == 7)
        self.assertEqual(hub.stats.get("admission_failures", "cap"), 7)
        self.assertTrue(self.logged("connection refused, per-source cap of 5 connections reached"))
        backend = await self.backend_echo()
        gate = free_port()
        self.provider(MuxPort(mux_port), [Service(gate, "127.0.0.1", backend.getHost().port)])
        gw = dialling_gateway(self, mux_port)
        await eventually(lambda: (gate, "tcp") in gw.gates)
        self.assertEqual(await self.echo_through(gate, b"still"), b"stillbye")

    async def test_metrics_show_the_hub(self):
        """pipegate-server --mux --metrics: the relay's /metrics and /status show the hub too."""
        from tests.support import Loopback, request
        from tests.test_metrics import samples

        hub, mux_port, ops = self.relay_with_hub(metrics=True)
        agent = Loopback(self).agent()

        async def scrape() -> dict:
            response, body = await request(agent, b"GET", f"http://127.0.0.1:{ops}/metrics")
            self.assertEqual(response.code, 200)
            return samples(body.decode())

        before = await scrape()
        self.assertEqual(before[("pipegate_hub_routers", ())], 0)
        self.assertEqual(before[("pipegate_tunnels", ())], 0)    # the relay's own metrics are still there

        backend = await self.backend_echo()
        gates = free_ports(2)
        self.provider(MuxPort(mux_port), [Service(g, "127.0.0.1", backend.getHost().port) for g in gates])
        self.provider(MuxPort(mux_port), [], secret=STRANGER)
        gw = dialling_gateway(self, mux_port)
        await eventually(lambda: {(g, "tcp") for g in gates} <= set(gw.gates))
        await eventually(lambda: hub.stats.by_label("admission_failures"))
        client = await self.connect(gates[0])
        client.transport.write(b"ping")
        await eventually(lambda: client.received.startswith(b"ping"))

        during = await scrape()
        self.assertEqual(during[("pipegate_hub_links", (("role", "provider"),))], 1)
        self.assertEqual(during[("pipegate_hub_links", (("role", "gateway"),))], 1)
        self.assertEqual(during[("pipegate_hub_routers", ())], 1)
        self.assertEqual(during[("pipegate_hub_routes", ())], 2)
        self.assertEqual(during[("pipegate_hub_channels", ())], 1)
        self.assertGreaterEqual(during[("pipegate_hub_admission_failures_total", (("reason", "secret"),))], 1)
        self.assertEqual(during[("pipegate_hub_dropped_datagrams_total", ())], 0)
        self.assertEqual(during[("pipegate_hub_drain_cut_total", ())], 0)
        response, body = await request(agent, b"GET", f"http://127.0.0.1:{ops}/status")
        status = json.loads(body)
        self.assertEqual(status["service"], "relay")
        self.assertEqual(status["hub_routers"], [
            {"router": "#0", "providers": 1, "gateways": 1, "observers": 0, "routes": 2, "channels": 1}])
        self.assertNotIn(SECRET.hex(), body.decode())

        client.transport.loseConnection()
        await client.closed
        await eventually(lambda: hub.core.splices() == 0)
        self.assertEqual((await scrape())[("pipegate_hub_channels", ())], 0)


class Policies(Hub):

    async def test_each_providers_policy_travels_with_its_routes(self):
        """Two providers behind the hub, one denying every client: the gateway applies
        each provider's policy to that provider's gate only."""
        import json

        from pipegate.core.policydoc import load_policy

        deny = load_policy([json.dumps({"defaults": {"allow": False}})])[1]
        backend = await self.backend_echo()
        closed, open_ = free_ports(2)
        self.provider(self.hub_port, [Service(closed, "127.0.0.1", backend.getHost().port)], policy=deny)
        self.provider(self.hub_port, [Service(open_, "127.0.0.1", backend.getHost().port)])
        gw = self.dialling_gateway()
        await eventually(lambda: {(closed, "tcp"), (open_, "tcp")} <= set(gw.gates))
        refused = await self.connect(closed)
        self.assertEqual(await refused.closed, b"")
        self.assertEqual(gw.denied, 1)
        self.assertEqual(await self.echo_through(open_, b"in"), b"inbye")

    async def test_an_unreadable_policy_closes_only_its_providers_gates(self):
        backend = await self.backend_echo()
        bad, good = free_ports(2)
        self.provider(self.hub_port, [Service(bad, "127.0.0.1", backend.getHost().port)], policy=b"{not json")
        self.provider(self.hub_port, [Service(good, "127.0.0.1", backend.getHost().port)])
        gw = self.dialling_gateway()
        await eventually(lambda: (good, "tcp") in gw.gates)
        await eventually(lambda: len(self.hub.core.routes_for(0)) == 2)
        await task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(set(gw.gates), {(good, "tcp")})   # fail closed for the unreadable one
        self.assertTrue(self.logged(f"ignoring route {bad}/tcp"))


class AsProcesses(unittest.TestCase):
    """As users run it: three twistd processes; provider and gateway only dial out."""

    async def test_relay_hub_provider_gateway(self):
        from tests.test_ports_e2e import Client, Echo
        from tests.test_processes import TWISTD, child_env, run, spawn

        secret = SECRET.hex()
        factory = protocol.Factory.forProtocol(Echo)
        factory.noisy = False
        backend = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(backend.stopListening)
        http_port, mux, gate = free_ports(3)
        relay = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-server", "--listen",
                                      f"tcp:{http_port}:interface=127.0.0.1"],
                      child_env(PIPEGATE_JWT_SECRET="j" * 40, PIPEGATE_MUX=f"tcp:{mux}:interface=127.0.0.1",
                                PIPEGATE_MUX_ROUTER=secret))
        await eventually(lambda: b"starting on %d" % mux in relay.output, timeout=30)
        services = json.dumps([{"gatePort": gate, "serviceHost": "127.0.0.1",
                                "servicePort": backend.getHost().port}])
        spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-provider", "--services", services,
                              "--connect", f"tcp:127.0.0.1:{mux}"], child_env(PIPEGATE_ROUTER=secret))
        gateway = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-gateway", "--listen", "127.0.0.1",
                                        "--connect", f"tcp:127.0.0.1:{mux}"], child_env(PIPEGATE_ROUTER=secret))
        await eventually(lambda: b"gate %d/tcp open" % gate in gateway.output, timeout=30)
        client = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate), client)
        client.transport.write(b"through the relay's hub")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.closed, b"through the relay's hubbye")
        # An observer (pipegate scan) on the hub sees the router's routes, as on a gateway.
        code, out = await run(self, [sys.executable, "-m", "pipegate", "scan", "--router", secret,
                                     "--connect", f"tcp:127.0.0.1:{mux}"])
        self.assertEqual(code, 0, out)
        self.assertIn(f"{gate}/tcp -> 127.0.0.1:{backend.getHost().port}", out)
        self.assertIn(b"hub: provider", relay.output)
        self.assertIn(b"hub: gateway", relay.output)
        self.assertNotIn(secret.encode(), relay.output + gateway.output)
        self.assertNotIn(b"Traceback", relay.output)



class HubDrain(Hub):
    """Stopping the hub (SIGTERM to the relay) lets channels through it finish, within a bound."""

    async def setUp(self):
        await super().setUp()
        self.backend = await self.backend_echo()
        self.gate = free_port()
        self.prov = self.provider(self.hub_port, [Service(self.gate, "127.0.0.1", self.backend.getHost().port)])
        self.gw = self.dialling_gateway()
        await eventually(lambda: (self.gate, "tcp") in self.gw.gates)

    async def echo(self, client, data: bytes) -> None:
        start = len(client.received)
        client.transport.write(data)
        await eventually(lambda: bytes(client.received[start:]) == data)

    async def test_open_channels_finish_after_goaway(self):
        client = await self.connect(self.gate)
        await self.echo(client, b"before")
        (hub_link,) = self.gw.links
        stopped = self.hub.stopService()
        await task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(stopped.called)
        # The gateway heard GOAWAY on its hub link, and the open connection still works.
        await eventually(lambda: hub_link.going_away)
        await self.echo(client, b"during the drain")
        client.transport.loseWriteConnection()
        self.assertTrue((await client.closed).endswith(b"bye"))
        await stopped
        await eventually(lambda: not self.hub.links)
        self.assertEqual(self.hub.stats.get("drain_cut"), 0)
        self.assertTrue(self.logged("hub draining: 1 channel(s) open, up to 30 s"))

    async def test_drain_timeout_cuts_what_is_left(self):
        self.hub.core.config = attrs.evolve(self.hub.core.config, drain_timeout=0.5)
        client = await self.connect(self.gate)
        await self.echo(client, b"held open")
        started = reactor.seconds()
        await self.hub.stopService()
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        self.assertEqual(await client.closed, b"held open")   # cut, not finished: no "bye"
        self.assertEqual(self.hub.stats.get("drain_cut"), 1)
        self.assertTrue(self.logged("hub drain timeout: 1 channel(s) cut"))

    async def test_nothing_open_stops_at_once(self):
        stopped = self.hub.stopService()
        self.assertTrue(stopped.called)
        await stopped
        await eventually(lambda: not self.hub.links)
