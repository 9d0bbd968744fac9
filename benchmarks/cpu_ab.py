"""
CPU per request of gateway + provider, for A/B comparisons on a busy machine:

    python -m benchmarks.cpu_ab LABEL        # prints LABEL and one JSON line

redis-benchmark SET+GET -c 50 at -P 1 (60,000 requests each) and -P 16 (400,000 each)
through the TCP gate, then the DNS-sized UDP request/response loop (4 s) and 500
connect + echo through the gate.  Each figure: [GET req/s or req/s, p50 ms, CPU µs per
request of gateway + provider]; connect: [p50, p99] ms.  Run it from each tree to
compare (a copy per code version: `git archive REV | tar -x -C DIR`), alternating A, B,
A, B: on a loaded machine req/s follow the scheduler, CPU per request much less.
"""

from __future__ import annotations

import json
import sys

from benchmarks import loadgen, tools
from benchmarks.procs import Processes, install_signal_handlers
from benchmarks.topology import CpuMeter, PortPlane


def main(label: str) -> dict:
    res: dict = {}
    with Processes() as procs:
        plane = PortPlane(procs, "redis")
        for pipeline, n in ((1, 60_000), (16, 400_000)):
            with CpuMeter(plane.services) as cpu:
                r = tools.redis_benchmark(plane.gate, n, pipeline=pipeline)
            get = r["tests"]["get"]
            res[f"P{pipeline}"] = (round(get["rps"]), get["p50_ms"],
                                   round(sum(cpu.seconds.values()) / (2 * n) * 1e6, 1))
    with Processes() as procs:
        plane = PortPlane(procs, "echo")
        with CpuMeter(plane.services) as cpu:
            u = loadgen.udp_request_response(plane.gate, 4)
        res["udp"] = (u["rps"], u["p50_ms"], round(sum(cpu.seconds.values()) / max(1, u["answered"]) * 1e6, 1))
        c = loadgen.connect_latency(plane.gate, 500)
        res["connect"] = (c["p50_ms"], c["p99_ms"])
    print(label, json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    install_signal_handlers()
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
