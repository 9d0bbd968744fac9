"""
Unit tests for pipegate.core.window: the credit windows and the one flow-control object
every stream on both planes uses.
"""

from __future__ import annotations

import random

import attrs

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from pipegate.core.codec import FrameError
from pipegate.core import window
from pipegate.core.window import MAX_DATA, SLOW_SINK, Flow, GrowthBudget, ReceiveWindow, SendWindow

PROPERTY = settings(deadline=None, max_examples=200)


class SendWindowTests(unittest.TestCase):

    def test_initial_window(self):
        self.assertEqual(SendWindow().window, window.INITIAL_WINDOW)
        self.assertFalse(SendWindow().blocked)

    def test_splits_into_max_data_chunks(self):
        data = random.Random(1).randbytes(200_000)
        w = SendWindow()
        out = w.write(data)
        self.assertEqual([len(c) for c in out], [MAX_DATA, MAX_DATA, MAX_DATA, 200_000 - 3 * MAX_DATA])
        self.assertEqual(b"".join(out), data)
        self.assertEqual(w.window, window.INITIAL_WINDOW - 200_000)
        self.assertEqual(w.queued, 0)
        self.assertFalse(w.blocked)

    def test_never_exceeds_window_and_queues_rest(self):
        data = random.Random(2).randbytes(300_000)
        w = SendWindow()
        out = w.write(data)
        self.assertEqual(sum(map(len, out)), window.INITIAL_WINDOW)
        self.assertTrue(all(0 < len(c) <= MAX_DATA for c in out))
        self.assertEqual(w.window, 0)
        self.assertEqual(w.queued, 300_000 - window.INITIAL_WINDOW)
        self.assertTrue(w.blocked)
        # Nothing more goes out without credit.
        self.assertEqual(w.write(b"more"), [])
        self.assertEqual(w.queued, 300_000 - window.INITIAL_WINDOW + 4)

        more = w.credit(10_000)
        self.assertEqual([len(c) for c in more], [10_000])
        self.assertTrue(w.blocked)
        rest = w.credit(100_000)
        self.assertFalse(w.blocked)
        self.assertEqual(w.queued, 0)
        self.assertEqual(b"".join(out + more + rest), data + b"more")
        self.assertEqual(w.window, 10_000 + 100_000 - (300_000 + 4 - window.INITIAL_WINDOW))

    def test_zero_window(self):
        w = SendWindow(window=0)
        self.assertTrue(w.blocked)
        self.assertEqual(w.write(b"abc"), [])
        self.assertTrue(w.blocked)
        self.assertEqual(w.queued, 3)
        self.assertEqual(w.credit(1), [b"a"])
        self.assertTrue(w.blocked)
        self.assertEqual(w.credit(5), [b"bc"])
        self.assertFalse(w.blocked)
        self.assertEqual(w.window, 3)

    def test_blocked_when_window_used_up_exactly(self):
        w = SendWindow(window=3)
        self.assertEqual(w.write(b"abc"), [b"abc"])
        self.assertEqual(w.queued, 0)
        self.assertTrue(w.blocked)
        self.assertEqual(w.credit(1), [])
        self.assertFalse(w.blocked)

    def test_empty_write(self):
        w = SendWindow(window=0)
        self.assertEqual(w.write(b""), [])
        self.assertEqual(w.queued, 0)
        w = SendWindow()
        self.assertEqual(w.write(b""), [])
        self.assertFalse(w.blocked)

    def test_credit_drains_in_order(self):
        w = SendWindow(window=5)
        out = w.write(b"abc")
        out += w.write(b"defg")
        self.assertEqual(b"".join(out), b"abcde")
        self.assertEqual(w.write(b"hij"), [])
        self.assertEqual(w.write(b"k"), [])
        self.assertEqual(w.queued, 6)
        drained = w.credit(4)
        self.assertEqual(b"".join(drained), b"fghi")
        self.assertEqual(w.queued, 2)
        drained2 = w.credit(100)
        self.assertEqual(b"".join(drained2), b"jk")
        self.assertEqual(b"".join(out + drained + drained2), b"abcdefghijk")

    def test_credit_chunks_bounded_by_max_data(self):
        w = SendWindow(window=0)
        w.write(b"z" * (3 * MAX_DATA + 10))
        out = w.credit(10 * MAX_DATA)
        self.assertEqual([len(c) for c in out], [MAX_DATA, MAX_DATA, MAX_DATA, 10])


class ReceiveWindowTests(unittest.TestCase):

    def test_initial(self):
        r = ReceiveWindow()
        self.assertEqual(r.available, window.INITIAL_WINDOW)
        self.assertEqual(r.buffered, 0)

    def test_within_credit(self):
        r = ReceiveWindow()
        r.received(MAX_DATA)
        r.received(window.INITIAL_WINDOW - MAX_DATA)
        self.assertEqual(r.available, 0)
        self.assertEqual(r.buffered, window.INITIAL_WINDOW)

    def test_peer_exceeding_credit(self):
        r = ReceiveWindow()
        r.received(window.INITIAL_WINDOW)
        self.assertRaises(FrameError, r.received, 1)
        r = ReceiveWindow(available=10)
        self.assertRaises(FrameError, r.received, 11)

    def test_passed_on_is_received_then_consumed(self):
        # The same state as received + consumed, through growth, shrinks (credit withheld,
        # ungranted below 0) and grants; and the same refusal of a peer over its credit.
        rng = random.Random(5)
        budget_a, budget_b = GrowthBudget(1 << 20), GrowthBudget(1 << 20)
        a = ReceiveWindow(available=1000, max_window=8000, budget=budget_a)
        b = ReceiveWindow(available=1000, max_window=8000, budget=budget_b)
        for _ in range(3000):
            step = rng.random()
            if step < 0.6:
                n = rng.randint(1, 400)
                if n > a.available:
                    self.assertRaises(FrameError, a.received, n)
                    self.assertRaises(FrameError, b.passed_on, n)
                    continue
                a.received(n)
                a.consumed(n)
                b.passed_on(n)
            elif step < 0.9:
                at_least = rng.choice((0, 1, a.window // 2))
                self.assertEqual(a.grant(at_least), b.grant(at_least))
            else:
                a.shrink()
                b.shrink()
            self.assertEqual(attrs.asdict(a, recurse=False) | {"budget": None},
                             attrs.asdict(b, recurse=False) | {"budget": None})
            self.assertEqual(budget_a.used, budget_b.used)

    def test_credit_returns_only_when_granted(self):
        r = ReceiveWindow(available=100)
        r.received(100)
        self.assertRaises(FrameError, r.received, 1)
        r.consumed(40)
        self.assertEqual((r.available, r.buffered, r.ungranted), (0, 60, 40))
        self.assertRaises(FrameError, r.received, 1)  # handed on, but not granted back
        self.assertEqual(r.grant(), 40)
        self.assertEqual((r.available, r.ungranted), (40, 0))
        self.assertEqual(r.grant(), 0)
        r.received(40)
        self.assertRaises(FrameError, r.received, 1)
        r.consumed(100)
        self.assertEqual(r.grant(), 100)
        self.assertEqual((r.available, r.buffered), (100, 0))

    def test_grant_held_back_until_due(self):
        r = ReceiveWindow(available=100)
        r.received(100)
        r.consumed(49)
        self.assertEqual(r.grant(50), 0)
        self.assertEqual((r.available, r.ungranted), (0, 49))
        r.consumed(1)
        self.assertEqual(r.grant(50), 50)
        self.assertEqual((r.available, r.ungranted), (50, 0))
        r.consumed(10)
        self.assertEqual(r.grant(), 10)  # no threshold: everything due goes back


class GrowingWindowTests(unittest.TestCase):
    """ReceiveWindow with max_window: grows while the next hop keeps up, shrinks when it does not."""

    def cycle(self, r: ReceiveWindow, size: int) -> int:
        """The peer sends C{size}, it is all handed on; return the credit granted."""
        r.received(size)
        r.consumed(size)
        return r.grant()

    def test_fixed_without_max_window(self):
        r = ReceiveWindow(available=100)
        for _ in range(5):
            self.assertEqual(self.cycle(r, 100), 100)
        self.assertEqual((r.window, r.available), (100, 100))
        self.assertRaises(FrameError, r.received, 101)

    def test_doubles_after_each_whole_window_up_to_max(self):
        r = ReceiveWindow(available=100, max_window=400)
        self.assertEqual(self.cycle(r, 100), 200)   # 100 handed on + 100 more credit
        self.assertEqual((r.window, r.available), (200, 200))
        self.assertEqual(self.cycle(r, 200), 400)
        self.assertEqual(self.cycle(r, 400), 400)   # at max_window: no more growth
        self.assertEqual((r.window, r.available), (400, 400))
        self.assertRaises(FrameError, r.received, 401)

    def test_max_window_not_a_multiple(self):
        r = ReceiveWindow(available=100, max_window=250)
        self.cycle(r, 100)
        self.cycle(r, 200)
        self.assertEqual((r.window, r.available), (250, 250))

    def test_less_than_a_window_does_not_grow(self):
        r = ReceiveWindow(available=100, max_window=400)
        self.assertEqual(self.cycle(r, 99), 99)
        self.assertEqual(r.window, 100)
        self.assertEqual(self.cycle(r, 1), 101)     # the run reached one window
        self.assertEqual(r.window, 200)

    def test_shrink_withholds_credit_until_back_to_initial(self):
        r = ReceiveWindow(available=100, max_window=400)
        self.cycle(r, 100)
        self.cycle(r, 200)
        r.received(400)                             # the peer used all 400
        r.shrink()
        self.assertEqual(r.window, 100)
        r.consumed(300)
        self.assertEqual(r.grant(), 0)              # 300 handed on: all withheld
        r.consumed(50)
        self.assertEqual(r.grant(), 50)             # paying back the withheld credit is no growth
        self.assertEqual((r.window, r.available), (100, 50))
        self.assertRaises(FrameError, r.received, 51)
        r.consumed(50)
        self.assertEqual(r.grant(), 150)            # a whole window since the debt: it grows again
        self.assertEqual((r.window, r.available), (200, 200))

    def test_shrink_while_credit_outstanding(self):
        r = ReceiveWindow(available=100, max_window=400)
        self.cycle(r, 100)
        self.cycle(r, 200)                          # the peer holds 400
        r.received(50)
        r.shrink()
        r.consumed(50)
        self.assertEqual(r.grant(), 0)              # the peer still holds 350 > 100
        r.received(350)
        r.consumed(300)
        self.assertEqual(r.grant(), 50)
        self.assertEqual(r.available, 50)
        r.consumed(50)
        self.assertEqual(r.grant(), 150)
        self.assertEqual((r.window, r.available), (200, 200))

    def test_shrink_restarts_the_run(self):
        r = ReceiveWindow(available=100, max_window=400)
        r.received(100)
        r.consumed(90)
        r.shrink()
        r.consumed(10)
        self.assertEqual(r.grant(), 100)
        self.assertEqual(r.window, 100)             # 90 of the run came before the shrink

    def test_budget_shared_by_windows(self):
        budget = GrowthBudget(150)
        a = ReceiveWindow(available=100, max_window=400, budget=budget)
        b = ReceiveWindow(available=100, max_window=400, budget=budget)
        self.assertEqual(self.cycle(a, 100), 200)   # a takes 100 of the 150
        self.assertEqual(self.cycle(b, 100), 150)   # b gets the 50 left
        self.assertEqual((a.window, b.window, budget.used), (200, 150, 150))
        self.assertEqual(self.cycle(a, 200), 200)   # nothing left: a stays at 200
        a.shrink()                                  # a's 100 go back ...
        self.assertEqual(budget.used, 50)
        self.assertEqual(self.cycle(b, 150), 250)   # ... and b can take them
        self.assertEqual((b.window, budget.used), (250, 150))
        b.release()                                 # b's stream is done
        self.assertEqual(budget.used, 0)
        self.assertEqual(self.cycle(b, 250), 250)   # and b grows no more
        self.assertEqual(budget.used, 0)

    @given(st.lists(st.tuples(st.sampled_from(["send", "consume", "grant", "shrink"]),
                              st.integers(min_value=0, max_value=1000)), max_size=200))
    def test_invariants(self, ops):
        budget = GrowthBudget(500)
        r = ReceiveWindow(available=100, max_window=800, budget=budget)
        for op, n in ops:
            if op == "send":
                size = min(n, r.available)
                r.received(size)
            elif op == "consume":
                r.consumed(min(n, r.buffered))
            elif op == "grant":
                self.assertGreaterEqual(r.grant(n % 300), 0)
            else:
                r.shrink()
            self.assertEqual(r.available + r.buffered + r.ungranted, r.window)
            self.assertEqual(budget.used, r.window - 100)
            self.assertLessEqual(r.window, 800)
            self.assertLessEqual(r.available, 800)
            self.assertGreaterEqual(min(r.available, r.buffered), 0)


class FlowTests(unittest.TestCase):
    """The decisions every stream makes the same way: when credit goes back, when a window shrinks."""

    def test_credit_returns_at_half_the_window(self):
        flow = Flow.of(window=100)
        self.assertEqual(flow.arrived(49), 0)
        self.assertEqual(flow.arrived(1), 50)
        self.assertEqual(flow.arrived(50), 50)

    def test_overrun_is_a_frame_error(self):
        flow = Flow.of(window=100)
        self.assertRaises(FrameError, flow.arrived, 101)

    def test_no_credit_while_the_sink_is_full(self):
        flow = Flow.of(window=100)
        flow.sink_paused(now=10.0)
        self.assertEqual(flow.arrived(80), 0)
        self.assertEqual(flow.sink_resumed(now=10.0 + SLOW_SINK / 2), 80)
        self.assertFalse(flow.sink_full)

    def test_a_slow_sink_shrinks_a_grown_window(self):
        budget = GrowthBudget(1000)
        flow = Flow.of(window=100, max_window=400, budget=budget)
        for _ in range(2):  # a whole window handed on, twice: grows to 200
            flow.arrived(50)
            flow.arrived(50)
        self.assertEqual(flow.recv.window, 200)
        self.assertEqual(budget.used, 100)
        flow.sink_paused(now=0.0)
        flow.sink_paused(now=5.0)  # (a second pause does not move the start)
        flow.sink_resumed(now=SLOW_SINK)
        self.assertEqual(flow.recv.window, 100)
        self.assertEqual(budget.used, 0)

    def test_a_brief_pause_keeps_the_grown_window(self):
        flow = Flow.of(window=100, max_window=400)
        for _ in range(2):
            flow.arrived(50)
            flow.arrived(50)
        flow.sink_paused(now=0.0)
        flow.sink_resumed(now=SLOW_SINK / 2)
        self.assertEqual(flow.recv.window, 200)

    def test_held_bytes_earn_credit_when_handed_on(self):
        flow = Flow.of(window=100)
        flow.held(60)
        self.assertEqual(flow.recv.buffered, 60)
        self.assertEqual(flow.handed_on(60), 60)
        self.assertEqual(flow.recv.buffered, 0)

    def test_outgoing_blocks_at_zero_credit_and_resumes_on_credit(self):
        flow = Flow.of(window=10)
        self.assertEqual(flow.write(b"x" * 15), [b"x" * 10])
        self.assertTrue(flow.blocked)
        self.assertEqual([bytes(c) for c in flow.credited(6)], [b"x" * 5])
        self.assertFalse(flow.blocked)

    def test_release_returns_growth(self):
        budget = GrowthBudget(1000)
        flow = Flow.of(window=100, max_window=400, budget=budget)
        flow.arrived(50)
        flow.arrived(50)
        flow.arrived(50)
        self.assertEqual(budget.used, 100)
        flow.release()
        self.assertEqual(budget.used, 0)


class FlowArrivedTests(unittest.TestCase):

    def test_arrived_is_passed_on_then_grant(self):
        # Flow.arrived (one call per DATA frame) against what it stands for: recv.passed_on, then
        # recv.grant(max(1, window // 2)) unless the sink is full; the same credit, state and
        # refusals, through growth (with and without a budget running out), shrinks, explicit
        # grants and tiny windows.
        for seed in range(40):
            rng = random.Random(seed)
            initial = rng.choice((1, 2, 3, 100, 1000))
            max_window = rng.choice((0, initial, 4 * initial, 8 * initial + 3))
            limit = rng.choice((0, initial, 1 << 20))
            budgets = [GrowthBudget(limit), GrowthBudget(limit)]
            a, b = (ReceiveWindow(available=initial, max_window=max_window, budget=budget) for budget in budgets)
            flow = Flow(SendWindow(), b)
            for _ in range(400):
                step = rng.random()
                if step < 0.75:
                    n = rng.randint(0, max(1, a.available + 1))
                    flow.sink_full = rng.random() < 0.2
                    if n > a.available:
                        self.assertRaises(FrameError, a.passed_on, n)
                        self.assertRaises(FrameError, flow.arrived, n)
                    else:
                        a.passed_on(n)
                        expected = 0 if flow.sink_full else a.grant(max(1, a.window // 2))
                        self.assertEqual(flow.arrived(n), expected)
                elif step < 0.9:
                    at_least = rng.choice((0, 1, a.window // 2))
                    self.assertEqual(a.grant(at_least), b.grant(at_least))
                elif step < 0.97:
                    a.shrink()
                    b.shrink()
                else:
                    a.release()
                    b.release()
                self.assertEqual(attrs.asdict(a, recurse=False) | {"budget": None},
                                 attrs.asdict(b, recurse=False) | {"budget": None})
                self.assertEqual(budgets[0].used, budgets[1].used)


class PropertyTests(unittest.TestCase):

    @PROPERTY
    @given(
        st.integers(0, 3 * MAX_DATA),
        st.lists(st.one_of(
            st.tuples(st.just("write"), st.integers(0, 3 * MAX_DATA), st.integers(0, 2**16)),
            st.tuples(st.just("credit"), st.integers(0, 2 * MAX_DATA), st.just(0)),
        ), max_size=25),
    )
    def test_send_window(self, initial, ops):
        w = SendWindow(window=initial)
        written = bytearray()
        sent = bytearray()
        credit = initial
        for op, n, seed in ops:
            if op == "write":
                chunk = random.Random(seed).randbytes(n)
                written += chunk
                out = w.write(chunk)
            else:
                credit += n
                out = w.credit(n)
            for piece in out:
                self.assertTrue(0 < len(piece) <= MAX_DATA)
                self.assertEqual(piece, written[len(sent):len(sent) + len(piece)])
                sent += piece
            # never more than credited, and as much as credit and data allow
            self.assertLessEqual(len(sent), credit)
            self.assertEqual(len(sent), min(credit, len(written)))
            self.assertEqual(w.queued, len(written) - len(sent))
            self.assertEqual(w.window, credit - len(sent))
            self.assertEqual(w.blocked, w.queued > 0 or w.window == 0)
        rest = w.credit(len(written))
        self.assertEqual(bytes(sent) + b"".join(rest), bytes(written))
        self.assertEqual(w.queued, 0)
