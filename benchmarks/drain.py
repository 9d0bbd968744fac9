"""
SIGTERM in the middle of a full-size transfer, with real processes on loopback (issue 8):

- a 1 GiB download through relay + connector, the relay SIGTERMed one second in;
- an iperf3 TCP run through gateway + provider, the gateway SIGTERMed two seconds in.

Each once with the default drain (the transfer must finish, byte-exact) and once with
C{--drain-timeout 1} (the transfer must be cut, and the service must exit by itself soon
after).  The suite checks the same with smaller sizes (tests/test_drain.py); this script is
the full-size run recorded in docs/deployment.md.  Run: C{python -m benchmarks.drain}.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

from benchmarks import transfer
from benchmarks.procs import Processes
from benchmarks.topology import HttpPlane, PortPlane

GIB = 1 << 30


def _wait_exit(child, timeout: float) -> float | None:
    """Seconds until C{child} exits by itself, or None if it is still running after C{timeout}."""
    start = time.monotonic()
    try:
        child.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - start


def http_download(drain: str | None) -> dict:
    extra = {"relay": ["--drain-timeout", drain]} if drain else {}
    with Processes(extra_args=extra) as procs:
        plane = HttpPlane(procs, app="stream")
        result: dict = {}

        def fetch():
            try:
                seconds, digest = transfer.download(plane.relay_port, GIB)
                result.update(seconds=seconds, intact=digest == transfer.expected_sha(GIB))
            except OSError as e:
                result.update(error=str(e), intact=False)

        thread = threading.Thread(target=fetch)
        thread.start()
        time.sleep(1.0)
        plane.relay.popen.send_signal(signal.SIGTERM)
        exited = _wait_exit(plane.relay, 60)
        thread.join(120)
        return {"scenario": "http 1 GiB download, SIGTERM to the relay at 1 s",
                "drain_timeout": drain or "default (30)", "download_intact": result.get("intact"),
                "download_seconds": round(result.get("seconds", 0), 2), "error": result.get("error"),
                "relay_exit_seconds_after_sigterm": None if exited is None else round(exited, 2)}


def tcp_iperf3(drain: str | None) -> dict:
    extra = {"gateway": ["--drain-timeout", drain]} if drain else {}
    with Processes(extra_args=extra) as procs:
        plane = PortPlane(procs, backend="iperf3")
        client = subprocess.Popen(["iperf3", "-c", "127.0.0.1", "-p", str(plane.gate), "-t", "6", "-J"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2.0)
        plane.gateway.popen.send_signal(signal.SIGTERM)
        exited = _wait_exit(plane.gateway, 60)
        out, _ = client.communicate(timeout=60)
        try:
            report = json.loads(out)
        except ValueError:
            report = {"error": out.strip()[-200:]}
        end = report.get("end", {})
        received = end.get("sum_received", {}).get("bytes")
        return {"scenario": "iperf3 -t 6 through the gateway, SIGTERM to the gateway at 2 s",
                "drain_timeout": drain or "default (30)", "iperf3_exit": client.returncode,
                "iperf3_error": report.get("error"), "received_mb": received and round(received / 1e6, 1),
                "gateway_exit_seconds_after_sigterm": None if exited is None else round(exited, 2)}


def main() -> int:
    rows = [http_download(None), http_download("1"), tcp_iperf3(None), tcp_iperf3("1")]
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
