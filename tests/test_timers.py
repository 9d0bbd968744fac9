"""
Unit tests for pipegate.timers: cancel() and the idle timer that is not re-armed per
message (used by mux channels, UDP flows, passthrough pipes and the relay's connections and streams).
"""

from __future__ import annotations

import weakref

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from pipegate.timers import IdleTimer, _schedule_of, cancel
from tests.support import collector_off


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

    def test_a_cancelled_timer_does_not_keep_its_owner(self):
        # Its heap entry outlives the cancel; the owner whose method is the callback must not.
        class Owner:
            def expired(self):
                raise AssertionError("a cancelled timer fired")

        owner = Owner()
        gone = weakref.ref(owner)
        timer = IdleTimer(self.clock, 10, owner.expired)
        timer.cancel()
        del owner
        with collector_off():
            self.assertIsNone(gone())
        self.clock.advance(20)

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


class IdleScheduleTests(unittest.TestCase):
    """All the idle timers of a clock on one pending call, each firing at its own time."""

    def setUp(self):
        self.clock = Clock()
        self.fired = []

    def timer(self, name, seconds):
        return IdleTimer(self.clock, seconds, lambda: self.fired.append((name, self.clock.seconds())))

    def test_one_pending_call_for_many_timers_each_at_its_time(self):
        timers = [self.timer(n, n) for n in (5, 3, 8, 3)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1)
        timers[2].touch()   # due at 9 now
        for _ in range(10):
            self.clock.advance(1)
        self.assertEqual(self.fired, [(3, 3), (3, 3), (5, 5), (8, 9)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelling_every_timer_leaves_nothing_scheduled(self):
        timers = [self.timer(n, 10 + n) for n in range(100)]
        for timer in timers[:70]:
            timer.cancel()
        for timer in timers[70:]:
            cancel(timer)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(200)
        self.assertEqual(self.fired, [])

    def test_a_callback_may_cancel_or_start_timers(self):
        # The first one due at 5 cancels the other one due at 5 (made after it, so behind it).
        later = []
        IdleTimer(self.clock, 5, lambda: (later[0].cancel(), self.timer("new", 2)))
        later.append(self.timer("later", 5))
        self.clock.advance(5)
        self.clock.advance(2)
        self.assertEqual(self.fired, [("new", 7)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failing_callback_is_logged_and_the_others_still_fire(self):
        IdleTimer(self.clock, 4, lambda: 1 / 0)
        self.timer("after", 4)
        self.clock.advance(4)
        self.assertEqual(self.fired, [("after", 4)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_the_shared_call_cancelled_from_outside_is_made_again(self):
        # Trial cancels the calls a test left pending; the schedule outlives the test (one
        # per clock), and the next timer must still fire, the older ones too.
        older = self.timer("older", 3)
        [call] = self.clock.getDelayedCalls()
        call.cancel()
        self.timer("next", 5)
        self.clock.advance(3)
        self.clock.advance(2)
        self.assertEqual(self.fired, [("older", 3), ("next", 5)])
        self.assertFalse(older.active())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelled_entries_do_not_pile_up(self):
        keep = self.timer("keep", 1000)
        for _ in range(1000):
            self.timer("gone", 500).cancel()
        self.assertLess(len(_schedule_of(self.clock).heap), 200)
        self.clock.advance(1000)
        self.assertEqual(self.fired, [("keep", 1000)])
        self.assertFalse(keep.active())
