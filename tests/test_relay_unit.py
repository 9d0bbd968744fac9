"""
Relay logic without sockets: public requests fed to a RelayChannel on a StringTransport,
the connector link replaced by a recorder of the frames the relay sends it, time on a Clock.
"""

from __future__ import annotations

import os

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.task import Clock
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from pipegate import auth
from pipegate.accept import ConnectionGate
from pipegate.core import window
from pipegate.core.budget import PER_SOURCE, TOTAL, Budget, SourceRate
from pipegate.http import frames, visitors
from pipegate.http.ownership import Holder
from pipegate.http.public import RelaySite, raw_request_line
from pipegate.http.relay import Relay, RelayConfig
from pipegate.http.revocation import RevocationWatcher
from pipegate.tap import server as server_tap


class RecordingLink:
    """Stands in for a connector's WebSocket link: records every frame sent to it."""

    def __init__(self, tunnel_id: str) -> None:
        self.tunnel_id = tunnel_id
        self.holder = Holder("jti-1", False, visitors.EMPTY)
        self.streams: dict = {}
        self.sent: list = []
        self._next = 1

    def add_stream(self, stream) -> int:
        number, self._next = self._next, self._next + 1
        self.streams[number] = stream
        return number

    def remove_stream(self, number: int) -> None:
        self.streams.pop(number, None)

    def send(self, frame) -> None:
        self.sent.append(frame)

    def go_away(self, reason: str) -> None:
        pass


def caller(site, ip: str = "127.0.0.2", port: int = 40000):
    channel = site.buildProtocol(IPv4Address("TCP", ip, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", ip, port),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8000))
    channel.makeConnection(transport)
    return channel, transport


class Upgrades(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.relay = Relay(RelayConfig(jwt=auth.JWTSettings(secret="s" * 32)), self.clock)
        self.relay.startService()
        self.site = RelaySite(self.relay)
        self.link = RecordingLink("app")
        self.relay.tunnels.attach(self.link)

    def tearDown(self):
        for call in self.clock.getDelayedCalls():
            call.cancel()

    def test_an_upgrade_request_sends_its_head_and_no_end(self):
        # END means "the caller has finished sending" (protocol 1.6); after an upgrade's head
        # the caller has not: the pipe sends END when the caller half-closes.
        channel, transport = caller(self.site)
        channel.dataReceived(b"GET /app/ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n\r\n")
        kinds = [type(frame).__name__ for frame in self.link.sent]
        self.assertEqual(kinds, ["RequestHead"])
        self.assertTrue(self.link.sent[0].upgrade)
        self.assertFalse(self.link.sent[0].end)
        channel.connectionLost(Failure(ConnectionDone()))

    def test_a_plain_request_without_a_body_ends_with_its_head(self):
        channel, transport = caller(self.site)
        channel.dataReceived(b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.assertEqual([type(f) for f in self.link.sent], [frames.RequestHead])
        self.assertTrue(self.link.sent[0].end)
        channel.connectionLost(Failure(ConnectionDone()))


class ConnectionCaps(unittest.TestCase):
    def caps(self, *args: str, usable: int = 960) -> tuple[int, int]:
        options = server_tap.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": "s" * 32}
        options.parseOptions(list(args))
        return server_tap.connection_caps(options, usable)

    def test_defaults_from_the_fd_budget(self):
        self.assertEqual(self.caps(), (240, 960))
        self.assertEqual(self.caps(usable=65_472), (256, 65_472))

    def test_the_per_ip_default_follows_a_lower_max_connections(self):
        # Above the total, one stranger's IP could hold every connection.
        self.assertEqual(self.caps("--max-connections", "100"), (25, 100))
        self.assertEqual(self.caps("--max-connections", "2"), (1, 2))

    def test_both_given(self):
        self.assertEqual(self.caps("--max-connections", "100", "--max-connections-per-ip", "60"), (60, 100))

    def test_only_haproxy_listeners_skip_the_per_ip_cap(self):
        self.assertTrue(server_tap.behind_proxy("haproxy:tcp:8000"))
        self.assertTrue(server_tap.behind_proxy("HAProxy:unix:/run/p.sock"))
        self.assertFalse(server_tap.behind_proxy("tcp:443"))
        self.assertFalse(server_tap.behind_proxy("systemd:domain=INET:index=0"))


def churn_through(gate, address, host: str) -> int:
    """Ten connections from C{host} through C{gate}, each closed before the next one opens: how many it let in."""
    accepted = 0
    for port in range(10):
        protocol = gate.buildProtocol(address("TCP", host, port))
        if protocol is not None:
            accepted += 1
            protocol.makeConnection(StringTransport())
            protocol.connectionLost(Failure(ConnectionDone()))
    return accepted


class GateWithoutPerSource(unittest.TestCase):
    def test_a_proxy_listener_meets_the_total_only(self):
        budget = Budget(per_source=1, total=4)
        direct = ConnectionGate(Factory.forProtocol(Protocol), budget, Clock())
        proxied = ConnectionGate(Factory.forProtocol(Protocol), budget, Clock(), per_source=False)
        self.assertIsNotNone(direct.buildProtocol(IPv4Address("TCP", "127.0.0.8", 2)))
        self.assertIsNone(direct.buildProtocol(IPv4Address("TCP", "127.0.0.8", 3)))   # its per-IP cap of 1
        self.assertEqual(budget.refused[PER_SOURCE], 1)
        proxy = IPv4Address("TCP", "127.0.0.9", 1)
        for _ in range(3):   # one proxy address, many callers: only the total applies
            self.assertIsNotNone(proxied.buildProtocol(proxy))
        self.assertIsNone(proxied.buildProtocol(proxy))
        self.assertEqual(budget.refused, {PER_SOURCE: 1, TOTAL: 1})

    def test_new_connections_per_ip_are_rated_and_a_trusted_proxy_is_exempt(self):
        # --conn-rate-per-ip: one address opening and closing connections one after another
        # (each a TLS handshake) is held to the rate; a --trusted-proxy peer carries many
        # callers and is exempt, as it is from the per-IP cap.
        from pipegate.core.budget import RATE

        clock = Clock()
        options = server_tap.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": "s" * 32, "PIPEGATE_CONN_RATE_PER_IP": "2"}
        options.parseOptions(["--trusted-proxy", "127.0.0.9"])
        rate = server_tap.connection_rate(options, per_ip=3)
        self.assertEqual((rate.rate, rate.burst), (2, 3))
        budget = Budget(per_source=3, total=100, exempt=server_tap._TrustedPeers(options["trusted-proxies"]))
        refused = []
        gate = ConnectionGate(Factory.forProtocol(Protocol), budget, clock, rate=rate, on_refused=refused.append)

        def churn(host: str) -> int:
            return churn_through(gate, IPv4Address, host)

        self.assertEqual(churn("127.0.0.8"), 3)           # the burst
        self.assertEqual(refused, [RATE] * 7)
        clock.advance(1)
        self.assertEqual(churn("127.0.0.8"), 2)           # what one second refilled
        self.assertEqual(churn("127.0.0.9"), 10)          # the trusted proxy
        self.assertEqual(churn("127.0.0.10"), 3)          # another address has its own bucket
        options.parseOptions(["--conn-rate-per-ip", "0"])
        self.assertIsNone(server_tap.connection_rate(options, per_ip=3))

    def test_an_ipv6_trusted_proxy_is_exempt_from_the_per_ip_cap_and_the_rate(self):
        # The per-IP key of an IPv6 peer is its /64 ("::/64" for ::1), which no --trusted-proxy
        # entry names: the exemption is decided on the peer's own address.  Before, a proxy on
        # ::1 (nginx's proxy_pass http://localhost:8000, the documented PIPEGATE_TRUSTED_PROXY=
        # 127.0.0.1,::1) met the per-IP cap and the rate like any one caller; another host of
        # its /64 is still held to both.
        clock = Clock()
        options = server_tap.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": "s" * 32}
        options.parseOptions(["--trusted-proxy", "127.0.0.1,::1,2001:db8::7"])
        budget = Budget(per_source=3, total=100, exempt=server_tap._TrustedPeers(options["trusted-proxies"]))
        gate = ConnectionGate(Factory.forProtocol(Protocol), budget, clock, rate=SourceRate(1, 3))

        def held(host: str, n: int) -> int:
            built = [gate.buildProtocol(IPv6Address("TCP", host, port)) for port in range(n)]
            return sum(p is not None for p in built)

        def churn(host: str) -> int:
            return churn_through(gate, IPv6Address, host)

        self.assertEqual(churn("::1"), 10)
        self.assertEqual(churn("2001:db8::7"), 10)
        self.assertEqual(churn("2001:db8::8"), 3)          # its neighbour is not trusted
        self.assertEqual(held("::1", 10), 10)
        self.assertEqual(held("2001:db8::9", 10), 0)       # (the /64's cap of 3, and no token left)
        clock.advance(100)
        self.assertEqual(held("2001:db8::9", 10), 3)


class RevocationPolling(unittest.TestCase):
    def test_a_failing_apply_does_not_stop_the_polling(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("one\n")
        calls = []

        def on_change(revocations):
            calls.append(revocations)
            if len(calls) == 1:
                raise RuntimeError("boom")
        clock = MemoryReactorClock()
        watcher = RevocationWatcher(path, clock, on_change, interval=1.0)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        clock.advance(1.0)
        self.assertEqual(len(calls), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        with open(path + ".new", "w") as f:
            f.write("one\ntwo\n")
        os.replace(path + ".new", path)
        clock.advance(1.0)
        self.assertEqual(len(calls), 2)
        self.assertTrue(watcher._loop.running)


class StreamFlow(unittest.TestCase):
    """
    RelayStream's flow control (pipegate/http/streams.py, one core.window.Flow): a caller
    on a StringTransport, the connector a RecordingLink fed frames by hand, time on a Clock.
    """

    HALF = window.INITIAL_WINDOW // 2
    CHUNK = 65_536

    def setUp(self):
        self.clock = Clock()

    def start(self, head: bytes = b"GET /app/x HTTP/1.1\r\nHost: relay\r\n\r\n", **config):
        self.relay = Relay(RelayConfig(jwt=auth.JWTSettings(secret="s" * 32), **config), self.clock)
        self.relay.startService()
        self.link = RecordingLink("app")
        self.relay.tunnels.attach(self.link)
        self.channel, self.transport = caller(RelaySite(self.relay))
        self.addCleanup(self.end)
        self.channel.dataReceived(head)
        self.stream = self.link.streams[1]

    def end(self):
        self.channel.connectionLost(Failure(ConnectionDone()))
        for call in self.clock.getDelayedCalls():
            call.cancel()

    def respond(self):
        self.stream.frame_received(frames.ResponseHead(1, 200))
        self.link.sent.clear()

    def data(self, count: int = 1, size: int = CHUNK) -> list[int]:
        """DATA from the connector; the increments of the WINDOW frames the relay sent back."""
        for _ in range(count):
            self.stream.frame_received(frames.Data(1, b"d" * size))
        grants = [f.increment for f in self.link.sent if isinstance(f, frames.Window)]
        self.link.sent.clear()
        return grants

    def test_credit_goes_back_at_half_the_window(self):
        self.start()
        self.respond()
        self.assertEqual(self.data(), [])
        self.assertEqual(self.data(), [self.HALF])   # two 64 KiB frames: half of 256 KiB
        self.assertIn(b"d" * self.CHUNK, self.transport.value())

    def test_the_response_window_grows_while_the_caller_keeps_up(self):
        self.start()
        self.respond()
        # A whole window handed on without pushback: it doubles, the extra credit rides
        # on the next grant, and the growth is taken from the relay's budget.
        self.assertEqual(self.data(4), [self.HALF, self.HALF + window.INITIAL_WINDOW])
        self.assertEqual(self.stream.flow.recv.window, 2 * window.INITIAL_WINDOW)
        self.assertEqual(self.relay.window_budget.used, window.INITIAL_WINDOW)
        self.stream.frame_received(frames.End(1))
        self.assertEqual(self.relay.window_budget.used, 0)   # given back when the stream ends

    def test_growth_stops_at_max_window_and_at_the_budget(self):
        self.start(max_window=window.INITIAL_WINDOW * 2)
        self.respond()
        self.data(16)
        self.assertEqual(self.stream.flow.recv.window, window.INITIAL_WINDOW * 2)
        self.end()
        self.start(window_budget=1000)
        self.respond()
        self.data(16)
        self.assertEqual(self.stream.flow.recv.window, window.INITIAL_WINDOW + 1000)
        self.assertEqual(self.relay.window_budget.used, 1000)

    def test_a_paused_caller_gets_no_credit_until_it_resumes(self):
        self.start()
        self.respond()
        self.channel.pauseProducing()   # the caller's socket buffer is full
        self.assertEqual(self.data(3), [])
        self.clock.advance(0.05)        # a short pause: the caller keeps up
        self.channel.resumeProducing()
        self.assertEqual([f.increment for f in self.link.sent], [3 * self.CHUNK])

    def test_a_caller_that_stays_paused_shrinks_the_window_to_the_initial_credit(self):
        self.start()
        self.respond()
        self.data(4)                    # grown to twice the initial window
        self.channel.pauseProducing()
        self.assertEqual(self.data(6), [])
        self.clock.advance(window.SLOW_SINK)
        self.channel.resumeProducing()
        # The growth is withheld from the credit due, and back in the budget.
        self.assertEqual(self.stream.flow.recv.window, window.INITIAL_WINDOW)
        self.assertEqual(self.relay.window_budget.used, 0)
        self.assertEqual([f.increment for f in self.link.sent], [6 * self.CHUNK - window.INITIAL_WINDOW])

    def test_a_connector_overrunning_its_credit_is_a_protocol_error(self):
        self.start()
        self.respond()
        self.data(3)
        with self.assertRaises(frames.FrameError):
            self.stream.frame_received(frames.Data(1, b"Z" * (self.stream.flow.recv.available + 1)))
        self.assertEqual(self.transport.value().count(b"Z"), 0)   # refused before the write

    def test_a_shaped_response_keeps_the_initial_window(self):
        rate = 2 * self.CHUNK   # bytes/s per tunnel and direction (burst: one second of it)
        self.start(tunnel_rate=rate)
        self.respond()
        sent = 0
        while self.clock.seconds() < 10:
            # A connector that keeps to its credit, as fast as it is granted.
            if self.stream.flow.recv.available >= self.CHUNK:
                self.data()
                sent += self.CHUNK
            else:
                self.clock.advance(0.01)
            self.assertLessEqual(self.stream.flow.recv.window, window.INITIAL_WINDOW)
        self.assertEqual(self.relay.window_budget.used, 0)
        # The bucket sets the pace: its burst, the rate times the time, and what the
        # initial window lets the connector send ahead.
        self.assertLessEqual(sent, rate + rate * 10 + window.INITIAL_WINDOW)
        self.assertGreaterEqual(sent, rate * 10)
        self.assertGreater(self.relay.stats.get("throttled_seconds", "down"), 5)

    def test_a_shaped_hold_grants_nothing_until_it_ends(self):
        self.start(tunnel_rate=self.CHUNK)
        self.respond()
        self.assertEqual(self.data(3), [])   # the second frame overdraws the bucket: held
        (hold,) = [c for c in self.clock.getDelayedCalls() if c.func == self.stream._download_released]
        self.clock.advance(hold.getTime() - self.clock.seconds() - 0.001)
        self.assertEqual(self.link.sent, [])
        self.clock.advance(0.001)
        self.assertEqual([f.increment for f in self.link.sent], [3 * self.CHUNK])

    def test_the_request_body_waits_for_the_connectors_credit(self):
        size = window.INITIAL_WINDOW + 1000
        self.start(b"POST /app/up HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\n\r\n" % size)
        self.channel.dataReceived(b"b" * size)
        sent = [f for f in self.link.sent if isinstance(f, frames.Data)]
        self.assertEqual(sum(len(f.data) for f in sent), window.INITIAL_WINDOW)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertFalse(any(isinstance(f, frames.End) for f in self.link.sent))
        self.link.sent.clear()
        self.stream.frame_received(frames.Window(1, self.HALF))
        self.assertEqual([type(f) for f in self.link.sent], [frames.Data, frames.End])
        self.assertEqual(len(self.link.sent[0].data), 1000)


class PublicRouting(unittest.TestCase):
    """The relay answers what routing.route decides, on a StringTransport."""

    def setUp(self):
        self.clock = Clock()
        self.relay = Relay(RelayConfig(jwt=auth.JWTSettings(secret="s" * 32), domain="tunnels.example"), self.clock)
        self.site = RelaySite(self.relay)
        self.link = RecordingLink("app")
        self.relay.tunnels.attach(self.link)

    def ask(self, head: bytes) -> bytes:
        channel, transport = caller(self.site)
        channel.dataReceived(head)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        return transport.value()

    def test_a_bare_id_gets_a_301_to_its_directory(self):
        answer = self.ask(b"GET /app?x=1 HTTP/1.1\r\nHost: relay\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 301 "))
        self.assertIn(b"\r\nLocation: /app/?x=1\r\n", answer)
        self.assertEqual(self.link.sent, [])

    def test_the_host_name_routes_with_the_whole_target(self):
        self.ask(b"GET /app?x=1 HTTP/1.1\r\nHost: App.tunnels.example:8080\r\n\r\n")
        (head,) = self.link.sent
        self.assertEqual((head.target, head.prefix), (b"/app?x=1", b""))

    def test_unknown_and_bad_targets(self):
        self.assertTrue(self.ask(b"GET /-x/ HTTP/1.1\r\nHost: relay\r\n\r\n").startswith(b"HTTP/1.1 404 "))
        self.assertTrue(self.ask(b"GET /nobody/ HTTP/1.1\r\nHost: relay\r\n\r\n").startswith(b"HTTP/1.1 404 "))
        self.assertTrue(self.ask(b"GET app/x HTTP/1.1\r\nHost: relay\r\n\r\n").startswith(b"HTTP/1.1 400 "))

    def test_healthz_is_the_relays_except_on_a_tunnels_host(self):
        self.assertIn(b'{"status": "ok"}', self.ask(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"))
        self.ask(b"GET /healthz HTTP/1.1\r\nHost: app.tunnels.example\r\n\r\n")
        self.assertEqual([f.target for f in self.link.sent], [b"/healthz"])


class RawRequestLine(unittest.TestCase):
    def test_raw_bytes_in_the_target_are_percent_encoded_for_twisted_and_kept_for_the_app(self):
        self.assertEqual(raw_request_line(b"GET /app/caf\xc3\xa9?q=\xff HTTP/1.1"),
                         (b"GET /app/caf%C3%A9?q=%FF HTTP/1.1", b"/app/caf\xc3\xa9?q=\xff"))

    def test_other_lines_are_left_to_twisted(self):
        for line in (b"GET /app/x HTTP/1.1", b"G\xc3T /x HTTP/1.1", b"GET /\xc3 HTTP/1.\xc3",
                     b"GET /a b HTTP/1.1", b"GET /\xc3\r HTTP/1.1 x"):
            self.assertIsNone(raw_request_line(line), line)

