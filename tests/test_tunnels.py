"""
The relay's tunnel registry (pipegate/http/tunnels.py) without sockets: connector logins
and ownership, the pick of a connector, when a tunnel is forgotten; time on a Clock.
"""

from __future__ import annotations

import time

from autobahn.websocket.types import ConnectionDeny
from twisted.internet.task import Clock
from twisted.trial import unittest

from pipegate import auth
from pipegate.http import visitors
from pipegate.http.ownership import Holder
from pipegate.http.revocation import Revocations
from pipegate.http.tunnels import Tunnels
from pipegate.stats import Stats

SETTINGS = auth.JWTSettings(secret="s" * 32)


class Link:
    """A connector link as the registry sees it."""

    def __init__(self, tunnel_id: str, jti: str | None = "jti-1", shared: bool = False) -> None:
        self.tunnel_id = tunnel_id
        self.holder = Holder(jti, shared, visitors.EMPTY)
        self.streams: dict = {}
        self.gone: list[str] = []

    def go_away(self, reason: str) -> None:
        self.gone.append(reason)


class Waiting:
    """A request waiting for a connector, as the registry sees it."""

    def __init__(self) -> None:
        self.request = None
        self.assigned: list = []

    def assign(self, link) -> None:
        self.assigned.append(link)


class Registry(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        # PyJWT checks a token's times against the wall clock too: start the Clock there.
        self.clock.advance(time.time())
        self.stats = Stats()
        self.tunnels = Tunnels(SETTINGS, per_caller=5, clock=self.clock, stats=self.stats)

    def login(self, path_id, connection_id="MyApp", **kw):
        return self.tunnels.authenticate_claims(path_id, auth.mint(SETTINGS, connection_id, self.clock.seconds(), **kw))

    def deny(self, path_id, token) -> int:
        with self.assertRaises(ConnectionDeny) as caught:
            self.tunnels.authenticate_claims(path_id, token)
        return caught.exception.code

    def test_a_login_names_its_tunnel_in_lower_case(self):
        claims = self.login("myAPP")
        self.assertEqual(claims.sub, "myapp")
        self.assertEqual(self.login(None).sub, "myapp")   # /?token=: the id comes from the token

    def test_refused_logins_and_their_counts(self):
        self.assertEqual(self.deny("myapp", None), 401)
        self.assertEqual(self.deny("myapp", "not.a.jwt"), 401)
        self.assertEqual(self.deny("other", auth.mint(SETTINGS, "myapp", self.clock.seconds())), 403)
        self.tunnels.set_revocations(Revocations(frozenset({"myapp"})))
        self.assertEqual(self.deny("myapp", auth.mint(SETTINGS, "myapp", self.clock.seconds())), 401)
        self.assertEqual({label: self.stats.get("admission_failures", label)
                          for label in ("no_token", "bad_token", "wrong_path", "revoked")},
                         {"no_token": 1, "bad_token": 1, "wrong_path": 1, "revoked": 1})

    def test_a_second_token_is_refused_unless_both_are_shared(self):
        self.tunnels.attach(Link("t1", jti="a"))
        self.tunnels.admit("t1", Holder("a", False, visitors.EMPTY))   # the same token: another connector
        with self.assertRaises(ConnectionDeny) as caught:
            self.tunnels.admit("t1", Holder("b", False, visitors.EMPTY))
        self.assertEqual(caught.exception.code, 409)
        self.tunnels.attach(Link("t2", jti="c", shared=True))
        self.tunnels.admit("t2", Holder("d", True, visitors.EMPTY))
        self.tunnels.admit("t3", Holder("e", False, visitors.EMPTY))    # nobody there yet

    def test_pick_goes_round_the_connectors(self):
        links = [Link("t1") for _ in range(3)]
        for link in links:
            self.tunnels.attach(link)
        tunnel = self.tunnels["t1"]
        self.assertEqual([tunnel.pick() for _ in range(7)], links + links + links[:1])
        self.tunnels.detach(links[1])
        self.assertEqual({tunnel.pick() for _ in range(4)}, {links[0], links[2]})

    def test_waiting_requests_go_to_the_first_connector_and_observers_hear_of_it(self):
        tunnel = self.tunnels.tunnel("t1")
        waiting = [Waiting(), Waiting()]
        tunnel.waiting.extend(waiting)
        heard = []
        self.tunnels.login_observers.append(heard.append)
        link = Link("t1")
        self.tunnels.attach(link)
        self.assertEqual([w.assigned for w in waiting], [[link], [link]])
        self.assertEqual((tunnel.waiting, heard), ([], ["t1"]))

    def test_a_tunnel_is_forgotten_once_idle(self):
        link = Link("t1")
        self.tunnels.attach(link)
        self.assertEqual(list(self.tunnels), ["t1"])
        self.tunnels["t1"].in_flight = 1
        self.tunnels.detach(link)
        self.assertIn("t1", self.tunnels)    # a request still in flight
        self.tunnels["t1"].in_flight = 0
        self.tunnels.forget_if_idle(self.tunnels["t1"])
        self.assertEqual(self.tunnels, {})
        self.assertEqual(len(self.tunnels), 0)

    def test_the_registry_is_read_only_from_outside(self):
        with self.assertRaises(TypeError):
            self.tunnels["t1"] = None

    def test_new_revocations_cut_the_connectors_of_revoked_tokens_and_leaving_ones(self):
        kept, revoked, leaving = Link("t1", jti="keep"), Link("t2", jti="bad"), Link("t3", jti="BAD")
        self.tunnels.attach(kept)
        self.tunnels.attach(revoked)
        self.tunnels.leaving.add(leaving)
        self.tunnels.set_revocations(Revocations(frozenset({"bad"})))
        self.assertEqual((kept.gone, revoked.gone, leaving.gone), ([], ["token revoked"], ["token revoked"]))
