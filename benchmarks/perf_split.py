"""
Where the services' CPU goes, by kind of work, under one workload (issue 22: "the results
file says why"):

    python -m benchmarks.perf_split WORKLOAD [--seconds 4]

WORKLOAD: tcp (iperf3, one stream, client -> service), redis (redis-benchmark GET -c 50
-P 1), udp_rr (the DNS-sized UDP loop), connect (sequential connect + 1-byte echo +
close), http (wrk -t2 -c50 on a 1 KiB GET through relay + connector).  After 1 s of the
workload, `perf record` samples the PipeGate services (gateway + provider, or relay +
connector) for SECONDS; the samples are then split by where they fell: the Python
interpreter, the kernel, OpenSSL's ciphers, the C library's copies, its allocator, and
the rest; with the ten busiest symbols.  Needs `perf` (linux-perf) and the right to
profile other processes (root, or perf_event_paranoid <= 1).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import loadgen, tools
from benchmarks.procs import Processes, install_signal_handlers
from benchmarks.topology import HttpPlane, PortPlane

# (kind, a test on "dso symbol"), first match wins
KINDS = (
    ("kernel", re.compile(r"^\[kernel")),
    ("ciphers (OpenSSL)", re.compile(r"aes|gcm|chacha|poly1305|ghash|sha\d|libcrypto", re.I)),
    ("copies (libc memcpy/memmove/memset)", re.compile(r"^libc\S* .*(memmove|memcpy|memset)")),
    ("allocator (libc malloc/free)", re.compile(r"^libc\S* .*(malloc|free|realloc|_int_)")),
    ("Python interpreter", re.compile(r"^libpython|^python")),
    ("other libc", re.compile(r"^libc")),
)


def workload(name: str, procs: Processes, seconds: float):
    """Start the topology; return (service children, a callable running the load for SECONDS + 2 s)."""
    length = seconds + 2
    if name == "http":
        plane = HttpPlane(procs)
        url = f"http://127.0.0.1:{plane.relay_port}/bench/small"
        return plane.services, lambda: tools.wrk(url, seconds=length)
    plane = PortPlane(procs, {"tcp": "iperf3", "redis": "redis"}.get(name, "echo"))
    if name == "tcp":
        return plane.services, lambda: subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", str(plane.gate), "-t", f"{length:g}"],
            stdout=subprocess.DEVNULL, check=True)
    if name == "redis":
        return plane.services, lambda: tools.redis_benchmark(plane.gate, int(20_000 * length), tests="get")
    if name == "udp_rr":
        return plane.services, lambda: loadgen.udp_request_response(plane.gate, length, warmup=0)
    if name == "connect":
        return plane.services, lambda: loadgen.connect_latency(plane.gate, 100_000, budget=length)
    raise SystemExit(f"unknown workload {name!r}")


def split(report: str) -> tuple[dict[str, float], list[tuple[float, str]]]:
    """perf report --sort dso,sym lines -> (% per kind, the busiest symbols)."""
    kinds: dict[str, float] = collections.Counter()
    symbols = []
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(.*)", line)
        if not m:
            continue
        share, dso, symbol = float(m.group(1)), m.group(2), m.group(3).strip()
        key = f"{dso} {symbol}"
        kind = next((k for k, test in KINDS if test.search(key)), "other")
        kinds[kind] += share
        symbols.append((share, key))
    return dict(kinds), sorted(symbols, reverse=True)[:10]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf_split")
    parser.add_argument("workload", choices=("tcp", "redis", "udp_rr", "connect", "http"))
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    install_signal_handlers()
    with Processes() as procs, tempfile.TemporaryDirectory() as tmp:
        services, run = workload(args.workload, procs, args.seconds)
        load = threading.Thread(target=run, daemon=True)
        load.start()
        time.sleep(1)
        data = Path(tmp) / "perf.data"
        subprocess.run(["perf", "record", "-F", "999", "-o", str(data), "-p", ",".join(str(s.pid) for s in services),
                        "--", "sleep", f"{args.seconds:g}"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        load.join()
        report = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso,sym", "--stdio"],
                                check=True, capture_output=True, text=True).stdout
    kinds, top = split(report)
    print(f"{args.workload}: where the CPU of {', '.join(s.name for s in services)} went "
          f"(perf, {args.seconds:g} s)")
    for kind, share in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {share:5.1f} %  {kind}")
    print("  busiest symbols:")
    for share, key in top:
        print(f"  {share:5.1f} %  {key}")


if __name__ == "__main__":
    main()
