"""
Instructions per MB of bulk TCP in gateway and provider, exact and repeatable on a busy
machine (unlike time), for comparing code trees (issue 22, target 3):

    python -m benchmarks.bulk_instr [TREE] [MB]

Starts C{iperf3 -s} behind a gate and the gateway and provider of TREE (default: this
checkout; a copy made with `git archive REV | tar -x -C DIR`) under `valgrind
--tool=callgrind`, warms up with 16 MB, then for each of the four configurations of the
C{tcp} scenario (1 stream, C{-R}, C{-P 8}, C{-P 8 -R}) zeroes the counters, sends MB
(default 128) with C{iperf3 -n}, dumps the counters and prints each service's
instructions per MB (10^6 bytes) the mux link carried meanwhile (both ways, from C{ss}), since
iperf3's own count leaves out what was still in flight when its test ended (with C{-P 8} under
valgrind, more than half).  Counts user space only (the
interpreter, libc, OpenSSL): the kernel's share (system calls, copies to and from
sockets) is not in it.  Needs valgrind and iperf3.  Under valgrind the services run some
50 times slower, so reads and frames batch differently than at full speed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from benchmarks import callgrind, topology
from benchmarks.procs import Processes, install_signal_handlers

CONFIGS = {"P1": [], "P1-R": ["-R"], "P8": ["-P", "8"], "P8-R": ["-P", "8", "-R"]}


def _iperf(port: int, mb: int, extra: list[str]) -> int:
    """Bytes received by iperf3 for C{-n MB} through C{port}."""
    run = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-n", f"{mb}M", "-J", *extra],
                         capture_output=True, text=True, timeout=1200, check=True)
    return int(json.loads(run.stdout)["end"]["sum_received"]["bytes"])


def _link_bytes(mux_port: int) -> int:
    """Bytes the mux link has carried both ways so far (C{ss}: the gateway's end of the link)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{mux_port} )"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(n) for n in re.findall(r"bytes_(?:acked|received):(\d+)", out))


def main(tree: str | None = None, mb: int = 128) -> dict:
    results = {}
    with callgrind.patient_port_plane(), \
            callgrind.services_under_callgrind("bulk_instr-", tree) as out, Processes() as procs:
        plane = topology.PortPlane(procs, "iperf3")
        _iperf(plane.gate, 16, [])
        pids = {c.name: c.pid for c in plane.services}
        mux_port = int(re.search(r"--mux tcp:(\d+)", " ".join(map(str, plane.services[0].popen.args))).group(1))
        for dump, (name, extra) in enumerate(CONFIGS.items(), 1):
            callgrind.zero(pids)
            before = _link_bytes(mux_port)
            received = _iperf(plane.gate, mb, extra)
            # What the link carried while counted (iperf3's own count leaves out what was in
            # flight when its test ended); TLS records and frame headers add about 0.15 %.
            moved = _link_bytes(mux_port) - before
            counts = callgrind.per_unit(pids, out, name, moved / 1e6, dump)
            results[name] = counts
            print(f"{name}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
                  + f", both {sum(counts.values()):,} instructions per MB moved "
                  f"({moved / 1e6:.1f} MB moved, {received / 1e6:.1f} MB received by iperf3)", flush=True)
    return results


if __name__ == "__main__":
    install_signal_handlers()
    args = sys.argv[1:]
    main(args[0] if args else None, *(int(a) for a in args[1:2]))
