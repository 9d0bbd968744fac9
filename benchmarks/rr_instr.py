"""
Instructions per small request/response in gateway and provider, exact and repeatable on
a busy machine (unlike time), for comparing code trees (issue 22, target 1):

    python -m benchmarks.rr_instr [TREE] [ROUNDS] [CONNECTIONS]

Starts the echo backend, and the gateway and provider of TREE (default: this checkout; a
copy made with `git archive REV | tar -x -C DIR`) under `valgrind --tool=callgrind`, opens
CONNECTIONS (default 16) connections through the gate, and in each round writes a
32-byte request on every connection and then reads every echo (as redis-benchmark -P1
with that many clients does, in lockstep).  After 20 unrecorded rounds it zeroes the
counters (`callgrind_control -z`), runs ROUNDS (default 200), dumps the counters and prints
each service's instructions per request.  Needs valgrind.  Under valgrind the services run
some 50 times slower, so how many requests share one read or one TLS record depends on
timing: compare trees with the same arguments, and repeat a run to see its spread.
"""

from __future__ import annotations

import socket
import sys

from benchmarks import callgrind, topology
from benchmarks.procs import Processes, install_signal_handlers

REQUEST = b"x" * 32   # about a redis GET and its answer


def rounds(sockets: list[socket.socket], n: int) -> None:
    for _ in range(n):
        for s in sockets:
            s.sendall(REQUEST)
        for s in sockets:
            got = b""
            while len(got) < len(REQUEST):
                chunk = s.recv(len(REQUEST) - len(got))
                if not chunk:
                    raise OSError("the tunnel closed a connection")
                got += chunk


def main(tree: str | None = None, n: int = 200, connections: int = 16) -> dict:
    sockets: list[socket.socket] = []
    with callgrind.patient_port_plane(), \
            callgrind.services_under_callgrind("rr_instr-", tree) as out, Processes() as procs:
        plane = topology.PortPlane(procs, "echo")
        for _ in range(connections):
            s = socket.create_connection(("127.0.0.1", plane.gate), timeout=60)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sockets.append(s)
        rounds(sockets, 20)
        pids = {c.name: c.pid for c in plane.services}
        callgrind.zero(pids)
        rounds(sockets, n)
        result = callgrind.per_unit(pids, out, "requests", n * connections)
        for s in sockets:
            s.close()
    callgrind.report(result, "request")
    return result


if __name__ == "__main__":
    install_signal_handlers()
    args = sys.argv[1:]
    main(args[0] if args else None, *(int(a) for a in args[1:3]))
