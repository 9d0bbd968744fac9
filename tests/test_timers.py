"""
Unit tests for pipegate.timers: cancel() and the idle timer that is not re-armed per
message (used by mux channels, UDP flows and passthrough pipes).
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from pipegate.timers import IdleTimer, cancel


class CancelTests(unittest.TestCase):

    def test_pending_fired_and_none(self):
        clock = Clock()
        fired = []
        call = clock.callLater(1, fired.append, 1)
        self.assertIsNone(cancel(call))
        self.assertFalse(call.active())
        self.assertIsNone(cancel(call))            # cancelled already: nothing raised
        done = clock.callLater(1, fired.append, 2)
        clock.advance(1)
        self.assertIsNone(cancel(done))            # fired already: nothing raised
        self.assertIsNone(cancel(None))
        self.assertEqual(fired, [2])

    def test_a_waiting_deferred_is_cancelled_a_fired_one_left_alone(self):
        waiting = Deferred()
        self.assertIsNone(cancel(waiting))
        self.failureResultOf(waiting, CancelledError)
        self.assertIsNone(cancel(waiting))         # cancelled already: nothing raised
        fired = succeed("result")
        self.assertIsNone(cancel(fired))
        self.assertEqual(self.successResultOf(fired), "result")


class IdleTimerTests(unittest.TestCase):

    def setUp(self):
        self.clock = Clock()
        self.idle = []
        self.timer = IdleTimer(self.clock, 10, lambda: self.idle.append(self.clock.seconds()))

    def test_fires_after_the_timeout_without_touches(self):
        self.clock.advance(9.9)
        self.assertEqual(self.idle, [])
        self.clock.advance(0.1)
        self.assertEqual(self.idle, [10])
        self.assertFalse(self.timer.active())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_touch_moves_the_deadline_without_re_arming(self):
        self.clock.advance(4)
        self.timer.touch()
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [10])   # not reset
        self.clock.advance(6)
        self.assertEqual(self.idle, [])                                               # came early
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [14])   # what is left
        self.clock.advance(4)
        self.assertEqual(self.idle, [14])

    def test_cancel_leaves_nothing_scheduled(self):
        self.timer.touch()
        self.assertTrue(self.timer.active())
        cancel(self.timer)
        self.assertFalse(self.timer.active())
        self.clock.advance(100)
        self.assertEqual((self.idle, self.clock.getDelayedCalls()), ([], []))

    def test_zero_never_fires_but_keeps_the_time(self):
        timer = IdleTimer(self.clock, 0, lambda: self.fail("fired"))
        self.clock.advance(3)
        timer.touch()
        self.assertEqual((timer.last, timer.active()), (3, False))
        self.timer.cancel()
