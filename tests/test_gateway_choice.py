"""
The gateway's and the provider's choices without sockets: which provider an OPEN goes to
(round robin over the providers announcing a gate, failover on OPEN_FAIL, RESET, the
open timeout and a lost link, GOAWAY draining, give up when none is left), and how a
provider answers an OPEN it cannot serve.  A task.Clock drives the open timeout.
"""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from pipegate.core.policy import GRANT_LABEL, Decision, PolicyError, decide
from pipegate.mux import frames
from pipegate.mux.session import LinkConfig, MuxLink
from pipegate.ports.gateway import Gateway, GatewayConfig
from pipegate.ports.provider import Provider, ProviderConfig
from pipegate.ports.services import Service
from pipegate.ports.udp import Flow
from tests.test_mux_session import LinkTestCase, RecordingNode, TLSTransport

GATE = (5353, "udp")


class ProviderLink:
    """The parts of an admitted mux link that the gateway and provider use."""

    admitted = True
    paused = False
    peer_role = frames.ROLE_PROVIDER

    def __init__(self, name: str, max_channels: int = 100) -> None:
        self.peer_name = name
        self.closed = self.going_away = False
        self.channels: dict = {}
        self.sent: list = []
        self.config = LinkConfig(secret=b"s" * 32, role=frames.ROLE_GATEWAY, max_channels=max_channels)
        self.next_channel = 1
        self._held: dict = {}
        self.failed: str | None = None

    def __repr__(self) -> str:
        return f"<{self.peer_name}>"

    def send(self, frame) -> None:
        self.sent.append(frame)

    # The channel table is MuxLink's own (its methods read only channels, closed, config,
    # next_channel and _held), not a copy of it.
    allocate_channel = MuxLink.allocate_channel
    reserve_channel = MuxLink.reserve_channel
    bind_channel = MuxLink.bind_channel
    release_channel = MuxLink.release_channel
    holds_channel = MuxLink.holds_channel
    has_channel = MuxLink.has_channel
    channel_count = MuxLink.channel_count

    def opens(self) -> list:
        return [f for f in self.sent if isinstance(f, frames.Open)]

    def answer(self, frame) -> None:
        """The provider's answer to its last OPEN, as the link would dispatch it."""
        self.channels[frame.channel].frame_received(frame)

    def fail(self, reason: str) -> None:
        self.failed = reason


class GatewayChoice(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.gateway = Gateway(GatewayConfig(open_timeout=5), self.clock)
        self.links = [ProviderLink(name) for name in ("a", "b", "c")]
        for link in self.links:
            self.announce(link, [frames.Route(GATE[0], GATE[1], "127.0.0.1", 53)])

    def announce(self, link, routes) -> None:
        self.gateway.link_admitted(link)
        self.gateway.link_frame(link, frames.Routes(tuple(routes)))

    def client(self, port: int = 4000) -> Flow:
        flow = Flow(self.clock, 60.0, lambda d: None, lambda f: None)
        flow.client_address = ("127.0.0.2", port)
        flow.failed = False
        flow.open_failed = lambda: setattr(flow, "failed", True)
        self.addCleanup(flow.close, notify=False)
        return flow

    def opened_on(self) -> list[str]:
        return [link.peer_name for link in self.links for _ in link.opens()]

    def test_round_robin_over_the_providers_of_a_gate(self) -> None:
        for n in range(6):
            self.gateway.try_open(GATE, self.client(4000 + n))
        self.assertEqual([len(link.opens()) for link in self.links], [2, 2, 2])
        self.assertEqual(self.gateway.exposed(), {GATE: self.links})

    def test_open_fail_moves_on_to_the_next_provider(self) -> None:
        flow = self.client()
        self.gateway.try_open(GATE, flow)
        a, b, c = self.links
        (opened,) = a.opens()
        self.assertEqual((opened.gate_port, opened.protocol, opened.client_host), (5353, "udp", "127.0.0.2"))
        a.answer(frames.OpenFail(opened.channel, "full"))
        self.assertEqual(a.channels, {})
        (opened,) = b.opens()
        b.answer(frames.OpenOk(opened.channel))
        self.assertIs(b.channels[opened.channel], flow)
        self.assertIs(flow.link, b)
        self.assertEqual(c.opens(), [])
        self.assertFalse(flow.failed)
        self.assertEqual(self.gateway.stats.get("channel_opens", "refused"), 1)
        self.assertEqual(self.gateway.stats.get("channel_opens", "ok"), 1)

    def test_the_client_fails_only_when_every_provider_refused(self) -> None:
        flow = self.client()
        self.gateway.try_open(GATE, flow)
        for link in self.links:
            self.assertFalse(flow.failed)
            (opened,) = link.opens()
            link.answer(frames.OpenFail(opened.channel, "no"))
        self.assertTrue(flow.failed)
        self.assertEqual([link.channels for link in self.links], [{}, {}, {}])

    def test_an_unanswered_open_times_out_and_moves_on(self) -> None:
        flow = self.client()
        self.gateway.try_open(GATE, flow)
        a, b, _ = self.links
        self.clock.advance(4.9)
        self.assertEqual(b.opens(), [])
        self.clock.advance(0.1)
        self.assertEqual(a.sent[-1], frames.Reset(a.opens()[0].channel, "open timed out"))
        self.assertEqual(a.channels, {})
        self.assertEqual(len(b.opens()), 1)
        self.assertEqual(self.gateway.stats.get("channel_opens", "timeout"), 1)

    def test_a_reset_or_a_lost_link_moves_on(self) -> None:
        flow = self.client()
        self.gateway.try_open(GATE, flow)
        a, b, c = self.links
        a.answer(frames.Reset(a.opens()[0].channel, "gave up"))
        self.assertEqual(len(b.opens()), 1)
        b.channels[b.opens()[0].channel].link_lost()
        self.assertEqual(len(c.opens()), 1)

    def test_a_provider_going_away_gets_no_new_opens(self) -> None:
        a, b, c = self.links
        b.going_away = True
        self.gateway.link_frame(b, frames.GoAway("stopping"))
        self.assertEqual(self.gateway.exposed(), {GATE: [a, c]})
        for n in range(4):
            self.gateway.try_open(GATE, self.client(4000 + n))
        self.assertEqual([len(link.opens()) for link in self.links], [2, 0, 2])

    def test_a_provider_that_left_during_an_attempt_is_skipped(self) -> None:
        flow = self.client()
        self.gateway.try_open(GATE, flow)
        a, b, c = self.links
        self.gateway.link_lost(b)
        a.answer(frames.OpenFail(a.opens()[0].channel, "no"))
        self.assertEqual(b.opens(), [])
        self.assertEqual(len(c.opens()), 1)

    def test_a_full_or_closed_link_is_skipped(self) -> None:
        a, b, c = self.links
        a.config = attrs.evolve(a.config, max_channels=0)
        b.closed = True
        self.gateway.try_open(GATE, self.client())
        self.assertEqual(len(c.opens()), 1)

    def test_no_provider_no_open(self) -> None:
        flow = self.client()
        self.gateway.try_open((9999, "tcp"), flow)
        self.assertTrue(flow.failed)
        self.assertEqual(self.opened_on(), [])

    def test_a_withdrawn_route_takes_the_provider_out(self) -> None:
        a, b, c = self.links
        self.announce(a, [])
        self.assertEqual(self.gateway.exposed(), {GATE: [b, c]})
        self.gateway.link_lost(b)
        self.gateway.link_lost(c)
        self.assertEqual(self.gateway.exposed(), {})

    def test_the_client_leaving_mid_open_gives_the_channel_back(self) -> None:
        flow = self.client()
        self.gateway.try_open(GATE, flow)
        a = self.links[0]
        channel = a.opens()[0].channel
        flow.close(notify=False)
        self.assertEqual(a.channels, {})
        self.assertEqual(a.sent[-1], frames.Reset(channel, "client went away"))
        self.clock.advance(10)
        self.assertEqual(self.links[1].opens(), [])   # no failover for a client that left


class ProviderAnswers(unittest.TestCase):
    """A provider's real MuxLink, admitted by a gateway-side link over StringTransports."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()   # records backend connects, never makes them
        self.provider = Provider(ProviderConfig(services=(
            Service(gate_port=2222, service_host="127.0.0.1", service_port=22, protocol="tcp"),),
            backends_per_source=1), self.reactor)
        config = dict(secret=b"\x01" * 32, max_channels=2)
        self.link = MuxLink(self.provider, LinkConfig(role=frames.ROLE_PROVIDER, **config), self.reactor, True)
        self.peer = MuxLink(RecordingNode(), LinkConfig(role=frames.ROLE_GATEWAY, **config), self.reactor, False)
        for link in (self.link, self.peer):
            link.makeConnection(TLSTransport())
            link.handshakeCompleted()
        LinkTestCase.pump(self.link, self.peer)
        self.assertTrue(self.link.admitted and self.peer.admitted)
        self.assertEqual(self.provider.links, {self.link})
        self.link.transport.clear()
        self.addCleanup(self.close)

    def close(self) -> None:
        for link in (self.link, self.peer):
            if not link.closed:
                link.fail("test over")
            link.connectionLost(None)

    def open(self, channel: int, port: int = 2222, host: str = "127.0.0.2") -> list:
        """Send OPEN from the gateway side; the frames the provider answered."""
        self.link.dataReceived(frames.encode(frames.Open(channel, gate_port=port, protocol="tcp",
                                                         client_host=host, client_port=1000)))
        return LinkTestCase.written(self.link)

    def test_an_unknown_service_is_refused(self) -> None:
        self.assertEqual(self.open(1, port=9999), [frames.OpenFail(1, "unknown service")])
        self.assertEqual(self.link.channel_count(), 0)

    def test_a_channel_id_in_use_closes_the_link(self) -> None:
        self.assertEqual(self.open(1), [])          # connecting to the service
        self.assertTrue(self.link.has_channel(1))
        self.open(1)
        self.assertTrue(self.link.closed)

    def test_a_full_link_answers_overloaded(self) -> None:
        self.open(1)
        self.open(2, host="127.0.0.3")
        self.assertEqual(self.open(3, host="127.0.0.4"), [frames.OpenFail(3, "overloaded")])

    def test_past_the_per_client_cap_the_gateway_is_told_to_try_another_provider(self) -> None:
        self.open(1)
        self.assertEqual(self.open(2), [frames.OpenFail(2, "overloaded: backend per-source cap reached")])
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_a_reset_while_connecting_gives_the_channel_back(self) -> None:
        self.open(1)
        self.link.dataReceived(frames.encode(frames.Reset(1, "open timed out")))
        self.assertFalse(self.link.has_channel(1))
        self.assertEqual(self.link.channel_count(), 0)


class GatewayDecisions(unittest.TestCase):
    """
    Gateway.decide at accept time: with no grant and no rule anywhere it does not run the
    policy engine (once per connection), and says what the engine would say.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.gateway = Gateway(GatewayConfig(), self.clock)
        self.link = ProviderLink("a")
        self.gateway.link_admitted(self.link)

    def announce(self, policy: bytes = b"") -> None:
        self.gateway.link_frame(self.link, frames.Routes((frames.Route(2222, "tcp", "127.0.0.1", 22,
                                                                       policy=policy),)))

    def engine(self, ip: str) -> Decision:
        """What the policy engine decides for C{ip} with the gateway's grants and rules."""
        now_ms = self.clock.seconds() * 1000
        policies = [self.gateway.grants.policy(now_ms), self.gateway.config.policy]
        policies += self.gateway.link_policies[self.link][(2222, "tcp")]
        try:
            return decide(policies, ip, 2222, "tcp", now_ms)
        except PolicyError:
            return Decision(allow=False, matched="not an IP address")

    def test_no_rules_admits_and_refuses_a_non_address_as_the_engine_does(self) -> None:
        self.announce()
        for ip in ("127.0.0.1", "::ffff:10.0.0.1", "nope", ""):
            self.assertEqual(self.gateway.decide((2222, "tcp"), ip), self.engine(ip))
        self.assertEqual(self.gateway.decide((2222, "tcp"), "10.0.0.1"), Decision(allow=True))
        self.assertFalse(self.gateway.decide((2222, "tcp"), "nope").allow)

    def test_a_provider_rule_is_applied(self) -> None:
        self.announce(b'{"ips": {"10.0.0.0/8": {"allow": false}}}')
        self.assertFalse(self.gateway.decide((2222, "tcp"), "10.1.2.3").allow)
        self.assertTrue(self.gateway.decide((2222, "tcp"), "192.0.2.1").allow)
        for ip in ("10.1.2.3", "192.0.2.1", "nope"):
            self.assertEqual(self.gateway.decide((2222, "tcp"), ip), self.engine(ip))

    def test_provider_defaults_are_applied(self) -> None:
        self.announce(b'{"defaults": {"allow": false}}')
        self.assertEqual(self.gateway.decide((2222, "tcp"), "192.0.2.1"), self.engine("192.0.2.1"))
        self.assertFalse(self.gateway.decide((2222, "tcp"), "192.0.2.1").allow)

    def test_a_grant_is_applied_and_expires(self) -> None:
        self.announce()
        self.gateway.grants.grant("192.0.2.1", self.clock.seconds() * 1000, 10)
        granted = self.gateway.decide((2222, "tcp"), "192.0.2.1")
        self.assertEqual(granted, self.engine("192.0.2.1"))
        self.assertEqual(granted.labels, (GRANT_LABEL,))
        self.assertEqual(self.gateway.decide((2222, "tcp"), "192.0.2.2"), Decision(allow=True))
        self.clock.advance(11)
        self.assertEqual(self.gateway.decide((2222, "tcp"), "192.0.2.1"), Decision(allow=True))
        self.assertEqual(len(self.gateway.grants), 0)   # (the expired grant was dropped)
