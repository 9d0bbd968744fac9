"""Unit tests for pipegate.core.budget and pipegate.fdlimit (no sockets, no reactor)."""

import resource

from twisted.trial import unittest

from pipegate.core.budget import PER_SOURCE, TOTAL, Budget, LogThrottle, SourceRate
from pipegate.fdlimit import FdBudget, default_caps, raise_nofile


class BudgetTests(unittest.TestCase):
    def test_per_source_cap_refuses_only_that_source(self):
        budget = Budget(per_source=2, total=10)
        self.assertIsNone(budget.acquire("a"))
        self.assertIsNone(budget.acquire("a"))
        self.assertEqual(budget.acquire("a"), PER_SOURCE)
        self.assertIsNone(budget.acquire("b"))
        self.assertEqual((budget.held("a"), budget.held("b"), budget.held()), (2, 1, 3))
        self.assertEqual(budget.refused, {PER_SOURCE: 1, TOTAL: 0})

    def test_total_cap_refuses_everyone_until_a_release(self):
        budget = Budget(per_source=5, total=3)
        for source in "abc":
            self.assertIsNone(budget.acquire(source))
        self.assertEqual(budget.acquire("d"), TOTAL)
        budget.release("b")
        self.assertIsNone(budget.acquire("d"))
        self.assertEqual(budget.refused[TOTAL], 1)
        self.assertEqual(budget.sources(), 3)

    def test_a_source_at_its_cap_is_refused_per_source_even_when_the_total_is_full(self):
        """
        TOTAL means "this source may hold one more once there is room": a caller that makes
        room on TOTAL (the gateway's UDP table evicts an idle flow) must never hear it for a
        source that is at its own cap.
        """
        budget = Budget(per_source=2, total=4)
        for source in "aabb":
            self.assertIsNone(budget.acquire(source))
        self.assertEqual(budget.acquire("a"), PER_SOURCE)
        self.assertEqual(budget.acquire("c"), TOTAL)
        self.assertEqual(budget.refused, {PER_SOURCE: 1, TOTAL: 1})

    def test_release_gives_back_and_forgets_empty_sources(self):
        budget = Budget(per_source=1, total=0)
        self.assertIsNone(budget.acquire("a"))
        budget.release("a")
        self.assertEqual((budget.held(), budget.sources()), (0, 0))
        self.assertIsNone(budget.acquire("a"))

    def test_unmatched_release_is_ignored(self):
        budget = Budget(per_source=1, total=1)
        budget.release("never")
        self.assertEqual(budget.held(), 0)
        self.assertIsNone(budget.acquire("a"))
        self.assertEqual(budget.acquire("b"), TOTAL)

    def test_zero_means_no_cap(self):
        budget = Budget(per_source=0, total=0)
        for _ in range(1000):
            self.assertIsNone(budget.acquire("a"))
        self.assertEqual(budget.held("a"), 1000)

    def test_exempt_sources_skip_the_per_source_cap_not_the_total(self):
        budget = Budget(per_source=1, total=3, exempt=frozenset({"proxy"}))
        for _ in range(3):
            self.assertIsNone(budget.acquire("proxy"))
        self.assertEqual(budget.acquire("proxy"), TOTAL)


class SourceRateTests(unittest.TestCase):
    def test_a_burst_then_the_rate(self):
        rate = SourceRate(rate=2, burst=3)
        self.assertEqual([rate.allow("a", 0) for _ in range(4)], [True, True, True, False])
        self.assertTrue(rate.allow("b", 0))               # each source its own bucket
        self.assertFalse(rate.allow("a", 0.4))            # 0.8 of a token
        self.assertTrue(rate.allow("a", 0.5))             # (refused tries cost nothing)
        self.assertFalse(rate.allow("a", 0.5))
        self.assertEqual([rate.allow("a", 100) for _ in range(4)], [True, True, True, False])   # burst again

    def test_sources_kept_are_bounded_the_least_recent_forgotten(self):
        rate = SourceRate(rate=1, burst=1, max_sources=3)
        for source in "abc":
            self.assertTrue(rate.allow(source, 0))
        self.assertFalse(rate.allow("a", 0))              # a: used again, so the most recent
        self.assertTrue(rate.allow("d", 0))               # b, the least recent, goes
        self.assertEqual(len(rate), 3)
        self.assertTrue(rate.allow("b", 0))               # forgotten: a full burst again
        self.assertFalse(rate.allow("a", 0))              # a was kept


class LogThrottleTests(unittest.TestCase):
    def test_one_line_per_interval_with_the_count_held_back(self):
        throttle = LogThrottle(interval=10)
        self.assertEqual(throttle.allow(0.0), 0)
        self.assertIsNone(throttle.allow(1.0))
        self.assertIsNone(throttle.allow(9.9))
        self.assertEqual(throttle.allow(10.0), 2)
        self.assertIsNone(throttle.allow(15.0))
        self.assertEqual(throttle.allow(30.0), 1)


class FdLimitTests(unittest.TestCase):
    def test_raises_the_soft_limit_to_the_hard_limit(self):
        calls = []
        budget = raise_nofile(lambda which: (1024, 4096), lambda which, limits: calls.append(limits))
        self.assertEqual(calls, [(4096, 4096)])
        self.assertEqual(budget, FdBudget(before=1024, soft=4096, hard=4096))
        self.assertTrue(budget.raised)
        self.assertEqual(budget.usable(64), 4032)

    def test_an_infinite_hard_limit_is_capped(self):
        calls = []
        budget = raise_nofile(lambda which: (1024, resource.RLIM_INFINITY),
                              lambda which, limits: calls.append(limits))
        self.assertEqual(budget.soft, 1_048_576)
        self.assertEqual(calls, [(1_048_576, resource.RLIM_INFINITY)])

    def test_a_refused_raise_keeps_the_old_limit(self):
        def refuse(which, limits):
            raise ValueError("not allowed")
        budget = raise_nofile(lambda which: (1024, 4096), refuse)
        self.assertEqual((budget.soft, budget.raised), (1024, False))

    def test_already_at_the_hard_limit_is_left_alone(self):
        calls = []
        budget = raise_nofile(lambda which: (4096, 4096), lambda which, limits: calls.append(limits))
        self.assertEqual(calls, [])
        self.assertFalse(budget.raised)

    def test_the_real_process_limit_is_not_lowered(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertGreaterEqual(raise_nofile().soft, soft)

    def test_default_caps(self):
        self.assertEqual(default_caps(960), (240, 960))          # 1,024 soft limit less the reserve
        self.assertEqual(default_caps(65_472), (256, 65_472))    # per source never above 256
        self.assertEqual(default_caps(1000, per_unit=2), (125, 500))
        self.assertEqual(default_caps(0), (1, 1))
