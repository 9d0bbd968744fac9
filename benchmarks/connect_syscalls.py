"""
System calls per tunnelled connection in gateway and provider (issue 22, target 4):

    python -m benchmarks.connect_syscalls [TREE] [N]

Starts the echo backend, and the gateway and provider of TREE (default: this checkout; a
copy made with `git archive REV | tar -x -C DIR`), makes 50 connections to warm up, attaches
`strace -c -f` to both services, makes N (default 1000) connect + 1-byte echo + close through
the gate, and prints each service's system calls per connection, in all and by call.  Needs
strace (and ptrace permission).  Exact up to how events batch into reactor turns (the
`epoll_wait`s and the reads they find).
"""

from __future__ import annotations

import os
import sys
import time

from benchmarks import procs as procs_module
from benchmarks.loadgen import connect_echo
from benchmarks.procs import Processes, install_signal_handlers
from benchmarks.tools import strace_calls, strace_counts
from benchmarks.topology import PortPlane


def main(tree: str | None = None, n: int = 1000) -> dict:
    if tree:
        procs_module.REPO = os.path.abspath(tree)
    result = {}
    with Processes() as procs:
        plane = PortPlane(procs, "echo")
        for _ in range(50):
            connect_echo(plane.gate)
        with strace_counts(plane.services) as tables:
            for _ in range(n):
                connect_echo(plane.gate)
            time.sleep(0.5)   # (the last close handled)
        for name, table in tables.items():
            calls = strace_calls(table)
            result[name] = {k: v / n for k, v in calls.items()}
            by_call = "  ".join(f"{k} {v / n:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]))
            print(f"{name}: {sum(calls.values()) / n:.2f} system calls per connection: {by_call}", flush=True)
    return result


if __name__ == "__main__":
    install_signal_handlers()
    args = sys.argv[1:]
    main(args[0] if args else None, *(int(a) for a in args[1:2]))
