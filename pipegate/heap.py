"""
Keep the garbage collector's full passes short in long-running services.

A service's heap is mostly what it imported and built at startup (Twisted, autobahn,
pyOpenSSL, its configuration): a hundred thousand objects that live as long as the
process.  CPython's oldest generation is collected again and again over all of them,
each pass pausing the reactor for milliseconds, which showed as the tail of the
request latency (p99 38-43 ms at p90 22 ms through relay + connector; git log -p benchmarks/README.md).
L{FrozenStartupHeap} moves what exists once the reactor runs into the permanent
generation (C{gc.freeze}), so later passes look only at objects made since.  Cycles
among the frozen objects are never collected; they are startup state, meant to stay.

Importing leaves holes in the C heap (the compiled modules read, the parse trees and
generated source of startup), which the C library keeps resident because they lie below
memory in use.  Once the startup garbage is collected, L{release_free_memory} hands those
pages back (glibc's C{malloc_trim}): about 0.6-0.9 MiB of idle RSS per service (issue 22).
"""

from __future__ import annotations

import gc

from twisted.application import service


class FrozenStartupHeap(service.Service):
    """Collect once, then freeze the heap, when the reactor starts running."""

    name = "frozen-startup-heap"

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(freeze)

    def stopService(self):
        gc.unfreeze()
        return super().stopService()


def freeze() -> None:
    gc.collect()
    gc.freeze()
    release_free_memory()


def release_free_memory() -> bool:
    """
    Return the C heap's free pages to the OS with glibc's C{malloc_trim(0)} (documented in
    malloc_trim(3); it walks the free lists once, about a millisecond here).  False where the
    C library has no such call (musl, macOS), where this does nothing.
    """
    import ctypes   # (already loaded by Twisted's imports in every service)

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
