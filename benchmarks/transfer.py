"""
1 GiB download and 1 GiB upload through a relay and a connector on 127.0.0.1.

Starts three processes (a local app, `twistd -n pipegate-server`, `twistd -n
pipegate-client`), streams the bodies with curl-free Python sockets, checks SHA-256,
and reports MB/s and the peak RSS (VmHWM) growth of the relay and the connector.

    python -m benchmarks.transfer [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

APP = r'''
import hashlib, sys
from twisted.internet import reactor
from twisted.web import server, resource
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

BLOCK = bytes(range(256)) * 256  # 64 KiB

@implementer(IPushProducer)
class Stream:
    def __init__(self, request, size):
        self.request, self.left, self.paused = request, size, False
        request.registerProducer(self, True)
        self.pump()
    def pump(self):
        while not self.paused and self.left > 0:
            n = min(len(BLOCK), self.left)
            self.left -= n
            self.request.write(BLOCK[:n])
        if self.left == 0 and not self.paused:
            self.left = -1
            self.request.unregisterProducer()
            self.request.finish()
    def pauseProducing(self): self.paused = True
    def resumeProducing(self):
        if self.left >= 0:
            self.paused = False
            self.pump()
    def stopProducing(self): self.left = -1

class Sink(server.Request):
    def gotLength(self, length):
        self.sha = hashlib.sha256()
        self.n = 0
        import io
        self.content = io.BytesIO()
    def handleContentChunk(self, data):
        self.sha.update(data)
        self.n += len(data)

class App(resource.Resource):
    isLeaf = True
    def render_GET(self, request):
        size = int(request.path.rsplit(b"/", 1)[1])
        request.setHeader(b"content-length", str(size).encode())
        Stream(request, size)
        return server.NOT_DONE_YET
    def render_POST(self, request):
        return ("%d %s" % (request.n, request.sha.hexdigest())).encode()

site = server.Site(App())
site.requestFactory = Sink
port = reactor.listenTCP(0, site, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
'''


def free_port() -> int:
    from benchmarks.procs import free_port   # (procs imports this module)
    return free_port()


def proc_status(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def wait_http(port: int, path: str, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if b" 200 " in s.recv(100):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for 127.0.0.1:{port}{path}")


def expected_sha(size: int) -> str:
    block = bytes(range(256)) * 256
    h = hashlib.sha256()
    left = size
    while left > 0:
        n = min(len(block), left)
        h.update(block[:n])
        left -= n
    return h.hexdigest()


def download(port: int, size: int) -> tuple[float, str]:
    h = hashlib.sha256()
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET /bench/big/{size} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, body = buf.split(b"\r\n\r\n", 1)
        h.update(body)
        got = len(body)
        while got < size:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
    return time.perf_counter() - start, h.hexdigest()


def upload(port: int, size: int) -> tuple[float, bytes]:
    block = bytes(range(256)) * 256
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"POST /bench/up HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
                  "Connection: close\r\n\r\n".encode())
        left = size
        while left > 0:
            n = min(len(block), left)
            s.sendall(block[:n])
            left -= n
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return time.perf_counter() - start, answer.split(b"\r\n\r\n", 1)[-1]


TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
JWT_SECRET = "benchmark-secret-" + "x" * 32


def relay_env(base: dict | None = None) -> dict:
    return dict(os.environ if base is None else base, PIPEGATE_JWT_SECRET=JWT_SECRET)


def start_app(popen, source: str = APP, **kwargs) -> tuple[subprocess.Popen, int]:
    """Start a local app (Python source that prints its port); return it and the port."""
    app = popen([sys.executable, "-c", source], stdout=subprocess.PIPE, text=True, **kwargs)
    return app, int(app.stdout.readline())


def start_relay(popen, env: dict, twistd_opts=("-l", "/dev/null"), extra_args=(), twistd=TWISTD,
                **kwargs) -> tuple[subprocess.Popen, int]:
    """Start C{twistd -n pipegate-server} on a free port of 127.0.0.1; wait for /healthz."""
    relay_port = free_port()
    relay = popen(twistd + ["-n", "--pidfile=", *twistd_opts, "pipegate-server",
                            "--listen", f"tcp:{relay_port}:interface=127.0.0.1", *extra_args], env=env, **kwargs)
    wait_http(relay_port, "/healthz")
    return relay, relay_port


def mint_token(env: dict, connection_id: str = "bench") -> str:
    return subprocess.run([sys.executable, "-m", "pipegate", "token", "-c", connection_id], env=env,
                          capture_output=True, text=True, check=True).stdout.split()[-1]


def start_connector(popen, env: dict, app_port: int, relay_port: int, connection_id: str = "bench",
                    twistd_opts=("-l", "/dev/null"), ready_path: str = "/big/1", extra_args=(), twistd=TWISTD,
                    **kwargs) -> subprocess.Popen:
    """Start C{twistd -n pipegate-client} for the app; wait until the tunnel answers 200."""
    token = mint_token(env, connection_id)
    connector = popen(twistd + ["-n", "--pidfile=", *twistd_opts, "pipegate-client",
                                "--token", token, *extra_args, f"http://127.0.0.1:{app_port}",
                                f"ws://127.0.0.1:{relay_port}/{connection_id}"], env=env, **kwargs)
    wait_http(relay_port, f"/{connection_id}{ready_path}")
    return connector


@contextlib.contextmanager
def children():
    """
    Yield a C{popen(argv, **kwargs)} that starts a child and remembers it; on leaving the
    block, whatever ends it, every child gets SIGTERM, and SIGKILL if still there 10 s later.
    """
    procs: list[subprocess.Popen] = []

    def popen(argv, **kwargs) -> subprocess.Popen:
        procs.append(subprocess.Popen(argv, **kwargs))
        return procs[-1]

    try:
        yield popen
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def save_result(name: str, result) -> None:
    """Write C{result} as JSON to benchmarks/results/NAME.json."""
    directory = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    env = relay_env()
    with children() as popen:
        app, app_port = start_app(popen)
        relay, relay_port = start_relay(popen, env)
        connector = start_connector(popen, env, app_port, relay_port)
        base = {"relay": proc_status(relay.pid, "VmRSS"), "connector": proc_status(connector.pid, "VmRSS")}
        seconds, digest = download(relay_port, size)
        down_ok = digest == expected_sha(size)
        up_seconds, answer = upload(relay_port, size)
        up_ok = answer.decode() == f"{size} {expected_sha(size)}"
        peak = {"relay": proc_status(relay.pid, "VmHWM"), "connector": proc_status(connector.pid, "VmHWM")}
    result = {
        "size_mib": args.size_mib,
        "download": {"seconds": round(seconds, 2), "mb_per_s": round(size / seconds / 1e6, 1),
                     "sha256_ok": down_ok},
        "upload": {"seconds": round(up_seconds, 2), "mb_per_s": round(size / up_seconds / 1e6, 1),
                   "sha256_ok": up_ok},
        "rss_before_mib": {k: round(v / 2**20, 1) for k, v in base.items()},
        "peak_rss_growth_mib": {k: round((peak[k] - base[k]) / 2**20, 1) for k in base},
    }
    print(json.dumps(result, indent=2))
    save_result("transfer", result)
    return 0 if down_ok and up_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
