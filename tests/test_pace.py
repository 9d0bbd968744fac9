"""pipegate.core.pace.MinimumPace: the deadline a request body must keep."""

from __future__ import annotations

from twisted.trial import unittest

from pipegate.core.pace import MinimumPace


class MinimumPaceTests(unittest.TestCase):
    def test_grace_then_one_second_per_rate_bytes(self):
        pace = MinimumPace(rate=500, grace=20, now=100)
        self.assertEqual(pace.deadline(), 120)
        self.assertFalse(pace.too_slow(119.9))
        self.assertTrue(pace.too_slow(120))
        pace.received(1000)
        self.assertEqual(pace.deadline(), 122)
        self.assertFalse(pace.too_slow(121))

    def test_no_deadline_while_paused_and_a_new_grace_after(self):
        pace = MinimumPace(rate=500, grace=20, now=0)
        pace.received(100)
        pace.pause()
        self.assertIsNone(pace.deadline())
        self.assertFalse(pace.too_slow(1000))
        pace.resume(1000)
        self.assertEqual(pace.deadline(), 1020)   # bytes before the pause no longer count
        pace.resume(1010)                        # (not paused: nothing changes)
        self.assertEqual(pace.deadline(), 1020)

    def test_a_trickle_falls_behind(self):
        pace = MinimumPace(rate=500, grace=20, now=0)
        now = 0.0
        while not pace.too_slow(now):            # one byte every 5 s
            pace.received(1)
            now += 5
        self.assertEqual(now, 25)                # the deadline: 20 s of grace + 5 bytes' worth (0.01 s)
