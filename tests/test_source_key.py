"""
Per-IP caps key an IPv6 client by its /64 (issue 17 review): pipegate.core.budget.source_key
and every place that acquires a per-IP unit with it.  Sans-IO: Clock, proto_helpers, no sockets.
"""

from __future__ import annotations

from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from pipegate.accept import ConnectionGate, source_of
from pipegate.core.budget import Budget, source_key
from pipegate.mux import frames
from pipegate.ports.gateway import Gateway, GatewayConfig
from pipegate.ports.gates import GateFactory, UDPGate
from pipegate.ports.provider import Provider, ProviderConfig
from pipegate.ports.unlimited import UnlimitedGate

A = "2001:db8:1:2::1"
B = "2001:db8:1:2:ffff:ffff:ffff:fffe"     # same /64 as A
C = "2001:db8:1:3::1"                      # the next /64


class SourceKeyTests(unittest.SynchronousTestCase):
    def test_ipv4_as_is(self):
        self.assertEqual(source_key("192.0.2.7"), "192.0.2.7")

    def test_ipv6_by_its_64(self):
        self.assertEqual(source_key(A), "2001:db8:1:2::/64")
        self.assertEqual(source_key(B), source_key(A))
        self.assertNotEqual(source_key(C), source_key(A))
        self.assertEqual(source_key("::1"), "::/64")

    def test_cached_and_bounded(self):
        before = source_key.cache_info()
        self.assertEqual(source_key("198.51.100.9"), "198.51.100.9")
        self.assertEqual(source_key("198.51.100.9"), "198.51.100.9")
        after = source_key.cache_info()
        self.assertEqual(after.hits - before.hits, 1)
        self.assertEqual(after.maxsize, 1024)

    def test_ipv4_mapped_as_ipv4(self):
        self.assertEqual(source_key("::ffff:192.0.2.7"), "192.0.2.7")

    def test_zone_dropped_and_non_ip_text_kept(self):
        self.assertEqual(source_key("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(source_key(" not an ip "), "not an ip")
        self.assertEqual(source_key(""), "")


class Echo(Protocol):
    pass


class AcquireSites(unittest.SynchronousTestCase):
    """A second address of the same /64 finds the per-IP cap of one already taken."""

    def test_connection_gate(self):
        gate = ConnectionGate(Factory.forProtocol(Echo), Budget(per_source=1, total=10), Clock())
        self.assertIsNotNone(gate.buildProtocol(IPv6Address("TCP", A, 1)))
        self.assertIsNone(gate.buildProtocol(IPv6Address("TCP", B, 2)))
        self.assertIsNotNone(gate.buildProtocol(IPv6Address("TCP", C, 3)))
        self.assertIsNone(source_of(UNIXAddress(b"/tmp/x")))

    def test_gateway_tcp_gate(self):
        gateway = Gateway(GatewayConfig(tcp_per_source=1), Clock())
        factory = GateFactory(gateway, (2222, "tcp"))
        self.assertIsNotNone(factory.buildProtocol(IPv6Address("TCP", A, 1)))
        self.assertIsNone(factory.buildProtocol(IPv6Address("TCP", B, 2)))
        self.assertEqual(gateway.stats.get("cap_refusals", "tcp-per-source"), 1)
        self.assertIsNotNone(factory.buildProtocol(IPv6Address("TCP", C, 3)))

    def test_gateway_udp_gate(self):
        gateway = Gateway(GatewayConfig(udp_per_source=1), Clock())
        gateway.try_open = lambda key, client, attempt=None: None   # the OPEN stays in flight
        gate = UDPGate(gateway, (5353, "udp"))
        gate.datagramReceived(b"x", (A, 1, 0, 0))
        gate.datagramReceived(b"x", (B, 2, 0, 0))
        self.assertEqual(gateway.stats.get("cap_refusals", "udp-per-source"), 1)
        gate.datagramReceived(b"x", (C, 3, 0, 0))
        self.assertEqual((len(gate.flows), gateway.udp_budget.held(source_key(A))), (2, 1))
        gate.stop()

    def test_provider_backends(self):
        provider = Provider(ProviderConfig(backends_per_source=1), Clock())
        sent = []

        class Link:
            def send(self, frame):
                sent.append(frame)

        def open_from(host, channel):
            return provider._acquire(Link(), frames.Open(channel, gate_port=2222, protocol="tcp",
                                                         client_host=host, client_port=1000))
        self.assertIsNotNone(open_from(A, 1))
        self.assertIsNone(open_from(B, 2))
        self.assertEqual(sent, [frames.OpenFail(2, "overloaded: backend per-source cap reached")])
        self.assertIsNotNone(open_from(C, 3))

    def test_unlimited_failures_count_per_64(self):
        gate = UnlimitedGate("s" * 32, max_failures=3)
        for n in range(3):
            self.assertEqual(gate.check("garbage", f"2001:db8:1:2::{n + 1}", 0)[0], 403)
        self.assertEqual(gate.check("garbage", B, 0), (429, {"error": "too_many_attempts"}))
        self.assertEqual(gate.failures(A, 0), 3)
        self.assertEqual(gate.check("garbage", C, 0)[0], 403)
