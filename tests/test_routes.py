"""
pipegate.core.routes: the one provider chooser (round robin over the links serving a
route, failover to the next, draining links left out, give up when none is left).
"""

from __future__ import annotations

from twisted.trial import unittest

from pipegate.core.routes import RouteTable

GATE, OTHER = (2222, "tcp"), (5353, "udp")


class ThreeLinks(unittest.TestCase):
    """A table where links a, b and c (announced in that order) serve GATE."""

    def setUp(self) -> None:
        self.table: RouteTable = RouteTable()
        for link in "abc":
            self.table.announce(link, [GATE])


class RoundRobinTests(ThreeLinks):

    def test_each_choice_starts_one_further(self) -> None:
        self.assertEqual([self.table.pick(GATE) for _ in range(7)], list("abcabca"))

    def test_attempts_rotate_and_list_every_link_once(self) -> None:
        starts = []
        for _ in range(3):
            attempt = self.table.choose(GATE)
            order = []
            while (link := attempt.next()) is not None:
                order.append(link)
            starts.append("".join(order))
        self.assertEqual(starts, ["abc", "bca", "cab"])

    def test_routes_are_separate(self) -> None:
        self.table.announce("d", [OTHER])
        self.assertEqual(self.table.pick(OTHER), "d")
        self.assertEqual(self.table.pick(OTHER), "d")
        self.assertEqual(self.table.pick(GATE), "a")

    def test_a_route_nobody_serves(self) -> None:
        self.assertIsNone(self.table.pick(OTHER))
        self.assertIsNone(self.table.choose(OTHER).next())

    def test_reannouncing_replaces_and_keeps_the_order(self) -> None:
        self.table.announce("a", [OTHER])
        self.assertEqual(self.table.links(GATE), ["b", "c"])
        self.table.announce("a", [GATE, OTHER])
        self.assertEqual(self.table.links(GATE), ["a", "b", "c"])
        self.assertEqual(self.table.table(), {GATE: ["a", "b", "c"], OTHER: ["a"]})

    def test_links_kept_between_changes_follow_every_change(self) -> None:
        first = self.table.links(GATE)
        self.assertIs(self.table.links(GATE), first)   # asked again, nothing changed: the same list
        self.table.drain("b")
        self.assertEqual(self.table.links(GATE), ["a", "c"])
        self.table.remove("a")
        self.assertEqual(self.table.links(GATE), ["c"])
        self.table.announce("d", [GATE])
        self.assertEqual(self.table.links(GATE), ["c", "d"])
        self.assertEqual(first, ["a", "b", "c"])   # a list handed out earlier is not changed
        self.table.remove("c")
        self.table.remove("d")
        self.assertEqual(self.table.links(GATE), [])
        self.assertEqual(self.table.links(OTHER), [])
        self.assertEqual(self.table._links, {})   # nothing kept for a route no link serves


class FailoverTests(ThreeLinks):

    def test_next_after_a_refusal(self) -> None:
        attempt = self.table.choose(GATE)
        self.assertEqual([attempt.next(), attempt.next(), attempt.next()], ["a", "b", "c"])
        self.assertIsNone(attempt.next())   # none left: give up
        self.assertEqual(attempt.tried, 3)

    def test_a_link_lost_during_the_attempt_is_skipped(self) -> None:
        attempt = self.table.choose(GATE)
        self.assertEqual(attempt.next(), "a")
        self.table.remove("b")
        self.assertEqual(attempt.next(), "c")
        self.assertIsNone(attempt.next())

    def test_a_draining_link_is_skipped_and_left_out(self) -> None:
        attempt = self.table.choose(GATE)
        self.table.drain("b")
        self.assertEqual([attempt.next(), attempt.next(), attempt.next()], ["a", "c", None])
        self.assertTrue(self.table.draining("b"))
        self.assertEqual(self.table.links(GATE), ["a", "c"])
        self.assertEqual(self.table.table(), {GATE: ["a", "c"]})
        # drained for good: a later announcement does not bring it back
        self.table.announce("b", [GATE])
        self.assertEqual(self.table.links(GATE), ["a", "c"])
        self.table.remove("b")
        self.assertFalse(self.table.draining("b"))

    def test_a_withdrawn_route_is_skipped(self) -> None:
        attempt = self.table.choose(GATE)
        self.table.announce("b", [OTHER])
        self.assertEqual([attempt.next(), attempt.next(), attempt.next()], ["a", "c", None])

    def test_unusable_links_are_skipped(self) -> None:
        full = {"a", "c"}
        attempt = self.table.choose(GATE, lambda link: link not in full)
        self.assertEqual(attempt.next(), "b")
        self.assertIsNone(attempt.next())

    def test_every_link_draining_gives_up_at_once(self) -> None:
        for link in "abc":
            self.table.drain(link)
        self.assertIsNone(self.table.choose(GATE).next())
        self.assertIsNone(self.table.pick(GATE))

    def test_a_link_announced_after_the_choice_is_not_tried(self) -> None:
        attempt = self.table.choose(GATE)
        self.table.announce("d", [GATE])
        self.assertEqual([attempt.next() for _ in range(4)], ["a", "b", "c", None])

    def test_the_position_survives_links_coming_and_going(self) -> None:
        self.assertEqual(self.table.pick(GATE), "a")
        self.table.remove("a")
        # the second choice of the route: start one further over [b, c]
        self.assertEqual(self.table.pick(GATE), "c")
        self.table.forget(GATE)
        self.assertEqual(self.table.pick(GATE), "b")
