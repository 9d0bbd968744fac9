"""wrk, iperf3 and strace: find them, run them, parse what they print."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.procs import run_tool

# Which scenarios need which Debian tool (`sudo apt-get install wrk iperf3 redis-server redis-tools`).
NEEDS = {"wrk": ("http_small",), "iperf3": ("tcp", "udp"), "redis-server": ("redis",), "redis-benchmark": ("redis",)}
# Tools without which a scenario still runs, losing one comparison
# (`sudo apt-get install haproxy openssh-server openssh-client`).
REFERENCES = {"haproxy": ("tcp", "redis", "connect"), "sshd": ("tcp", "redis", "connect"),
              "ssh": ("tcp", "redis", "connect")}
# Debian packages to name when a tool is missing
PACKAGES = {"redis-server": "redis-server", "redis-benchmark": "redis-tools", "sshd": "openssh-server",
            "ssh": "openssh-client"}


def which(tool: str) -> str | None:
    """C{tool} on PATH, or (sshd) in /usr/sbin, which is not on every user's PATH."""
    found = shutil.which(tool)
    if found is None and tool == "sshd" and os.access("/usr/sbin/sshd", os.X_OK):
        found = "/usr/sbin/sshd"
    return found


def missing_tools() -> dict[str, tuple[str, ...]]:
    """{tool: scenarios it skips} for each tool that is not on PATH."""
    return {tool: scenarios for tool, scenarios in NEEDS.items() if which(tool) is None}


def missing_references() -> dict[str, tuple[str, ...]]:
    """{tool: scenarios that run without its reference figures} for each one not on PATH."""
    return {tool: scenarios for tool, scenarios in REFERENCES.items() if which(tool) is None}


def versions() -> dict[str, str | None]:
    out = {}
    if shutil.which("wrk"):
        text = run_tool(["wrk", "-v"], timeout=10)
        first = (text.stdout + text.stderr).strip().splitlines()
        out["wrk"] = first[0].split(" [")[0].strip() if first else None
    if shutil.which("iperf3"):
        text = run_tool(["iperf3", "--version"], timeout=10)
        out["iperf3"] = text.stdout.splitlines()[0].strip() if text.stdout else None
    if shutil.which("haproxy"):
        text = run_tool(["haproxy", "-v"], timeout=10)
        out["haproxy"] = text.stdout.splitlines()[0].split(" - ")[0].strip() if text.stdout else None
    if shutil.which("redis-server"):
        text = run_tool(["redis-server", "--version"], timeout=10)
        m = re.search(r"v=(\S+)", text.stdout)
        out["redis"] = f"redis {m.group(1)}" if m else None
    if which("ssh"):
        text = run_tool(["ssh", "-V"], timeout=10)
        out["ssh"] = (text.stderr or text.stdout).strip().split(",")[0] or None
    return out


# -- redis-benchmark
def redis_benchmark(port: int, requests: int, *, clients: int = 50, pipeline: int = 1,
                    tests: str = "set,get") -> dict:
    """C{redis-benchmark -t TESTS -c CLIENTS -P PIPELINE -n REQUESTS --csv}: {test: {rps, p50_ms, ...}}."""
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", tests, "-c", str(clients),
            "-n", str(requests), "-P", str(pipeline), "--csv"]
    proc = run_tool(argv, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return parse_redis_csv(proc.stdout) | {"command": " ".join(argv), "requests": requests}


def parse_redis_csv(text: str) -> dict:
    rows = list(csv.DictReader(io.StringIO(text)))
    out = {}
    for row in rows:
        if not row.get("test") or not row.get("rps"):
            continue
        out[row["test"].lower()] = {"rps": float(row["rps"]), "p50_ms": float(row.get("p50_latency_ms") or 0),
                                    "p99_ms": float(row.get("p99_latency_ms") or 0)}
    if not out:
        raise RuntimeError(f"no results in redis-benchmark output:\n{text}")
    return {"tests": out}


# -- wrk
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, threads: int = 2, connections: int = 50, seconds: float = 10) -> dict:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    proc = run_tool(argv, timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return parse_wrk(proc.stdout) | {"command": " ".join(argv)}


def parse_wrk(text: str) -> dict:
    result: dict = {"errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise RuntimeError(f"no Requests/sec in wrk output:\n{text}")
    result["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    result["requests"] = int(m.group(1)) if m else None
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        if m:
            result[f"p{pct}_ms"] = round(_to_ms(m.group(1)), 3)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        result["socket_errors"] = {k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), m.groups())}
        result["errors"] += sum(result["socket_errors"].values())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        result["non_2xx"] = int(m.group(1))
        result["errors"] += int(m.group(1))
    return result


# -- iperf3
def iperf3_server_argv(port: int) -> list[str]:
    return ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)]


def iperf3(port: int, seconds: float, *, parallel: int = 1, reverse: bool = False,
           udp_bitrate: str | None = None, udp_length: int | None = None) -> dict:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J"]
    if parallel > 1:
        argv += ["-P", str(parallel)]
    if reverse:
        argv.append("-R")
    if udp_bitrate is not None:
        argv += ["-u", "-b", udp_bitrate]
        if udp_length:
            argv += ["-l", str(udp_length)]
    # The server takes a moment to notice that the previous test's control connection
    # closed (through a tunnel, its FIN travels too); it answers "busy" until then.
    deadline = time.monotonic() + 30
    while True:
        proc = run_tool(argv, timeout=seconds + 60)
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 printed no JSON ({proc.returncode}): {proc.stderr.strip()}") from None
        if "error" in data and "busy" in data["error"] and time.monotonic() < deadline:
            time.sleep(0.2)
            continue
        break
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    out = {"command": " ".join(argv)}
    if udp_bitrate is None:
        received = end["sum_received"]
        out["mb_per_s"] = round(received["bits_per_second"] / 8e6, 1)
        out["gbit_per_s"] = round(received["bits_per_second"] / 1e9, 3)
        out["retransmits"] = end.get("sum_sent", {}).get("retransmits")
        # iperf3's own CPU (% of one core), client and server: the load generator shares the cores.
        cpu = end.get("cpu_utilization_percent") or {}
        if "host_total" in cpu and "remote_total" in cpu:
            out["iperf3_cpu_percent"] = round(cpu["host_total"] + cpu["remote_total"], 1)
    else:
        # The receiver's report: what arrived, and how many datagrams were lost on the way.
        received = end.get("sum_received") or end["sum"]
        sent = end.get("sum_sent") or end["sum"]
        out["offered_mbit_per_s"] = round(sent["bits_per_second"] / 1e6, 1)
        out["delivered_mbit_per_s"] = round(received["bits_per_second"] / 1e6, 1)
        out["lost_percent"] = round(float(received.get("lost_percent", 0.0)), 3)
        out["lost_packets"] = received.get("lost_packets")
        out["packets"] = received.get("packets")
        out["jitter_ms"] = received.get("jitter_ms")
        out["blksize"] = data["start"]["test_start"].get("blksize")
    return out


@contextlib.contextmanager
def strace_counts(children):
    """
    `strace -c -f` attached to each of C{children} (processes with C{name} and C{pid}) for
    the block; yields a dict that, once the block is left, holds each one's table by name.
    Needs strace (and ptrace permission).
    """
    tables: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {child.name: Path(tmp) / f"{child.name}.txt" for child in children}
        traces = [subprocess.Popen(["strace", "-c", "-f", "-o", str(outs[child.name]), "-p", str(child.pid)],
                                   stderr=subprocess.DEVNULL) for child in children]
        time.sleep(1)   # (strace attached)
        try:
            yield tables
        finally:
            for trace in traces:
                trace.send_signal(signal.SIGINT)
                trace.wait()
        tables.update((name, out.read_text()) for name, out in outs.items())


def strace_calls(table: str) -> dict[str, int]:
    """The calls column of an `strace -c` table, by system call."""
    calls = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls
