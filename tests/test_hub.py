"""
The hub's routing core (L{pipegate.mux.hubcore.HubCore}) without sockets: admission by
router, route announcements, channel splicing with rewritten ids, credit, failover,
isolation between routers, and the bounds.  Plus the pipegate-server options for it.
"""

from __future__ import annotations

from twisted.python import usage
from twisted.trial import unittest

from pipegate.mux import frames
from pipegate.mux.hubcore import Close, HubConfig, HubCore, Send
from pipegate.tap import server as server_tap

P, G, O = frames.ROLE_PROVIDER, frames.ROLE_GATEWAY, frames.ROLE_OBSERVER
WINDOW = 1000


def route(port: int, proto: str = "tcp", host: str = "10.0.0.1", policy: bytes = b"") -> frames.Route:
    return frames.Route(gate_port=port, protocol=proto, service_host=host, service_port=port, policy=policy)


def open_frame(channel: int, port: int = 2222, proto: str = "tcp") -> frames.Open:
    return frames.Open(channel, gate_port=port, protocol=proto, client_host="203.0.113.9",
                       client_port=40000, labels=("vip",))


def sent(outputs, peer=None) -> list:
    """The frames sent (to C{peer}), in order; fails on a Close."""
    closes = [o for o in outputs if isinstance(o, Close)]
    assert not closes, closes
    return [o.frame for o in outputs if peer is None or o.peer == peer]


class Hub(unittest.TestCase):

    def setUp(self):
        self.hub = HubCore(HubConfig(window=WINDOW, max_window=2 * WINDOW, max_peers=10, max_channels=3))

    def join(self, name: str, role: int, router: int = 0, routes=()) -> list:
        out = self.hub.admit(name, router, role)
        if routes:
            out += self.hub.frame(name, frames.Routes(tuple(routes)))
        return out

    def splice(self, gw_channel: int = 5) -> int:
        """gw opens channel C{gw_channel} to gate 2222 on p1; returns p1's channel id."""
        (opened,) = sent(self.hub.frame("gw", open_frame(gw_channel)), "p1")
        self.assertEqual(sent(self.hub.frame("p1", frames.OpenOk(opened.channel))),
                         [frames.OpenOk(gw_channel)])
        return opened.channel

    # -- routes
    def test_gateways_see_the_union_of_their_routers_providers(self):
        self.assertEqual(sent(self.join("gw", G)), [frames.Routes(())])
        self.assertEqual(sent(self.join("other-gw", G, router=1)), [frames.Routes(())])
        self.assertEqual(sent(self.join("obs", O)), [frames.Routes(())])
        out = self.join("p1", P, routes=[route(2222), route(53, "udp")])
        self.assertEqual(sent(out, "gw"), [frames.Routes((route(2222), route(53, "udp")))])
        self.assertEqual(sent(out, "obs"), sent(out, "gw"))
        self.assertEqual(sent(out, "other-gw"), [])
        self.assertEqual(sent(out, "p1"), [])           # a provider hears no routes
        # A second provider: identical routes once, new ones added.
        out = self.join("p2", P, routes=[route(2222), route(8080)])
        self.assertEqual(sent(out, "gw"), [frames.Routes((route(2222), route(53, "udp"), route(8080)))])
        # A late gateway gets the table at once.
        self.assertEqual(sent(self.join("gw2", G)), [frames.Routes((route(2222), route(53, "udp"), route(8080)))])
        # Unchanged table: nothing sent.
        self.assertEqual(self.hub.frame("p2", frames.Routes((route(8080), route(2222)))), [])

    def test_withdrawal_by_routes_goaway_and_loss(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(1)])
        self.join("p2", P, routes=[route(2)])
        self.assertEqual(sent(self.hub.frame("p1", frames.Routes(())), "gw"), [frames.Routes((route(2),))])
        self.hub.frame("p1", frames.Routes((route(1),)))
        self.assertEqual(sent(self.hub.frame("p2", frames.GoAway("bye")), "gw"), [frames.Routes((route(1),))])
        self.assertEqual(sent(self.hub.lost("p1"), "gw"), [frames.Routes(())])

    def test_routes_from_gateways_are_ignored(self):
        self.join("gw", G)
        self.join("gw2", G)
        self.assertEqual(self.hub.frame("gw2", frames.Routes((route(1),))), [])
        self.assertEqual(self.hub.routes_for(0), ())

    def test_union_fits_one_frame(self):
        hub = HubCore(HubConfig(max_frame_size=frames.MIN_MAX_FRAME_SIZE))
        hub.admit("gw", 0, G)
        policy = b"x" * 30_000
        out = hub.admit("p", 0, P) + hub.frame("p", frames.Routes(tuple(route(n, policy=policy) for n in (1, 2, 3))))
        (table,) = sent(out, "gw")
        self.assertEqual([r.gate_port for r in table.routes], [1, 2])
        self.assertLessEqual(len(frames.encode(table)), frames.MIN_MAX_FRAME_SIZE + 4)
        self.assertEqual(hub.truncated_routes, 1)

    # -- channels
    def test_splice_rewrites_ids_and_passes_everything(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        (opened,) = sent(self.hub.frame("gw", open_frame(5)), "p1")
        self.assertEqual(opened, open_frame(opened.channel))   # same fields, the hub's id
        self.assertEqual(sent(self.hub.frame("p1", frames.OpenOk(opened.channel))), [frames.OpenOk(5)])
        pc = opened.channel
        self.assertEqual(sent(self.hub.frame("gw", frames.Data(5, b"up"))), [frames.Data(pc, b"up")])
        self.assertEqual(sent(self.hub.frame("p1", frames.Data(pc, b"down"))), [frames.Data(5, b"down")])
        self.assertEqual(sent(self.hub.frame("p1", frames.Window(pc, 2))), [frames.Window(5, 2)])
        self.assertEqual(sent(self.hub.frame("gw", frames.Window(5, 4))), [frames.Window(pc, 4)])
        self.assertEqual(self.hub.splices(), 1)
        self.assertEqual(sent(self.hub.frame("gw", frames.Fin(5))), [frames.Fin(pc)])
        self.assertEqual(sent(self.hub.frame("p1", frames.Data(pc, b"late"))), [frames.Data(5, b"late")])
        self.assertEqual(sent(self.hub.frame("p1", frames.Fin(pc))), [frames.Fin(5)])
        self.assertEqual(self.hub.splices(), 0)
        self.assertEqual(self.hub.peers["p1"].ends, {})
        # Frames in flight for the closed channel are ignored.
        self.assertEqual(self.hub.frame("gw", frames.Data(5, b"x")), [])

    def test_reset_either_way(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        pc = self.splice(5)
        self.assertEqual(sent(self.hub.frame("p1", frames.Reset(pc, "refused"))), [frames.Reset(5, "refused")])
        pc = self.splice(6)
        self.assertEqual(sent(self.hub.frame("gw", frames.Reset(6, "client gone"))), [frames.Reset(pc, "client gone")])
        self.assertEqual(self.hub.splices(), 0)

    def test_datagrams(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(53, "udp")])
        (opened,) = sent(self.hub.frame("gw", open_frame(9, 53, "udp")), "p1")
        self.assertEqual(self.hub.frame("gw", frames.Datagram(9, b"early")), [])   # dropped, as UDP
        self.hub.frame("p1", frames.OpenOk(opened.channel))
        self.assertEqual(sent(self.hub.frame("gw", frames.Datagram(9, b""))), [frames.Datagram(opened.channel, b"")])
        self.assertEqual(sent(self.hub.frame("p1", frames.Datagram(opened.channel, b"a"))), [frames.Datagram(9, b"a")])

    def test_credit_is_enforced_both_ways(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        pc = self.splice(5)
        self.assertEqual(sent(self.hub.frame("gw", frames.Data(5, b"x" * WINDOW))), [frames.Data(pc, b"x" * WINDOW)])
        self.assertEqual(self.hub.frame("gw", frames.Data(5, b"y")), [Close("gw", "DATA beyond the granted credit on channel 5")])
        self.hub.frame("p1", frames.Window(pc, WINDOW))
        # An end may grow the window up to max_window (ReceiveWindow), not beyond.
        self.assertEqual(sent(self.hub.frame("p1", frames.Window(pc, WINDOW))), [frames.Window(5, WINDOW)])
        self.assertEqual(self.hub.frame("p1", frames.Window(pc, 1)), [Close("p1", f"WINDOW beyond the window on channel {pc}")])

    def test_data_or_fin_after_a_sides_fin_closes_its_link(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        pc = self.splice(5)
        sent(self.hub.frame("gw", frames.Fin(5)))
        # The other direction is still open, and credit still flows to the side that sent FIN.
        self.assertEqual(sent(self.hub.frame("p1", frames.Data(pc, b"down"))), [frames.Data(5, b"down")])
        self.assertEqual(sent(self.hub.frame("gw", frames.Window(5, 4))), [frames.Window(pc, 4)])
        self.assertEqual(self.hub.frame("gw", frames.Data(5, b"late")),
                         [Close("gw", "DATA on channel 5 after its FIN")])
        self.assertEqual(self.hub.frame("gw", frames.Fin(5)),
                         [Close("gw", "FIN on channel 5 after its FIN")])

    def test_credit_returned_allows_more(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        pc = self.splice(5)
        for _ in range(5):
            self.assertEqual(len(sent(self.hub.frame("gw", frames.Data(5, b"x" * WINDOW)))), 1)
            sent(self.hub.frame("p1", frames.Window(pc, WINDOW)))

    def test_no_provider_and_isolation(self):
        self.join("gw", G)
        self.join("p-other", P, router=1, routes=[route(2222)])
        self.assertEqual(sent(self.hub.frame("gw", open_frame(1))),
                         [frames.OpenFail(1, "no provider offers this gate")])
        self.assertEqual(self.hub.peers["gw"].ends, {})

    def test_failover_then_open_fail(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        self.join("p2", P, routes=[route(2222)])
        out = self.hub.frame("gw", open_frame(1))
        (first,) = [o for o in out]
        out = self.hub.frame(first.peer, frames.OpenFail(first.frame.channel, "connection refused"))
        (second,) = out
        self.assertNotEqual(second.peer, first.peer)
        self.assertEqual(second.frame, open_frame(second.frame.channel))
        out = self.hub.frame(second.peer, frames.OpenFail(second.frame.channel, "unknown service"))
        self.assertEqual(out, [Send("gw", frames.OpenFail(1, "unknown service"))])
        self.assertEqual(self.hub.splices(), 0)

    def test_round_robin(self):
        self.hub = HubCore(HubConfig(window=WINDOW))
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        self.join("p2", P, routes=[route(2222)])
        picked = [self.hub.frame("gw", open_frame(n))[0].peer for n in range(1, 5)]
        self.assertEqual(sorted(picked), ["p1", "p1", "p2", "p2"])
        self.assertNotEqual(picked[0], picked[1])

    def test_gateway_reset_while_opening(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        (opened,) = sent(self.hub.frame("gw", open_frame(1)))
        self.assertEqual(sent(self.hub.frame("gw", frames.Reset(1, "open timed out"))),
                         [frames.Reset(opened.channel, "open timed out")])
        self.assertEqual(self.hub.frame("p1", frames.OpenOk(opened.channel)), [])   # too late: ignored

    def test_provider_lost(self):
        """Open channels are reset; an OPEN waiting on it goes to the next provider."""
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        self.join("p2", P, routes=[route(2222)])
        first = self.hub.frame("gw", open_frame(1))[0]
        self.assertEqual(first.peer, "p1")
        self.hub.frame("p1", frames.OpenOk(first.frame.channel))
        self.assertEqual(self.hub.frame("gw", open_frame(2))[0].peer, "p2")
        waiting = self.hub.frame("gw", open_frame(3))[0]
        self.assertEqual(waiting.peer, "p1")
        out = self.hub.lost("p1")
        self.assertEqual(len(out), 2, out)
        self.assertIn(Send("gw", frames.Reset(1, "provider link lost")), out)
        (retry,) = [o for o in out if o.peer == "p2"]
        self.assertEqual(retry.frame, open_frame(retry.frame.channel))
        self.assertEqual(sent(self.hub.frame("p2", frames.OpenOk(retry.frame.channel))), [frames.OpenOk(3)])
        # Its routes are gone with it; p2 still offers the gate, so the table is unchanged.
        self.assertEqual(self.hub.routes_for(0), (route(2222),))
        # Channel 2 was still opening on p2 and no provider is left: OPEN_FAIL.
        self.assertEqual(sent(self.hub.lost("p2"), "gw"), [frames.OpenFail(2, "provider link lost"),
                                                          frames.Reset(3, "provider link lost"),
                                                          frames.Routes(())])

    def test_gateway_lost(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        pc = self.splice(5)
        (opening,) = sent(self.hub.frame("gw", open_frame(6)))
        out = self.hub.lost("gw")
        self.assertEqual(sorted(sent(out, "p1"), key=lambda f: f.channel),
                         [frames.Reset(pc, "gateway link lost"), frames.Reset(opening.channel, "gateway link lost")])
        self.assertEqual(self.hub.peers["p1"].ends, {})

    def test_bad_opens(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        self.assertEqual(sent(self.hub.frame("p1", open_frame(1))),
                         [frames.OpenFail(1, "a provider's OPEN is refused")])
        self.hub.frame("gw", open_frame(1))
        self.assertEqual(self.hub.frame("gw", open_frame(1)), [Close("gw", "OPEN for channel 1 already in use")])

    def test_data_before_open_ok_closes_the_link(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        self.hub.frame("gw", open_frame(1))
        self.assertEqual(self.hub.frame("gw", frames.Data(1, b"x")),
                         [Close("gw", "Data on channel 1 before OPEN_OK")])

    # -- bounds
    def test_summary_per_router(self):
        self.assertEqual(self.hub.summary(), {})
        self.join("gw", G)
        self.join("obs", O)
        self.join("p1", P, routes=[route(2222), route(53, "udp")])
        self.join("p2", P, routes=[route(2222)])
        self.join("other-gw", G, router=1)
        self.splice(5)                                   # to p1
        (opened,) = sent(self.hub.frame("gw", open_frame(6)), "p2")   # round robin: p2
        self.hub.frame("p2", frames.OpenOk(opened.channel))
        self.assertEqual(self.hub.summary(), {
            0: {"providers": 2, "gateways": 1, "observers": 1, "routes": 2, "channels": 2},
            1: {"providers": 0, "gateways": 1, "observers": 0, "routes": 0, "channels": 0},
        })
        self.hub.frame("gw", frames.Reset(6, "done"))
        self.hub.lost("p2")
        self.hub.lost("other-gw")
        self.assertEqual(self.hub.summary(), {
            0: {"providers": 1, "gateways": 1, "observers": 1, "routes": 2, "channels": 1},
        })
        self.hub.lost("p1")
        self.assertEqual(self.hub.summary()[0]["routes"], 0)
        self.assertEqual(self.hub.summary()[0]["channels"], 0)

    def test_max_peers(self):
        for n in range(10):
            self.join(f"p{n}", P)
        self.assertEqual(self.hub.admit("one-too-many", 0, G),
                         [Close("one-too-many", "the hub serves at most 10 peers")])
        self.assertNotIn("one-too-many", self.hub.peers)
        self.hub.lost("p0")
        self.assertEqual(sent(self.join("gw", G)), [frames.Routes(())])

    def test_max_peers_per_router(self):
        """One router's peers cannot take the whole hub: each router has its own cap too."""
        hub = HubCore(HubConfig(max_peers=10, max_peers_per_router=4))
        for n in range(4):
            self.assertEqual(hub.admit(f"a{n}", 0, P), [])
        self.assertEqual(hub.admit("a4", 0, G), [Close("a4", "the hub serves at most 4 peers per router")])
        self.assertNotIn("a4", hub.peers)
        for n in range(4):
            self.assertEqual(sent(hub.admit(f"b{n}", 1, G)), [frames.Routes(())])
        hub.lost("a0")
        self.assertEqual(hub.admit("a5", 0, P), [])

    def test_max_channels(self):
        self.join("gw", G)
        self.join("p1", P, routes=[route(2222)])
        for n in range(1, 4):
            self.assertIsInstance(sent(self.hub.frame("gw", open_frame(n)))[0], frames.Open)
        self.assertEqual(sent(self.hub.frame("gw", open_frame(4))), [frames.OpenFail(4, "overloaded")])
        # The provider's side is full as well: a second gateway's OPEN finds no room.
        self.join("gw2", G)
        self.assertEqual(sent(self.hub.frame("gw2", open_frame(1))), [frames.OpenFail(1, "overloaded")])


class HubOptionsTests(unittest.TestCase):

    SECRET = "ab" * 32

    def parse(self, args, env=None):
        options = server_tap.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": "s" * 40, **(env or {})}
        options.parseOptions(args)
        return options

    def test_off_by_default(self):
        options = self.parse([])
        self.assertEqual(options["mux"], [])

    def test_routers(self):
        options = self.parse(["--mux", "tcp:0", "--mux-router", self.SECRET, "--mux-router", "cd" * 32,
                              "--mux-router", self.SECRET.upper()])
        self.assertEqual(options["mux-secrets"], (bytes.fromhex(self.SECRET), bytes.fromhex("cd" * 32)))
        self.assertEqual(options["mux-window"], 262_144)
        self.assertEqual(options["mux-max-window"], 4_194_304)
        self.assertEqual(options["mux-max-peers"], 1000)

    def test_hub_admits_the_credit_of_ends_with_old_or_new_defaults(self):
        # An end grows a channel's window up to its --max-window; a hub closes a link that
        # grants more than its --mux-max-window.  Ends defaulted to 4 MiB before 2 MiB.
        options = self.parse(["--mux", "tcp:0", "--mux-router", self.SECRET])
        self.assertGreaterEqual(options["mux-max-window"], max(frames.MAX_WINDOW, 4_194_304))
        self.assertEqual(HubConfig().max_window, options["mux-max-window"])

    def test_hub_node_takes_the_relays_bounds(self):
        from pipegate.mux.hub import hub_node

        self.assertIsNone(hub_node(self.parse([])))
        hub = hub_node(self.parse(["--mux", "tcp:0", "--mux-router", self.SECRET, "--drain-timeout", "7",
                                   "--mux-max-peers", "9", "--mux-max-channels", "11"]))
        self.assertEqual((hub.core.config.drain_timeout, hub.core.config.max_peers,
                          hub.core.config.max_channels), (7.0, 9, 11))
        self.assertFalse(hub.running)

    def test_peers_per_router_default_shares_the_total(self):
        from pipegate.mux.hub import hub_node

        one = hub_node(self.parse(["--mux", "tcp:0", "--mux-router", self.SECRET, "--mux-max-peers", "90"]))
        self.assertEqual(one.core.config.max_peers_per_router, 90)
        three = hub_node(self.parse(["--mux", "tcp:0", "--mux-router", self.SECRET, "--mux-router", "cd" * 32,
                                     "--mux-router", "ef" * 32, "--mux-max-peers", "90"]))
        self.assertEqual(three.core.config.max_peers_per_router, 30)
        given = hub_node(self.parse(["--mux", "tcp:0", "--mux-router", self.SECRET, "--mux-router", "cd" * 32],
                                    {"PIPEGATE_MUX_MAX_PEERS_PER_ROUTER": "7"}))
        self.assertEqual(given.core.config.max_peers_per_router, 7)
        with self.assertRaises(usage.UsageError):
            self.parse(["--mux", "tcp:0", "--mux-router", self.SECRET, "--mux-max-peers-per-router", "0"])

    def test_environment(self):
        options = self.parse([], {"PIPEGATE_MUX": "tcp:0 tcp:1", "PIPEGATE_MUX_ROUTER": self.SECRET,
                                  "PIPEGATE_MUX_MAX_PEERS": "5"})
        self.assertEqual(options["mux"], ["tcp:0", "tcp:1"])
        self.assertEqual(options["mux-max-peers"], 5)
        options = self.parse(["--mux", "tcp:2"], {"PIPEGATE_MUX": "tcp:0", "PIPEGATE_MUX_ROUTER": self.SECRET})
        self.assertEqual(options["mux"], ["tcp:2"])

    def test_errors_name_the_option(self):
        cases = [
            (["--mux", "tcp:0"], "--mux-router: at least one router secret is required with --mux"),
            (["--mux-router", self.SECRET], "--mux-router: needs --mux"),
            (["--mux", "tcp:0", "--mux-router", "abc"], "--mux-router: router secret must be 64 hex"),
            (["--mux", "tcpp:0", "--mux-router", self.SECRET], "--mux: tcpp:0:"),
            (["--mux", "tcp:0", "--mux-router", self.SECRET, "--mux-max-peers", "0"], "--mux-max-peers: must be"),
            (["--mux", "tcp:0", "--mux-router", self.SECRET, "--mux-tls-key", "k.pem"],
             "--mux-tls-key and --mux-tls-cert go together"),
            (["--mux", "tcp:0", "--mux-router", self.SECRET, "--mux-max-frame-size", "1000"],
             "--mux-max-frame-size: must be at least"),
            (["--mux", "tcp:0", "--mux-router", self.SECRET, "--mux-ping-interval", "30"],
             "--mux-ping-deadline: must be longer"),
        ]
        for args, message in cases:
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(args)
            self.assertIn(message, str(caught.exception), args)
