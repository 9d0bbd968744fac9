"""
CPU per request of gateway + provider under the DNS-sized UDP loop alone, optionally with
the syscalls each made (for A/B comparisons of the UDP path; cpu_ab runs the whole set):

    python -m benchmarks.udp_rr_cpu LABEL [--strace] [--seconds 4]

A fresh backend + gateway + provider (topology.PortPlane), 1 s of warm-up traffic, then
loadgen.udp_request_response for SECONDS; prints LABEL, the answered and lost requests,
req/s, and per process the CPU µs per answered request (user + system, /proc) and the
share of it in the kernel.  With --strace, `strace -c -f` is attached to both services
for the measurement (the CPU figures are then inflated) and its tables are printed:
syscalls per request.
"""

from __future__ import annotations

import argparse
import contextlib

from benchmarks import loadgen
from benchmarks.procs import Processes, install_signal_handlers
from benchmarks.tools import strace_counts
from benchmarks.topology import CpuMeter, PortPlane


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("label")
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    install_signal_handlers()
    with Processes() as procs:
        plane = PortPlane(procs, "echo")
        loadgen.udp_request_response(plane.gate, 1)
        with strace_counts(plane.services) if args.strace else contextlib.nullcontext({}) as tables:
            with CpuMeter(plane.services) as cpu:
                u = loadgen.udp_request_response(plane.gate, args.seconds, warmup=0)
        n = max(1, u["answered"])
        per = {name: round(s / n * 1e6, 1) for name, s in cpu.seconds.items()}
        print(args.label, f"answered {u['answered']} lost {u['lost']} req/s {u['rps']}",
              f"CPU us/request {per} total {round(sum(per.values()), 1)}",
              f"kernel % of one core {cpu.kernel_percent}", flush=True)
        for name, table in tables.items():
            print(f"== {name}: strace -c over {u['answered']} requests")
            print(table)


if __name__ == "__main__":
    main()
