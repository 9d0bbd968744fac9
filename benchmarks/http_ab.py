"""
Paired A/B of the HTTP plane's CPU per request, for a busy machine:

    python -m benchmarks.http_ab TREE_A TREE_B [--runs 6] [--seconds 5] [--rate 800]

Starts app + relay + connector from each tree (PYTHONPATH = the tree) at once, then
alternates A and B (ABBA order) for C{--runs} rounds: C{wrk -t2 -c50} (or, with
C{--rate}, the fixed-rate open loop of loadgen.py, steadier than wrk when other
processes load the machine), and prints the user + system CPU of relay + connector
per request answered (as http_small reports it), then the medians.  Both trees' services
are up at once, so other load on the machine falls on A and B alike.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from benchmarks import loadgen, procs as P, tools
from benchmarks.topology import CpuMeter, HttpPlane


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_ab")
    parser.add_argument("tree_a")
    parser.add_argument("tree_b")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=0.0, help="fixed req/s (open loop) instead of wrk -c50")
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {"A": [], "B": []}
    p99: dict[str, list[float]] = {"A": [], "B": []}  # wrk's, in ms (not with --rate)
    per_process: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
    with P.Processes() as pa, P.Processes() as pb:
        planes = {}
        for name, tree, procs in (("A", args.tree_a, pa), ("B", args.tree_b, pb)):
            P.REPO = tree   # child_env() puts it first on the services' PYTHONPATH
            planes[name] = HttpPlane(procs, "small")
        for i in range(args.runs):
            for name in (("A", "B") if i % 2 == 0 else ("B", "A")):
                plane = planes[name]
                path = "/bench/small"
                if args.rate:
                    asyncio.run(loadgen.OpenLoop(plane.relay_port, path).run(args.rate, 0.3))  # warm-up
                    with CpuMeter(plane.services) as cpu:
                        r = asyncio.run(loadgen.OpenLoop(plane.relay_port, path).run(args.rate, args.seconds))
                    requests, rps = r["achieved_rps"] * args.seconds, r["achieved_rps"]
                else:
                    with CpuMeter(plane.services) as cpu:
                        r = tools.wrk(f"http://127.0.0.1:{plane.relay_port}{path}", seconds=args.seconds)
                    requests, rps = r["requests"], r["rps"]
                    if r.get("p99_ms") is not None:
                        p99[name].append(r["p99_ms"])
                us = sum(cpu.seconds.values()) / max(1, requests) * 1e6
                results[name].append(us)
                for process, seconds in cpu.seconds.items():
                    per_process[name].setdefault(process, []).append(seconds / max(1, requests) * 1e6)
                latency = f", p99 {p99[name][-1]:.1f} ms" if p99[name] and not args.rate else ""
                print(f"{name} run {i + 1}: {us:.0f} us/request, {rps:.0f} req/s{latency}, cpu {cpu.percent}",
                      flush=True)
    for name in "AB":
        print(f"{name}: median {statistics.median(results[name]):.0f} us/request "
              f"({', '.join(f'{x:.0f}' for x in sorted(results[name]))}); "
              + ", ".join(f"{process} {statistics.median(us):.0f}" for process, us in per_process[name].items())
              + (f"; wrk p99 median {statistics.median(p99[name]):.1f} ms" if p99[name] else ""))


if __name__ == "__main__":
    main()
