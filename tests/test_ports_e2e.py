"""
The port plane end to end: a real gateway and real providers on 127.0.0.1, joined by
real TLS mux links, carrying real TCP connections and UDP datagrams to real backends.
"""

from __future__ import annotations

import hashlib
import os
import socket
import weakref

from twisted.application import internet
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from pipegate.mux.channel import CHANNEL_SOCKET_BUFFER, StreamChannel
from pipegate.sockets import socket_transport
from pipegate.mux import frames, tls
from pipegate.mux.hello import EXPORTER_LABEL
from pipegate.mux.session import LinkConfig, LinkFactory
from pipegate.ports.gateway import Gateway, GatewayConfig
from pipegate.ports.provider import Provider, ProviderConfig
from pipegate.ports.services import Exposure, Filter, Service
from tests.support import collector_off, eventually, free_port, pattern

SECRET = bytes(range(32))
CERT = tls.generated_certificate()


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """Echoes; on EOF answers 'bye' and closes (half-close aware)."""

    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.write(b"bye")
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class Source(protocol.Protocol):
    """Sends C{size} bytes of pattern data with backpressure, then closes."""

    size = 0

    def connectionMade(self):
        self.data = pattern(self.size)
        self.offset = 0
        self.factory.produced = 0
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.offset < len(self.data):
            chunk = self.data[self.offset:self.offset + 65536]
            self.offset += len(chunk)
            self.factory.produced += len(chunk)
            self.transport.write(chunk)
        if self.offset >= len(self.data) and not self.paused:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            self.offset = len(self.data) + 1

    def stopProducing(self):
        self.paused = True


class UDPEcho(protocol.DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class Client(protocol.Protocol):
    def __init__(self):
        self.received = bytearray()
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(bytes(self.received))


class UDPClient(protocol.DatagramProtocol):
    def __init__(self):
        self.received: list[bytes] = []

    def datagramReceived(self, data, addr):
        self.received.append(data)


class PortPlane(unittest.TestCase):
    """Builds gateways, providers and backends; tears everything down."""

    def setUp(self):
        self.cleanups = []
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(self._teardown)

    async def _teardown(self):
        for cleanup in reversed(self.cleanups):
            await defer.maybeDeferred(cleanup)
        await task.deferLater(reactor, 0.05, lambda: None)

    def logged(self, text: str) -> bool:
        from twisted.logger import formatEvent
        return any(text in formatEvent(e) for e in self.events)

    async def listen_tcp(self, factory, port=0):
        p = await endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory)
        self.cleanups.append(p.stopListening)
        return p

    async def backend_echo(self):
        factory = protocol.Factory.forProtocol(Echo)
        factory.noisy = False
        return await self.listen_tcp(factory)

    async def gateway(self, secret=SECRET, **config):
        gw = Gateway(GatewayConfig(**config), reactor)
        gw.startService()
        self.cleanups.append(gw.stopService)
        link_config = LinkConfig(secret=secret, role=frames.ROLE_GATEWAY, ping_interval=0.5, ping_deadline=2)
        mux = await self.listen_tcp(tls.server_factory(CERT, LinkFactory(gw, link_config, reactor, False)))
        self.cleanups.append(lambda: self._drop_links(gw))
        return gw, mux

    def _drop_links(self, node):
        for link in list(node.links):
            link.fail("test over")

    def provider(self, mux_port, services, secret=SECRET, role=frames.ROLE_PROVIDER, **config):
        prov = Provider(ProviderConfig(services=tuple(services), **config), reactor)
        prov.startService()
        link_config = LinkConfig(secret=secret, role=role, ping_interval=0.5, ping_deadline=2)
        endpoint = tls.client_endpoint(reactor, f"tcp:127.0.0.1:{mux_port.getHost().port}")
        client = internet.ClientService(endpoint, LinkFactory(prov, link_config, reactor, True),
                                        retryPolicy=lambda n: 0.2, clock=reactor)
        client.startService()
        self.cleanups.append(client.stopService)
        self.cleanups.append(prov.stopService)
        self.cleanups.append(lambda: self._drop_links(prov))
        prov.client = client
        return prov

    async def echo_through(self, port: int, data: bytes = b"ping") -> bytes:
        """Connect to C{port}, send C{data}, half-close, and return all that came back."""
        client = await self.connect(port)
        client.transport.write(data)
        client.transport.loseWriteConnection()
        return await client.closed

    async def connect(self, port) -> Client:
        client = Client()
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.cleanups.append(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    async def udp_client(self) -> UDPClient:
        client = UDPClient()
        port = reactor.listenUDP(0, client, interface="127.0.0.1", maxPacketSize=65535)
        self.cleanups.append(port.stopListening)
        return client

    async def open_tcp_gate(self, gw, port):
        await eventually(lambda: (port, "tcp") in gw.gates)


class TCP(PortPlane):
    async def setUp(self):
        super().setUp()
        self.backend = await self.backend_echo()
        self.gate = free_port()
        self.gw, self.mux = await self.gateway()
        self.prov = self.provider(self.mux, [Service(self.gate, "127.0.0.1", self.backend.getHost().port)])
        await self.open_tcp_gate(self.gw, self.gate)

    async def test_echo_50_mib_each_way(self):
        payload = pattern(50 * 1024 * 1024, seed=3)
        received = await self.echo_through(self.gate, payload)
        self.assertEqual(hashlib.sha256(received).hexdigest(),
                         hashlib.sha256(payload + b"bye").hexdigest())

    test_echo_50_mib_each_way.timeout = 120

    async def test_half_close(self):
        self.assertEqual(await self.echo_through(self.gate, b"question"), b"questionbye")

    async def test_a_connection_leaves_nothing_for_the_cycle_collector(self):
        # Each end's channel and its socket (at the provider, the StreamClient that
        # dialled the backend: pipegate.tcpclient) are freed by reference counting once the
        # connection is over: no reference cycle (the eager write method on the socket, the
        # dialling factory's closure, Twisted's Connector <-> Client left some 34 objects
        # per connection to the collector).
        refs, kinds = [], set()
        made = StreamChannel.connectionMade

        def recording(channel):
            made(channel)
            sock = socket_transport(channel.transport)
            for o in (channel, sock, getattr(sock, "connector", None)):
                if o is not None:
                    refs.append(weakref.ref(o))
                    kinds.add(type(o).__name__)
        self.patch(StreamChannel, "connectionMade", recording)
        self.assertEqual(await self.echo_through(self.gate, b"warm"), b"warmbye")
        with collector_off():
            del refs[:]
            kinds.clear()
            self.assertEqual(await self.echo_through(self.gate, b"x"), b"xbye")
            self.assertEqual(sorted(kinds), ["BackendChannel", "GateConnection", "GateServer", "StreamClient"])
            await eventually(lambda: all(ref() is None for ref in refs), timeout=5)

    async def test_a_connection_s_end_makes_no_failure(self):
        # Gateway and provider close a tunnelled connection's sockets after shutting them for
        # writing; Twisted's loseConnection makes a new ConnectionDone failure for each
        # (pipegate.tcpclient.PromptClose: one made once).
        self.assertEqual(await self.echo_through(self.gate, b"warm"), b"warmbye")
        made = []
        init = Failure.__init__

        def recording(failure, exc_value=None, *args, **kw):
            if isinstance(exc_value, ConnectionDone):
                made.append(exc_value)
            init(failure, exc_value, *args, **kw)
        self.patch(Failure, "__init__", recording)
        self.assertEqual(await self.echo_through(self.gate, b"x"), b"xbye")
        await task.deferLater(reactor, 0.05, lambda: None)   # (anything left of the provider's close)
        self.assertEqual(made, [])

    def test_services_dispatch_without_the_legacy_log_context(self):
        # Gateway and provider, started, make the (epoll) reactor dispatch I/O events
        # without twisted.python.log's context (pipegate._compat.lean_dispatch).
        from twisted.internet.epollreactor import EPollReactor
        from pipegate import _compat
        if not isinstance(reactor, EPollReactor):
            raise unittest.SkipTest("the reactor is not Twisted's epoll reactor")
        self.assertIs(type(reactor.doIteration), _compat._LeanPoll)

    async def test_gate_follows_the_provider(self):
        self.assertTrue(self.logged(f"gate {self.gate}/tcp open"))
        stopped = self.prov.client.stopService()
        self._drop_links(self.prov)
        await stopped
        await eventually(lambda: (self.gate, "tcp") not in self.gw.gates)
        with self.assertRaises(Exception):  # listener stopped: connection refused
            await self.connect(self.gate)
        self.prov.client.startService()
        await self.open_tcp_gate(self.gw, self.gate)
        self.assertEqual(await self.echo_through(self.gate, b"again"), b"againbye")

    async def test_slow_consumer_bounded_by_window(self):
        size = 64 * 1024 * 1024
        source = protocol.Factory.forProtocol(Source)
        source.noisy = False
        source.produced = 0
        Source.size = size
        backend = await self.listen_tcp(source)
        gate = free_port()
        prov2 = self.provider(self.mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await self.open_tcp_gate(self.gw, gate)
        client = await self.connect(gate)
        client.transport.pauseProducing()
        last = -1
        while last != source.produced:
            last = source.produced
            await task.deferLater(reactor, 0.3, lambda: None)
        self.assertLess(source.produced, size // 2)
        window = frames.INITIAL_WINDOW
        (gw_channel,) = [c for c in self.gw.tcp_clients]
        (link,) = [l for l in prov2.links]
        (prov_channel,) = list(link.channels.values())
        self.assertLessEqual(gw_channel.buffered, window + frames.MAX_DATA)
        self.assertLessEqual(prov_channel.buffered, window + frames.MAX_DATA)
        client.transport.resumeProducing()
        received = await client.closed
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(pattern(size)).digest())

    test_slow_consumer_bounded_by_window.timeout = 120

    async def test_window_grows_for_a_fast_consumer(self):
        size = 64 * 1024 * 1024
        source = protocol.Factory.forProtocol(Source)
        source.noisy = False
        Source.size = size
        backend = await self.listen_tcp(source)
        gate = free_port()
        prov = self.provider(self.mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await self.open_tcp_gate(self.gw, gate)
        client = await self.connect(gate)
        await eventually(lambda: len(self.gw.tcp_clients) == 1)
        (gw_channel,) = self.gw.tcp_clients
        # The client's socket reads (and buffers) two DATA frames' worth at once.
        self.assertEqual(socket_transport(gw_channel.transport).bufferSize, CHANNEL_SOCKET_BUFFER)
        # Credit beyond the initial window: the gateway's receive window grew (ReceiveWindow).
        await eventually(lambda: gw_channel.flow.recv.window > frames.INITIAL_WINDOW, timeout=60)
        self.assertLessEqual(gw_channel.flow.recv.window, frames.MAX_WINDOW)
        self.assertGreater(self.gw.window_budget.used, 0)
        received = await client.closed
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(pattern(size)).digest())
        # A finished channel gives its growth back: the next connections start with the whole budget.
        await eventually(lambda: (self.gw.window_budget.used, prov.window_budget.used) == (0, 0))

    test_window_grows_for_a_fast_consumer.timeout = 120

    async def test_backend_closed_fails_fast(self):
        dead = free_port()
        gate = free_port()
        self.provider(self.mux, [Service(gate, "127.0.0.1", dead)])
        await self.open_tcp_gate(self.gw, gate)
        started = reactor.seconds()
        client = await self.connect(gate)
        self.assertEqual(await client.closed, b"")
        self.assertLess(reactor.seconds() - started, 5)  # bound, not a goal: the open timeout
        self.assertTrue(self.logged("refused channel"))


class Failover(PortPlane):
    async def test_two_providers_alternate_and_fail_over(self):
        gw, mux = await self.gateway()
        gate = free_port()
        backends, providers = [], []
        for tag in (b"A", b"B"):
            class Tagged(protocol.Protocol):
                def connectionMade(self, tag=tag):
                    self.transport.write(tag)
                    self.transport.loseConnection()
            factory = protocol.Factory.forProtocol(Tagged)
            factory.noisy = False
            backend = await self.listen_tcp(factory)
            backends.append(backend)
            providers.append(self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)]))
        await eventually(lambda: len(gw.exposed().get((gate, "tcp"), [])) == 2)
        await self.open_tcp_gate(gw, gate)
        answers = []
        for _ in range(4):
            client = await self.connect(gate)
            answers.append(await client.closed)
        self.assertEqual(sorted(answers), [b"A", b"A", b"B", b"B"])
        stopped = providers[0].client.stopService()
        self._drop_links(providers[0])
        await stopped
        for _ in range(4):
            client = await self.connect(gate)
            self.assertEqual(await client.closed, b"B")

    async def test_provider_with_dead_backend_fails_over(self):
        gw, mux = await self.gateway()
        gate = free_port()
        backend = await self.backend_echo()
        self.provider(mux, [Service(gate, "127.0.0.1", free_port())])
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await eventually(lambda: len(gw.exposed().get((gate, "tcp"), [])) == 2)
        await self.open_tcp_gate(gw, gate)
        for _ in range(4):
            self.assertEqual(await self.echo_through(gate, b"x"), b"xbye")


class Admission(PortPlane):
    async def test_wrong_secret_opens_nothing(self):
        gw, mux = await self.gateway()
        gate = free_port()
        backend = await self.backend_echo()
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)], secret=b"\x01" * 32)
        await eventually(lambda: self.logged("admission failed"))
        self.assertEqual(gw.gates, {})
        self.assertEqual(gw.routes, {})

    async def test_wrong_secret_redials_with_a_growing_delay(self):
        # Issue 18 item 4: ClientService restarts its count once TCP connects, so a provider
        # with a wrong secret redialled every 0.5-1 s for ever.  With Redial the delay grows
        # per refused admission and resets once a link is admitted.
        from twisted.internet.testing import EventLoggingObserver

        from pipegate.core.redial import Redial
        from pipegate.mux.node import link_services

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        gw, mux = await self.gateway()
        policy = Redial(initial=0.05, rng=lambda: 1.0)

        def dial(secret):
            prov = Provider(ProviderConfig(), reactor)
            prov.startService()
            self.cleanups.append(prov.stopService)
            config = LinkConfig(secret=secret, role=frames.ROLE_PROVIDER)
            (dialer,) = link_services(prov, config, reactor, [], [f"tcp:127.0.0.1:{mux.getHost().port}"],
                                      certificate=CERT, retry_policy=policy)
            dialer.startService()
            self.cleanups.append(dialer.stopService)
            self.cleanups.append(lambda: self._drop_links(prov))
            return prov, dialer

        _, dialer = dial(b"\x01" * 32)
        await eventually(lambda: policy.failures >= 4, timeout=20)
        await dialer.stopService()
        retries = [e["delay"] for e in events if "next attempt in" in e.get("log_format", "")]
        self.assertEqual(retries[:4], [0.05, 0.1, 0.2, 0.4])
        self.assertTrue(self.logged("admission failed: the peer does not know the router secret"))
        self.assertEqual(gw.routes, {})
        prov, _ = dial(SECRET)  # the right secret: admitted, and the delays start over
        await eventually(lambda: prov.links)
        self.assertEqual(policy.failures, 0)

    async def test_dial_failures_say_why(self):
        # Item 6 on the port plane: "connection refused" in the dialler's own line.
        from pipegate.mux.node import link_services

        prov = Provider(ProviderConfig(), reactor)
        port = free_port()
        config = LinkConfig(secret=SECRET, role=frames.ROLE_PROVIDER)
        (dialer,) = link_services(prov, config, reactor, [], [f"tcp:127.0.0.1:{port}"], certificate=CERT,
                                  retry_policy=lambda attempt: 0.5)
        dialer.startService()
        self.cleanups.append(dialer.stopService)
        # One line per failed attempt, with the next delay; not Twisted's own "Scheduling retry" too.
        await eventually(lambda: self.logged(f"cannot connect to tcp:127.0.0.1:{port}: connection refused; "
                                             "next attempt in 0.5 s"))
        self.assertFalse(self.logged("Scheduling retry"))

    async def test_provider_to_provider_refused(self):
        prov_a = Provider(ProviderConfig(), reactor)
        link_config = LinkConfig(secret=SECRET, role=frames.ROLE_PROVIDER)
        mux = await self.listen_tcp(tls.server_factory(CERT, LinkFactory(prov_a, link_config, reactor, False)))
        self.cleanups.append(lambda: self._drop_links(prov_a))
        self.provider(mux, [])
        await eventually(lambda: self.logged("provider-to-provider links are refused"))
        self.assertEqual(prov_a.links, set())

    async def test_garbage_closes_only_that_link(self):
        gw, mux = await self.gateway()
        backend = await self.backend_echo()
        gate = free_port()
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await self.open_tcp_gate(gw, gate)
        bad = self.provider(mux, [Service(free_port(), "127.0.0.1", backend.getHost().port)])
        await eventually(lambda: len(gw.links) == 2 and len(bad.links) == 1)
        (bad_link,) = bad.links
        bad_link.transport.write(b"\x00\x00\x00\x07\x7fjunk!!")  # unknown frame type
        await eventually(lambda: len(gw.links) == 1)
        await eventually(lambda: self.logged("unknown frame type"))
        self.assertEqual(await self.echo_through(gate, b"still"), b"stillbye")

    async def test_oversized_frame_closes_link(self):
        gw, mux = await self.gateway()
        prov = self.provider(mux, [])
        # Both ends: the gateway can admit the provider before the provider admits it.
        await eventually(lambda: len(gw.links) == 1 and len(prov.links) == 1)
        (link,) = prov.links
        link.transport.write((50_000_000).to_bytes(4, "big"))
        await eventually(lambda: len(gw.links) == 0)


class Exposing(PortPlane):
    async def test_expose_only_services_and_filters(self):
        backend = await self.backend_echo()
        port = backend.getHost().port
        a, b = free_port(), free_port()
        services = [Service(a, "svc-a", port, tags=("web",)), Service(b, "svc-b", port)]
        gw1, mux1 = await self.gateway(exposure=Exposure(only_services=frozenset({"svc-a"})))
        self.provider(mux1, services)
        await eventually(lambda: gw1.routes)
        await self.open_tcp_gate(gw1, a)
        self.assertEqual(set(gw1.gates), {(a, "tcp")})
        await gw1.stopService()
        gw2, mux2 = await self.gateway(exposure=Exposure(filters=(Filter(tags=("web",)),)))
        self.provider(mux2, services)
        await eventually(lambda: gw2.routes)
        await self.open_tcp_gate(gw2, a)
        self.assertEqual(set(gw2.gates), {(a, "tcp")})


class UDP(PortPlane):
    async def setUp(self):
        super().setUp()
        echo = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1", maxPacketSize=65535)
        self.cleanups.append(echo.stopListening)
        self.gate = free_port(socket.SOCK_DGRAM)
        self.gw, self.mux = await self.gateway(udp_idle_timeout=1.0)
        self.provider(self.mux, [Service(self.gate, "127.0.0.1", echo.getHost().port, "udp")],
                      udp_idle_timeout=1.0)
        await eventually(lambda: (self.gate, "udp") in self.gw.gates)

    async def test_datagrams_keep_their_boundaries(self):
        client = await self.udp_client()
        sent = [os.urandom(3011) for _ in range(90)]
        for datagram in sent:
            client.transport.write(datagram, ("127.0.0.1", self.gate))
            await task.deferLater(reactor, 0.002, lambda: None)
        await eventually(lambda: len(client.received) == 90)
        self.assertEqual(sorted(client.received), sorted(sent))
        big = os.urandom(65000)
        client.transport.write(big, ("127.0.0.1", self.gate))
        await eventually(lambda: big in client.received)

    async def test_clients_are_isolated_and_flows_expire(self):
        one, two = await self.udp_client(), await self.udp_client()
        one.transport.write(b"one", ("127.0.0.1", self.gate))
        two.transport.write(b"two", ("127.0.0.1", self.gate))
        await eventually(lambda: one.received and two.received)
        self.assertEqual((one.received, two.received), ([b"one"], [b"two"]))
        (_, gate) = self.gw.gates[(self.gate, "udp")]
        self.assertEqual(len(gate.flows), 2)
        await eventually(lambda: not gate.flows, timeout=10)
        one.transport.write(b"back", ("127.0.0.1", self.gate))
        await eventually(lambda: b"back" in one.received)

    async def test_flows_log_at_debug(self):
        # Item 13: the provider logged 4 info lines per UDP flow (Twisted's port and
        # protocol start/stop lines).  Now one debug line each way, and a periodic summary.
        from twisted.logger import formatEvent

        client = await self.udp_client()
        start = len(self.events)
        client.transport.write(b"hello", ("127.0.0.1", self.gate))
        await eventually(lambda: client.received)
        await eventually(lambda: self.logged(" closed") and any(
            "UDP flow" in e.get("log_format", "") and "closed" in e.get("log_format", "")
            for e in self.events[start:]), timeout=10)
        during = self.events[start:]
        noisy = [formatEvent(e) for e in during if level_at_least_info(e)
                 and any(word in formatEvent(e) for word in ("UDP Port", "starting on", "protocol"))]
        self.assertEqual(noisy, [])
        flow_lines = [e for e in during if "UDP flow {channel}" in e.get("log_format", "")]
        self.assertEqual([e["log_level"].name for e in flow_lines], ["debug", "debug"])


class Robustness(PortPlane):
    async def test_stalled_link_hits_the_ping_deadline(self):
        gw, mux = await self.gateway()
        backend = await self.backend_echo()
        gate = free_port()
        prov = self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await self.open_tcp_gate(gw, gate)
        (link,) = prov.links
        link._pinger.stop()               # the provider falls silent ...
        link.transport.pauseProducing()   # ... and stops reading: packets stop, no FIN
        await eventually(lambda: (gate, "tcp") not in gw.gates, timeout=15)
        self.assertTrue(self.logged("ping deadline"))

    async def test_bind_failure_skips_only_that_gate(self):
        gw, mux = await self.gateway()
        backend = await self.backend_echo()
        busy = await self.backend_echo()  # a port already in use
        gate = free_port()
        self.provider(mux, [Service(busy.getHost().port, "127.0.0.1", backend.getHost().port),
                            Service(gate, "127.0.0.1", backend.getHost().port)])
        await self.open_tcp_gate(gw, gate)
        await eventually(lambda: self.logged(f"gate {busy.getHost().port}/tcp: cannot bind"))
        self.assertEqual(await self.echo_through(gate, b"ok"), b"okbye")

    async def test_a_gate_whose_port_was_busy_opens_once_it_is_free(self):
        gw, mux = await self.gateway()
        gw.bind_retry_first = 0.05   # (1 s by default, doubling up to 60 s)
        backend = await self.backend_echo()
        busy = await self.backend_echo()  # another process's listener on the gate's port
        port = busy.getHost().port
        self.provider(mux, [Service(port, "127.0.0.1", backend.getHost().port)])
        await eventually(lambda: self.logged(f"gate {port}/tcp: cannot bind"))
        await eventually(lambda: gw.stats.get("gate_bind_failures") >= 2)   # tried again
        self.assertNotIn((port, "tcp"), gw.gates)
        await busy.stopListening()
        await self.open_tcp_gate(gw, port)
        self.assertEqual(await self.echo_through(port, b"ok"), b"okbye")
        self.assertEqual(gw._bind_retries, {})

    async def test_no_retry_outlives_the_gate_s_last_provider(self):
        gw, mux = await self.gateway()
        gw.bind_retry_first = 0.05
        backend = await self.backend_echo()
        busy = await self.backend_echo()
        port = busy.getHost().port
        prov = self.provider(mux, [Service(port, "127.0.0.1", backend.getHost().port)])
        await eventually(lambda: gw._bind_retries)
        stopped = prov.client.stopService()
        self._drop_links(prov)
        await stopped
        await eventually(lambda: not gw.exposed())
        self.assertEqual((gw._bind_retries, gw._bind_failures), ({}, {}))

    async def test_ipv6_listen(self):
        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback on this machine")
        gw, mux = await self.gateway(listen="::1")
        backend = await self.backend_echo()
        gate = free_port()
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await self.open_tcp_gate(gw, gate)
        client = Client()
        await endpoints.connectProtocol(endpoints.TCP6ClientEndpoint(reactor, "::1", gate), client)
        client.transport.write(b"six")
        client.transport.loseWriteConnection()
        self.assertEqual(await client.closed, b"sixbye")


class Replay(PortPlane):
    """A Hello recorded on one TLS session is useless on another; nothing precedes Hello."""

    async def dial(self, mux, link_class):
        from pipegate.mux.session import MuxLink

        node = Provider(ProviderConfig(), reactor)
        config = LinkConfig(secret=SECRET, role=frames.ROLE_PROVIDER)
        factory = LinkFactory(node, config, reactor, True)
        factory.buildProtocol = lambda addr: link_class(node, config, reactor, True)
        endpoint = tls.client_endpoint(reactor, f"tcp:127.0.0.1:{mux.getHost().port}")
        link = await endpoint.connect(factory)
        self.cleanups.append(lambda: link.fail("test over"))
        assert isinstance(link, MuxLink)
        return link

    async def test_replayed_hello_refused(self):
        from pipegate.mux.session import MuxLink

        gw, mux = await self.gateway()
        recorded = []

        class Recorder(MuxLink):
            def _write(self, frame):
                recorded.append(frame)
                super()._write(frame)

        first = await self.dial(mux, Recorder)
        await eventually(lambda: first.admitted)

        class Replayer(MuxLink):
            def handshakeCompleted(self):
                self._exporter = self.transport.getHandle().export_keying_material(EXPORTER_LABEL, 32)
                self._write(recorded[0])  # the other session's valid Hello

        await self.dial(mux, Replayer)
        await eventually(lambda: self.logged("admission failed"))
        self.assertEqual(len(gw.links), 1)

    async def test_frame_before_hello_refused(self):
        from pipegate.mux.session import MuxLink

        gw, mux = await self.gateway()

        class Eager(MuxLink):
            def handshakeCompleted(self):
                self._write(frames.Routes(()))

        await self.dial(mux, Eager)
        await eventually(lambda: self.logged("Routes before admission"))
        self.assertEqual(gw.links, set())


def level_at_least_info(event) -> bool:
    from twisted.logger import LogLevel

    return event.get("log_level", LogLevel.info) >= LogLevel.info


class FirstHourLogs(PortPlane):
    """Issue 18 items 13-15: what the port plane logs, asserted through a log observer."""

    async def test_each_provider_loss_is_logged_with_its_routes(self):
        # Item 14: the gateway said nothing when a provider died unless it was the gate's last.
        gw, mux = await self.gateway()
        gate = free_port()
        backend = await self.backend_echo()
        first = self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await eventually(lambda: len(gw.exposed().get((gate, "tcp"), [])) == 2)
        (link,) = first.links
        peer = f"127.0.0.1:{link.transport.getHost().port}"
        link.transport.abortConnection()  # dies abruptly: no GOAWAY
        await eventually(lambda: len(gw.links) == 1)
        self.assertTrue(self.logged(f"provider {peer} lost; it served {gate}/tcp"),
                        [e.get("log_format") for e in self.events])
        self.assertIn((gate, "tcp"), gw.gates)  # the other provider still serves it
        self.assertFalse(self.logged(f"gate {gate}/tcp closed"))

    async def test_a_silent_tcp_probe_is_not_an_admission_failure(self):
        # Item 15: a health check (`nc -z`) logged "link closed before admission (wrong
        # router secret, ...)" as a warning each time.
        from twisted.logger import LogLevel

        gw, mux = await self.gateway()
        port = mux.getHost().port
        probe = await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol.Protocol())
        probe.transport.loseConnection()
        await eventually(lambda: self.logged("closed without sending anything (a TCP probe)"))
        probe_event = next(e for e in self.events if "TCP probe" in e.get("log_format", ""))
        self.assertEqual(probe_event["log_level"], LogLevel.debug)
        self.assertFalse(self.logged("closed before admission"))
        self.assertEqual(gw.stats.by_label("admission_failures"), {})
        # A peer that did send bytes and then went away is still a warning.
        talker = await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol.Protocol())
        talker.transport.write(b"\x16\x03\x01\x00\x05hello")
        talker.transport.loseConnection()
        await eventually(lambda: self.logged("closed before admission") or self.logged("closing link with"))
        self.assertTrue(gw.stats.by_label("admission_failures"))


class CertificateCheckLogs(PortPlane):
    """docs/deployment.md §7.6: a provider whose --tls-verify check fails said only 'closed
    before admission (wrong router secret, refused role, or TLS failure)' every second."""

    async def test_an_untrusted_gateway_certificate_is_named(self):
        import os

        from tests.test_systemd import make_cert

        gw, mux = await self.gateway()
        ca = os.path.join(self.mktemp())
        with open(ca, "wb") as f:
            f.write(make_cert("some other CA")[0])
        prov = Provider(ProviderConfig(services=()), reactor)
        prov.startService()
        self.cleanups.append(prov.stopService)
        link_config = LinkConfig(secret=SECRET, role=frames.ROLE_PROVIDER, ping_interval=0.5, ping_deadline=2)
        endpoint = tls.client_endpoint(reactor, f"tcp:127.0.0.1:{mux.getHost().port}", "gw.example.com", ca)
        client = internet.ClientService(endpoint, LinkFactory(prov, link_config, reactor, True),
                                        retryPolicy=lambda n: 0.5, clock=reactor)
        client.startService()
        self.cleanups.append(client.stopService)
        await eventually(lambda: self.logged("closed before admission: TLS: certificate verify failed: the "
                                             "peer's certificate is not for gw.example.com (--tls-verify)"))
        self.assertEqual(prov.links, set())
        self.assertFalse(self.logged("while verifying certificate"))   # no traceback from Twisted


class ClosedAtAccept(PortPlane):
    """A dialling peer whose listener closes the connection at accept (a hub or gateway at
    --mux-max-conns-per-ip, or not a PipeGate mux port) logged only a debug line 'connection
    from ... closed without sending anything (a TCP probe)': the operator saw nothing but retries."""

    async def closing_listener(self):
        """A listener that closes every connection it accepts."""
        class CloseAtOnce(protocol.Protocol):
            def connectionMade(self):
                self.transport.loseConnection()

        listener = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(CloseAtOnce))
        self.cleanups.append(listener.stopListening)
        return listener

    async def test_the_dialler_warns(self):
        from twisted.logger import LogLevel

        listener = await self.closing_listener()
        self.provider(listener, [])   # dials it
        await eventually(lambda: self.logged("closed the connection before TLS"))
        event = next(e for e in self.events if "closed the connection before TLS" in e.get("log_format", ""))
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertFalse(self.logged("a TCP probe"))

    async def test_after_a_goaway_it_is_the_peer_stopping(self):
        # A gateway that says GOAWAY still hangs up on the replacement its provider dials at
        # once (it is draining): that is no fault to warn about, until a link is admitted again.
        from twisted.logger import LogLevel

        from pipegate.mux.node import link_services

        listener = await self.closing_listener()
        prov = Provider(ProviderConfig(), reactor)
        config = LinkConfig(secret=SECRET, role=frames.ROLE_PROVIDER)
        (dialer,) = link_services(prov, config, reactor, [], [f"tcp:127.0.0.1:{listener.getHost().port}"],
                                  certificate=CERT, retry_policy=lambda attempt: 0.2)
        dialer.startService()
        self.cleanups.append(dialer.stopService)
        await eventually(lambda: self.logged("closed the connection before TLS"))   # a warning, as above
        self.assertTrue(dialer.going_away(object()))   # what a link does when its peer says GOAWAY
        await eventually(lambda: self.logged("closed before TLS: it is stopping"))
        event = next(e for e in self.events if "it is stopping" in e.get("log_format", ""))
        self.assertEqual(event["log_level"], LogLevel.info)


class UDPFlowLogs(PortPlane):
    def test_summary_every_interval_on_a_clock(self):
        from twisted.internet.testing import EventLoggingObserver

        from pipegate.ports.provider import FLOW_SUMMARY_INTERVAL

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        clock = task.Clock()
        prov = Provider(ProviderConfig(), clock)
        prov.startService()
        prov.flow_summary.flow_opened()
        prov.flow_summary.flow_opened()
        prov.flow_summary.flow_closed()
        clock.advance(FLOW_SUMMARY_INTERVAL)
        summaries = [e for e in events if "UDP flows in the last" in e.get("log_format", "")]
        self.assertEqual([(e["opened"], e["closed"], e["open"]) for e in summaries], [(2, 1, 1)])
        clock.advance(FLOW_SUMMARY_INTERVAL)  # a quiet interval says nothing
        self.assertEqual(len([e for e in events if "UDP flows in the last" in e.get("log_format", "")]), 1)
        prov.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
