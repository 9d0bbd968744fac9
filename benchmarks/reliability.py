"""
Full-size reliability runs with real processes on 127.0.0.1 (issue 7; not run by CI,
figures in docs/reliability.md).  Each prints a human summary and one JSON line.

    python -m benchmarks.reliability http-load [--requests 100000] [--concurrency 100]
    python -m benchmarks.reliability tcp-channels [--channels 2000] [--bytes 1048576]
    python -m benchmarks.reliability soak [--minutes 30] [--restart-every 20]
                                          [--restart connector,provider]

http-load: app + relay + connector; C keep-alive connections send GETs until N answers;
  every answer must be a 200 with the app's full 1 KiB body; the app's own request count
  must equal N (nothing lost, nothing duplicated); RSS and fds of relay and connector
  after the first 10,000 and after the last.
tcp-channels: echo backend + gateway + provider; C concurrent connections through one
  gate (one mux link), each sends B bytes and reads the echo back, SHA-256 compared.
soak: both planes; mixed HTTP GETs and TCP echo sessions without pause, and the peers
  named by --restart killed with SIGKILL and started again in turn every S seconds.
  Every operation has a 30 s bound (a hang is counted as such).  RSS and open fds of the
  services that are never restarted are sampled every 30 s; failures are counted
  separately inside a restart window (kill to 15 s after the restart) and outside it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from benchmarks.loadgen import _HTTPConn
from benchmarks.procs import _die_with_parent, child_env, free_port, raise_nofile, read_json_line
from benchmarks.transfer import JWT_SECRET, TWISTD, mint_token, proc_status, wait_http

ROUTER = "5e" * 32
OP_TIMEOUT = 30.0


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class Service:
    """One process that can be killed and started again with the same command line."""

    def __init__(self, name: str, argv: list[str], env: dict, ready=None) -> None:
        self.name, self.argv, self.env, self.ready = name, argv, env, ready
        self.popen: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.popen = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True, preexec_fn=_die_with_parent)
        self.starts += 1
        if self.ready is not None:
            self.ready()

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def sample(self) -> dict:
        return {"rss_mib": round(proc_status(self.pid, "VmRSS") / 2**20, 1), "fds": fds(self.pid)}


def wait_port(port: int, timeout: float = 30) -> None:
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"127.0.0.1:{port} not listening after {timeout} s")


class Topology:
    def __init__(self, http: bool, ports: bool) -> None:
        self.services: dict[str, Service] = {}
        self.backends: list[subprocess.Popen] = []
        env = child_env(PIPEGATE_JWT_SECRET=JWT_SECRET, PIPEGATE_ROUTER=ROUTER)
        self.env = env
        if http:
            app = self._backend("small-http")
            self.app_port = app["http"]
            self.relay_port = free_port()
            self.add("relay", ["pipegate-server", "--listen", f"tcp:{self.relay_port}:interface=127.0.0.1"],
                     lambda: wait_http(self.relay_port, "/healthz"))
            token = mint_token(env, "bench")
            self.add("connector", ["pipegate-client", "--token", token, f"http://127.0.0.1:{self.app_port}",
                                   f"ws://127.0.0.1:{self.relay_port}/bench"],
                     lambda: wait_http(self.relay_port, "/bench/ready", timeout=60))
        if ports:
            echo = self._backend("echo")
            self.mux, self.gate = free_port(), free_port()
            self.add("gateway", ["pipegate-gateway", "--mux", f"tcp:{self.mux}:interface=127.0.0.1",
                                 "--listen", "127.0.0.1",
                                 # every client is 127.0.0.1: no per-IP caps or rate (the totals still apply)
                                 "--max-conns-per-ip", "0", "--conn-rate-per-ip", "0", "--max-flows-per-ip", "0"], lambda: wait_port(self.mux))
            services = json.dumps([{"gatePort": self.gate, "serviceHost": "127.0.0.1",
                                    "servicePort": echo["tcp"], "protocol": "tcp"}])
            self.add("provider", ["pipegate-provider", "--services", services,
                                  "--connect", f"tcp:127.0.0.1:{self.mux}", "--max-backends-per-ip", "0"],
                     lambda: wait_port(self.gate, 60))

    def _backend(self, kind: str) -> dict:
        popen = subprocess.Popen([sys.executable, "-m", "benchmarks.backends", kind], stdout=subprocess.PIPE,
                                 text=True, env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        self.backends.append(popen)
        return json.loads(read_json_line(popen))

    def add(self, name: str, args: list[str], ready) -> None:
        service = Service(name, TWISTD + ["-n", "--pidfile=", "-l", "/dev/null"] + args, self.env, ready)
        self.services[name] = service
        service.start()

    def stop(self) -> None:
        for service in reversed(list(self.services.values())):
            service.kill(signal.SIGTERM)
        for popen in self.backends:
            popen.kill()
            popen.wait()


# -- load generators (asyncio, in this process) --------------------------------------------

async def http_get(conn: _HTTPConn, path: bytes) -> int:
    conn.waiter = asyncio.get_running_loop().create_future()
    conn.transport.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    return await asyncio.wait_for(conn.waiter, OP_TIMEOUT)


async def open_http(port: int) -> _HTTPConn:
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(loop.create_connection(_HTTPConn, "127.0.0.1", port), OP_TIMEOUT)
    return conn


async def tcp_echo(port: int, payload: bytes, finished: list | None = None) -> bool:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), OP_TIMEOUT)
    try:
        async def send():
            for i in range(0, len(payload), 65536):
                writer.write(payload[i:i + 65536])
                await writer.drain()
        sender = asyncio.ensure_future(send())
        got = hashlib.sha256()
        left = len(payload)
        try:
            while left > 0:
                chunk = await asyncio.wait_for(reader.read(min(left, 1 << 20)), OP_TIMEOUT)
                if not chunk:
                    break
                got.update(chunk)
                left -= len(chunk)
            await sender
        finally:
            if not sender.done():
                sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        if finished is not None:
            finished.append(time.monotonic())
        return left == 0 and got.digest() == hashlib.sha256(payload).digest()
    finally:
        writer.close()


def app_requests(port: int) -> int:
    import socket
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /_stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])["requests"]


# -- scenarios -------------------------------------------------------------------------------

async def http_load(topo: Topology, total: int, concurrency: int) -> dict:
    relay, connector = topo.services["relay"], topo.services["connector"]
    base = app_requests(topo.app_port)
    done = errors = 0
    statuses: dict[int, int] = {}
    samples = {}
    path = b"/bench/load"
    next_id = 0
    start = time.monotonic()

    async def worker():
        nonlocal done, errors, next_id
        conn = await open_http(topo.relay_port)
        while next_id < total:
            next_id += 1
            try:
                status = await http_get(conn, path)
            except Exception:
                errors += 1
                conn.transport.abort()
                conn = await open_http(topo.relay_port)
                continue
            statuses[status] = statuses.get(status, 0) + 1
            done += 1
            if done == 10_000:
                samples["after_first_10000"] = {s.name: s.sample() for s in (relay, connector)}
        conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    samples["after_last"] = {s.name: s.sample() for s in (relay, connector)}
    served = app_requests(topo.app_port) - base
    return {"scenario": "http-load", "requests": total, "concurrency": concurrency, "answered": done,
            "statuses": statuses, "errors": errors, "app_served": served, "seconds": round(elapsed, 1),
            "rate": round(done / elapsed), "memory": samples}


async def tcp_channels(topo: Topology, channels: int, size: int) -> dict:
    gateway, provider = topo.services["gateway"], topo.services["provider"]
    before = {s.name: s.sample() for s in (gateway, provider)}
    start = time.monotonic()
    payloads = [hashlib.sha256(b"%d" % i).digest() * (size // 32) for i in range(8)]
    finished: list[float] = []
    results = await asyncio.gather(*(tcp_echo(topo.gate, payloads[i % 8], finished) for i in range(channels)),
                                   return_exceptions=True)
    elapsed = time.monotonic() - start
    finished = sorted(t - start for t in finished)
    ok = sum(1 for r in results if r is True)
    failures = [repr(r) for r in results if r is not True][:5]
    return {"scenario": "tcp-channels", "channels": channels, "bytes_each": size, "byte_exact": ok,
            "failed": channels - ok, "first_failures": failures, "seconds": round(elapsed, 1),
            "mb_per_s_each_way": round(ok * size / elapsed / 1e6, 1),
            "finished_at_s": {"first": round(finished[0], 1) if finished else None,
                              "median": round(finished[len(finished) // 2], 1) if finished else None,
                              "last": round(finished[-1], 1) if finished else None},
            "before": before,
            "after": {s.name: s.sample() for s in (gateway, provider)}}


async def soak(topo: Topology, minutes: float, restart_every: float, restart: list[str]) -> dict:
    end = time.monotonic() + minutes * 60
    counts = {"http_ok": 0, "http_fail_in_window": 0, "http_fail_outside": 0, "http_hung": 0,
              "tcp_ok": 0, "tcp_fail_in_window": 0, "tcp_fail_outside": 0, "tcp_hung": 0, "restarts": 0}
    window_until = 0.0
    survivors = [s for name, s in topo.services.items() if name not in restart]
    samples = []

    def in_window() -> bool:
        return time.monotonic() < window_until

    async def http_worker():
        conn = None
        while time.monotonic() < end:
            try:
                if conn is None or conn.broken:
                    conn = await open_http(topo.relay_port)
                status = await http_get(conn, b"/bench/soak")
                if status == 200:
                    counts["http_ok"] += 1
                    continue
                counts["http_fail_in_window" if in_window() else "http_fail_outside"] += 1
            except asyncio.TimeoutError:
                counts["http_hung"] += 1
                conn = None
            except Exception:
                counts["http_fail_in_window" if in_window() else "http_fail_outside"] += 1
                conn = None
                await asyncio.sleep(0.2)

    async def tcp_worker(seed: int):
        payload = hashlib.sha256(b"%d" % seed).digest() * 2048   # 64 KiB
        while time.monotonic() < end:
            try:
                ok = await tcp_echo(topo.gate, payload)
                if ok:
                    counts["tcp_ok"] += 1
                    continue
                counts["tcp_fail_in_window" if in_window() else "tcp_fail_outside"] += 1
            except asyncio.TimeoutError:
                counts["tcp_hung"] += 1
            except Exception:
                counts["tcp_fail_in_window" if in_window() else "tcp_fail_outside"] += 1
            await asyncio.sleep(0.2)

    async def restarter():
        nonlocal window_until
        turn = 0
        while time.monotonic() + restart_every < end:
            await asyncio.sleep(restart_every)
            if not restart:
                continue
            service = topo.services[restart[turn % len(restart)]]
            turn += 1
            window_until = float("inf")
            service.kill()
            await asyncio.get_running_loop().run_in_executor(None, service.start)
            window_until = time.monotonic() + 15
            counts["restarts"] += 1

    async def sampler():
        while time.monotonic() < end:
            samples.append({"t": round(minutes * 60 - (end - time.monotonic())),
                            **{s.name: s.sample() for s in survivors}})
            await asyncio.sleep(30)

    await asyncio.gather(*(http_worker() for _ in range(10)), *(tcp_worker(i) for i in range(5)),
                         restarter(), sampler())
    samples.append({"t": round(minutes * 60), **{s.name: s.sample() for s in survivors}})
    return {"scenario": "soak", "minutes": minutes, "restart_every_s": restart_every, "restarted": restart,
            "counts": counts, "survivors": [s.name for s in survivors], "first_sample": samples[0],
            "sample_after_warmup": samples[min(2, len(samples) - 1)], "last_sample": samples[-1],
            "samples": samples}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("http-load")
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--op-timeout", type=float, default=30.0,
                        help="seconds one operation (connect, one read, one request) may take")
    p = sub.add_parser("tcp-channels")
    p.add_argument("--channels", type=int, default=2_000)
    p.add_argument("--bytes", type=int, default=1 << 20)
    p = sub.add_parser("soak")
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--restart-every", type=float, default=20)
    p.add_argument("--restart", default="connector,provider")
    args = parser.parse_args(argv)
    global OP_TIMEOUT
    OP_TIMEOUT = args.op_timeout
    raise_nofile()
    topo = Topology(http=args.scenario in ("http-load", "soak"), ports=args.scenario in ("tcp-channels", "soak"))
    try:
        if args.scenario == "http-load":
            result = asyncio.run(http_load(topo, args.requests, args.concurrency))
            ok = (result["answered"] == args.requests and result["errors"] == 0
                  and result["statuses"] == {200: args.requests} and result["app_served"] == args.requests)
        elif args.scenario == "tcp-channels":
            result = asyncio.run(tcp_channels(topo, args.channels, args.bytes))
            ok = result["failed"] == 0
        else:
            restart = [n for n in args.restart.split(",") if n]
            result = asyncio.run(soak(topo, args.minutes, args.restart_every, restart))
            c = result["counts"]
            ok = c["http_fail_outside"] == 0 and c["tcp_fail_outside"] == 0 and not c["http_hung"] \
                and not c["tcp_hung"]
    finally:
        topo.stop()
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
