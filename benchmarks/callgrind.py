"""
The services of a scenario under C{valgrind --tool=callgrind}, and their instruction
counts per unit of work: what L{benchmarks.connect_instr} (per connection) and
L{benchmarks.http_instr} (per request) share.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator

from benchmarks import procs as procs_module
from benchmarks.procs import Processes


@contextlib.contextmanager
def services_under_callgrind(prefix: str, tree: str | None) -> Iterator[str]:
    """
    Inside the block, every twistd service starts under callgrind (from C{tree}, if given),
    writing its counters to the directory yielded.
    """
    if tree:
        procs_module.REPO = os.path.abspath(tree)
    out = tempfile.mkdtemp(prefix=prefix)
    plain = Processes.twistd_cmd

    def under_callgrind(self, name):
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/{name}.%p"] + plain(self, name)

    Processes.twistd_cmd = under_callgrind
    try:
        yield out
    finally:
        Processes.twistd_cmd = plain


@contextlib.contextmanager
def patient_port_plane() -> Iterator[None]:
    """Inside the block, L{benchmarks.topology} waits 600 s for a port or an echo: services
    under callgrind start some 50 times slower."""
    from benchmarks import topology
    listening, echo = topology.wait_listening, topology.wait_echo
    topology.wait_listening = lambda port, proto="tcp", timeout=30, procs=None: listening(port, proto, 600, procs)
    topology.wait_echo = lambda port, timeout=30, procs=None: echo(port, 600, procs)
    try:
        yield
    finally:
        topology.wait_listening, topology.wait_echo = listening, echo


def zero(pids: dict[str, int]) -> None:
    """Zero the counters of each service (after the warm-up)."""
    for pid in pids.values():
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)


def per_unit(pids: dict[str, int], out: str, reason: str, units: float, dump: int = 1) -> dict[str, int]:
    """
    Dump each service's counters and return its instructions per unit (C{units} since L{zero});
    C{dump}: the number of this dump in the service's run (1 for its first).
    """
    for pid in pids.values():
        subprocess.run(["callgrind_control", "-d", reason, str(pid)], check=True, capture_output=True)
    time.sleep(2)   # (the dumps are written by the services themselves)
    result = {}
    for name, pid in pids.items():
        with open(f"{out}/{name}.{pid}.{dump}") as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    result[name] = round(int(line.split()[1]) / units)
                    break
    return result


def report(result: dict[str, int], per: str) -> None:
    """Print each service's instructions per unit of work."""
    for name, count in result.items():
        print(f"{name}: {count:,} instructions per {per}", flush=True)
