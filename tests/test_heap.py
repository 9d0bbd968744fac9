"""Tests for L{pipegate.heap}: the startup heap is frozen once the reactor runs, in every service."""

from __future__ import annotations

import ctypes
import gc
import platform
import sys
import time

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from pipegate import auth
from pipegate.heap import FrozenStartupHeap, release_free_memory
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


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


class ReleaseFreeMemoryTests(unittest.TestCase):

    def test_free_heap_pages_below_live_memory_go_back(self):
        if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
            raise unittest.SkipTest("malloc_trim is glibc's; elsewhere release_free_memory is a no-op")
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        size, count = 64 * 1024, 512   # 32 MiB in chunks glibc takes from its heap (below the mmap threshold)
        chunks = [libc.malloc(size) for _ in range(count)]
        for chunk in chunks:
            ctypes.memset(chunk, 1, size)   # resident
        pin = libc.malloc(size)   # in use above the freed ones: free() alone cannot shrink the heap past it
        try:
            for chunk in chunks:
                libc.free(chunk)
            before = _rss_kib()
            self.assertTrue(release_free_memory())
            self.assertGreater(before - _rss_kib(), 16 * 1024)
        finally:
            libc.free(pin)

    def test_freeze_releases_the_free_pages(self):
        self.addCleanup(gc.unfreeze)
        calls = []
        self.patch(sys.modules["pipegate.heap"], "release_free_memory", lambda: calls.append(1))
        reactor = MemoryReactorClock()
        FrozenStartupHeap(reactor).startService()
        self.assertEqual(calls, [])
        reactor.run()
        self.assertEqual(calls, [1])
