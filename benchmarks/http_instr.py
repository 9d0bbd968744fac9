"""
Instructions per small HTTP request in the relay and the connector, exact and repeatable
on a busy machine (unlike time), for comparing code trees (issue 22, target 2):

    python -m benchmarks.http_instr [TREE] [N] [C]

Starts the 1 KiB app (not under valgrind), and the relay and connector of TREE (default:
this checkout; a copy made with `git archive REV | tar -x -C DIR`) under `valgrind
--tool=callgrind`, makes 50 GETs on one keep-alive connection to warm up, zeroes the
counters (`callgrind_control -z`), makes N (default 500) more, one after the other, dumps
the counters and prints each service's instructions per request.  Needs valgrind.  One
request at a time, so that every request takes the same path (under wrk, requests share
reads, writes and reactor turns, and how many do depends on timing): the figure counts
the per-request work, not the batching.  With C > 1, C keep-alive connections each send
a request, then all C answers are read, round after round (N requests in all): C streams
in flight at once, as under wrk -c50, but batching then varies from run to run (about
1 %).  Run it from a directory outside the trees.
"""

from __future__ import annotations

import http.client
import sys

from benchmarks import callgrind, topology, transfer
from benchmarks.procs import Processes, install_signal_handlers


def _round(conns: list[http.client.HTTPConnection], path: str) -> None:
    for conn in conns:
        conn.request("GET", path)
    for conn in conns:
        response = conn.getresponse()
        body = response.read()
        if response.status != 200 or len(body) != 1024:
            raise RuntimeError(f"GET {path}: {response.status}, {len(body)} bytes")


def main(tree: str | None = None, n: int = 500, connections: int = 1) -> dict:
    slow_wait = transfer.wait_http
    transfer.wait_http = lambda port, path, timeout=20: slow_wait(port, path, 600)
    try:
        with callgrind.services_under_callgrind("http_instr-", tree) as out, Processes() as procs:
            plane = topology.HttpPlane(procs, "small")
            conns = [http.client.HTTPConnection("127.0.0.1", plane.relay_port, timeout=120)
                     for _ in range(connections)]
            for _ in range(max(1, 50 // connections)):
                _round(conns, "/bench/small")
            pids = {c.name: c.pid for c in plane.services}
            callgrind.zero(pids)
            rounds = max(1, n // connections)
            n = rounds * connections
            for _ in range(rounds):
                _round(conns, "/bench/small")
            result = callgrind.per_unit(pids, out, "requests", n)
            for conn in conns:
                conn.close()
    finally:
        transfer.wait_http = slow_wait
    callgrind.report(result, "request")
    print(f"relay + connector: {sum(result.values()):,}", flush=True)
    return result


if __name__ == "__main__":
    install_signal_handlers()
    args = sys.argv[1:]
    main(args[0] if args else None, *(int(a) for a in args[1:3]))
