"""Tests for L{pipegate.heap}: the startup heap is frozen once the reactor runs, in every service."""

from __future__ import annotations

import gc
import time

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from pipegate import auth
from pipegate.heap import FrozenStartupHeap
from pipegate.tap import client, gateway, provider, server

SECRET = "heap-test-secret-" + "0123456789abcdef" * 3
ROUTER = "ab" * 32


class FrozenStartupHeapTests(unittest.TestCase):

    def setUp(self):
        # Start and end each test with nothing frozen, whatever ran before.
        gc.unfreeze()
        self.addCleanup(gc.unfreeze)

    def test_freezes_once_the_reactor_runs(self):
        reactor = MemoryReactorClock()
        heap = FrozenStartupHeap(reactor)
        heap.startService()
        # Not at startService: the services started after it still build their state.
        self.assertEqual(gc.get_freeze_count(), 0)
        reactor.run()
        self.assertGreater(gc.get_freeze_count(), 0)
        heap.stopService()
        self.assertEqual(gc.get_freeze_count(), 0)

    def test_frozen_objects_leave_the_collected_generations(self):
        reactor = MemoryReactorClock()
        heap = FrozenStartupHeap(reactor)
        before = [["startup state"]]
        heap.startService()
        reactor.run()
        after = [["made while serving"]]

        def collected(thing) -> bool:
            return any(o is thing for o in gc.get_objects())

        self.assertFalse(collected(before))
        self.assertTrue(collected(after))
        heap.stopService()
        self.assertTrue(collected(before))

    def test_every_service_freezes_its_heap(self):
        settings = auth.JWTSettings.from_values(SECRET)
        parsed = []
        options = server.Options()
        options.environ = {"PIPEGATE_JWT_SECRET": SECRET}
        options.parseOptions([])
        parsed.append((server, options))
        options = client.Options()
        options.environ = {}
        options.parseOptions(["--token", auth.mint(settings, "abc", time.time()),
                              "http://127.0.0.1:3000", "ws://127.0.0.1:8080/abc"])
        parsed.append((client, options))
        for tap in (gateway, provider):
            options = tap.Options()
            options.environ = {}
            options.parseOptions(["--router", ROUTER, "--connect", "tcp:127.0.0.1:7000"])
            parsed.append((tap, options))
        for tap, options in parsed:
            top = tap.makeService(options, MemoryReactorClock())
            self.assertEqual([type(s) for s in top if isinstance(s, FrozenStartupHeap)],
                             [FrozenStartupHeap], tap.__name__)
