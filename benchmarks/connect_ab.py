"""
Connect + 1-byte echo + close through a TCP gate, A/B between code trees (issue 22, target 4):

    python -m benchmarks.connect_ab TREE_A TREE_B [N] [ROUNDS]

Starts one echo backend + gateway + provider per tree (each tree a copy of the repository,
e.g. `git archive REV | tar -x -C DIR`), all at once, then runs ROUNDS rounds (default 5)
of N (default 1000) sequential connections, the connections alternating between the two
gates one by one (A B B A A B ...), so that both see the same machine load.  Per tree and round: p50 and
p99 in ms, and the CPU of gateway + provider per connection in µs, from
/proc/PID/task/*/schedstat (nanoseconds on a CPU: robust to a busy machine, where the
latencies are not).  Prints one JSON line per round and the medians.

The tree given second comes out 20-45 us per connection cheaper in A/A runs (the same tree
twice), whatever the order of the connections: run each comparison both ways (A B, then
B A) and take half the difference of the two differences.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from benchmarks import procs as procs_module
from benchmarks.loadgen import connect_echo, percentile
from benchmarks.procs import Processes, install_signal_handlers
from benchmarks.topology import PortPlane


def cpu_ns(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def main(trees: list[str], n: int = 1000, rounds: int = 5) -> dict:
    names = [os.path.basename(os.path.normpath(t)) for t in trees]
    res: dict = {name: [] for name in names}
    with Processes() as procs:
        planes = []
        for tree in trees:
            procs_module.REPO = os.path.abspath(tree)   # child_env's PYTHONPATH: this tree's code
            planes.append(PortPlane(procs, "echo"))
        for plane in planes:
            for _ in range(200):   # warm up
                connect_echo(plane.gate)
        pairs = list(zip(names, planes))
        for _ in range(rounds):
            lat: dict = {name: [] for name in names}
            before = [[cpu_ns(c.pid) for c in plane.services] for plane in planes]
            for i in range(n):
                # A B, B A, A B, ...: neither tree always goes first (the one that follows
                # the other's connection meets its close path; A/A runs showed the second
                # of a fixed order 3-50 us cheaper per connection).
                for name, plane in (pairs if i % 2 == 0 else pairs[::-1]):
                    lat[name].append(connect_echo(plane.gate))
            after = [[cpu_ns(c.pid) for c in plane.services] for plane in planes]
            for name, b, a in zip(names, before, after):
                cpu = [round((y - x) / n / 1000, 1) for x, y in zip(b, a)]
                row = {"p50": round(percentile(lat[name], 50) * 1000, 3),
                       "p99": round(percentile(lat[name], 99) * 1000, 3),
                       "cpu_us": {"gateway": cpu[0], "provider": cpu[1], "total": round(sum(cpu), 1)}}
                res[name].append(row)
                print(name, json.dumps(row), flush=True)
    for name in names:
        rows = res[name]
        print(name, "median of", len(rows), "rounds: p50", statistics.median(r["p50"] for r in rows),
              "ms, p99", statistics.median(r["p99"] for r in rows), "ms, CPU gateway + provider",
              statistics.median(r["cpu_us"]["total"] for r in rows), "µs per connection", flush=True)
    return res


if __name__ == "__main__":
    install_signal_handlers()
    args = sys.argv[1:]
    main(args[:2], *(int(a) for a in args[2:4]))
