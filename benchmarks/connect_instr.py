"""
Instructions per tunnelled connection in gateway and provider, exact and repeatable on a
busy machine (unlike time), for comparing code trees (issue 22, target 4):

    python -m benchmarks.connect_instr [TREE] [N]

Starts the echo backend, and the gateway and provider of TREE (default: this checkout; a
copy made with `git archive REV | tar -x -C DIR`) under `valgrind --tool=callgrind`, makes
30 connections to warm up, zeroes the counters (`callgrind_control -z`), makes N (default
300) connect + 1-byte echo + close through the gate, dumps the counters and prints each
service's instructions per connection.  Needs valgrind.  Under valgrind the services run
some 50 times slower, so frames batch differently than at full speed; the figure counts
the work per connection, not its timing.  One run takes about 40 s.
"""

from __future__ import annotations

import sys

from benchmarks import callgrind, topology
from benchmarks.loadgen import connect_echo
from benchmarks.procs import Processes, install_signal_handlers


def main(tree: str | None = None, n: int = 300) -> dict:
    with callgrind.patient_port_plane(), \
            callgrind.services_under_callgrind("connect_instr-", tree) as out, Processes() as procs:
        plane = topology.PortPlane(procs, "echo")
        for _ in range(30):
            connect_echo(plane.gate)
        pids = {c.name: c.pid for c in plane.services}
        callgrind.zero(pids)
        for _ in range(n):
            connect_echo(plane.gate)
        result = callgrind.per_unit(pids, out, "connections", n)
    callgrind.report(result, "connection")
    return result


if __name__ == "__main__":
    install_signal_handlers()
    args = sys.argv[1:]
    main(args[0] if args else None, *(int(a) for a in args[1:2]))
