"""pipegate.core.pace.MinimumPace: the deadline a request body must keep."""

from __future__ import annotations

from twisted.trial import unittest

from pipegate.core.pace import MinimumPace, ReadingPace


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


class ReadingPaceTests(unittest.TestCase):
    """ReadingPace: push-back time allowed to a caller taking an answer."""

    def test_no_deadline_until_the_caller_pushes_back(self):
        pace = ReadingPace(rate=500, grace=20)
        self.assertIsNone(pace.deadline(0))
        pace.stall(100)
        self.assertEqual(pace.deadline(0), 120)
        self.assertEqual(pace.deadline(1000), 122)   # each 500 bytes taken buys a second

    def test_push_back_adds_up_over_stretches(self):
        pace = ReadingPace(rate=500, grace=20)
        pace.stall(0)
        pace.unstall(15)             # 15 s pushed back, then it takes again
        self.assertIsNone(pace.deadline(0))
        pace.stall(1000)             # (the 985 s between, waiting for the app, are not counted)
        self.assertEqual(pace.deadline(0), 1005)
        pace.stall(1001)             # (already pushing back: nothing changes)
        self.assertEqual(pace.deadline(0), 1005)

    def test_a_trickle_falls_behind_and_the_rate_does_not(self):
        slow, steady = ReadingPace(rate=500, grace=20), ReadingPace(rate=500, grace=20)
        slow.stall(0)
        steady.stall(0)
        now = 0.0
        while not now >= slow.deadline(int(now * 100)):   # takes 100 bytes/s, always pushing back
            now += 1
        self.assertEqual(now, 25)                         # 20 s + 2,500 bytes' worth (5 s)
        self.assertGreater(steady.deadline(int(1000 * 600)), 1000)   # 600 bytes/s: never behind
