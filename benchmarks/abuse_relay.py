"""
The relay attacks of issue 17, measured: run with a checkout on PYTHONPATH to measure that
code (the numbers in docs/reliability.md "Abuse" come from main before the fix and from
this branch after it):

    PYTHONPATH=/path/to/checkout python -m benchmarks.abuse_relay

Uses Relay, RelaySite, the connector and tests.support (its RawApp is the local app) in
process, and `twistd pipegate-server` as a child under RLIMIT_NOFILE 1024 (the systemd
default) for the fd attacks.  Loopback only; attackers on 127.0.0.2, bystanders 127.0.0.3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile

from twisted.internet import defer, reactor, task

from tests.support import SECRET, Loopback, RawApp, connect_raw, free_port, limited_twistd, raw_request

ATTACKER, BYSTANDER = "127.0.0.2", "127.0.0.3"
UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"


class Cleanups:
    def __init__(self):
        self.calls = []

    def addCleanup(self, f, *a):
        self.calls.append((f, a))

    async def run(self):
        for f, a in reversed(self.calls):
            r = f(*a)
            if hasattr(r, "__await__") and not isinstance(r, defer.Deferred):
                r = defer.Deferred.fromCoroutine(r)
            if isinstance(r, defer.Deferred):
                await r


async def sleep(s):
    await task.deferLater(reactor, s, lambda: None)


async def wait(pred, timeout):
    for _ in range(int(timeout / 0.05)):
        if pred():
            return True
        await sleep(0.05)
    return pred()


async def in_process(results):
    c = Cleanups()
    loop = Loopback(c)
    try:
        app = RawApp()
        app_port = await loop.listen(app)
        relay, port = await loop.relay(request_timeout=300, access_log=True)
        await loop.connector(port, app_port, "t1")
        from twisted.logger import formatEvent, globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)

        # 1. smuggling after a refused upgrade
        p = await connect_raw(port, b"GET /t1/no HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n", ATTACKER)
        await wait(lambda: b"hello" in p.received, 5)
        if not p.done.called:
            p.transport.write(b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait(lambda: len(app.heads) >= 2 or app.after or p.done.called, 3)
        smuggled = [h.split(b"\r\n")[0].decode() for h in app.heads[1:] + app.after]
        results["1 smuggling: heads the app saw after a refused upgrade"] = smuggled or "none (closed)"
        if not p.done.called:
            p.transport.abortConnection()

        # 14. pipelined upgrade + request in one write
        p = await connect_raw(port, b"GET /t1/no HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n"
                              b"GET /t1/ok HTTP/1.1\r\nHost: x\r\n\r\n", ATTACKER)
        closed = await wait(lambda: p.done.called, 10)
        results["14 pipelined: answers / closed within 10 s"] = (p.received.count(b"HTTP/1.1 "), closed)
        if not p.done.called:
            p.transport.abortConnection()

        # 12. access line for an upgraded connection
        p = await connect_raw(port, b"GET /t1/ws HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n", ATTACKER)
        await wait(lambda: b"101" in p.received, 5)
        p.transport.write(b"abc")
        await sleep(0.2)
        p.transport.loseConnection()
        await sleep(0.5)
        results["12 access lines for one upgraded connection"] = sum(
            "/t1/ws" in formatEvent(e) for e in events)
        globalLogPublisher.removeObserver(events.append)

        # 5. bytes a caller may send to an unknown tunnel before the answer
        p = await connect_raw(port, b"POST /nobody/x HTTP/1.1\r\nHost: x\r\n" + UPGRADE
                              + b"Content-Length: 52428800\r\n\r\n", ATTACKER)
        sent = 0
        chunk = b"x" * 65536
        while sent < 52428800 and not p.received and not p.done.called:
            p.transport.write(chunk)
            sent += len(chunk)
            await sleep(0)
        await wait(lambda: p.received or p.done.called, 10)
        results["5 body bytes sent to an unknown tunnel before the answer"] = (sent, bytes(p.received[:12]))
        p.transport.abortConnection()

        # 2. 100 idle upgrade requests from one IP vs a bystander
        held = [await connect_raw(port, b"GET /t1/silent HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n", ATTACKER)
                for _ in range(100)]
        await sleep(1)
        raw = await raw_request(port, b"GET /t1/ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", BYSTANDER)
        results["2 bystander after 100 idle upgrades from one IP"] = raw.split(b"\r\n")[0].decode()
        for h in held:
            h.transport.abortConnection()
        await sleep(0.5)
    finally:
        await c.run()


async def child_relay(nofile, *options):
    """C{twistd pipegate-server} under RLIMIT_NOFILE C{nofile}, its output in a temporary file;
    returns once /healthz answers."""
    port = free_port()
    output = tempfile.TemporaryFile()
    proc = subprocess.Popen(limited_twistd(nofile) + ["-n", "--pidfile=", "pipegate-server", "--listen",
                                                      f"tcp:{port}:interface=127.0.0.1", *options],
                            env=dict(os.environ, PIPEGATE_JWT_SECRET=SECRET), stdout=output,
                            stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            if b" 200 " in await raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
                break
        except Exception:
            await sleep(0.05)
    return port, proc, output


def stop(proc, output) -> bytes:
    """SIGKILL the child; return all it wrote."""
    proc.kill()
    proc.wait()
    output.seek(0)
    with output:
        return output.read()


async def healthz(port):
    try:
        d = raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", BYSTANDER)
        raw = await defer.Deferred.fromCoroutine(d).addTimeout(5, reactor)
        return raw.split(b"\r\n")[0].decode() or "closed without an answer"
    except Exception as e:
        return type(e).__name__


async def fds(results):
    port, proc, output = await child_relay(1024)
    protos = []
    for _ in range(1100):
        try:
            protos.append(await connect_raw(port, b"", ATTACKER))
        except Exception:
            break
    await sleep(1)
    answers = [await healthz(port) for _ in range(3)]
    results["9 bystander /healthz with 1,100 idle conns from one IP (nofile 1024)"] = answers
    for p in protos:
        p.transport.abortConnection()
    out = stop(proc, output)
    results["9 relay log: EMFILE lines / Unhandled / Traceback"] = (
        out.count(b"EMFILE"), out.count(b"Unhandled"), out.count(b"Traceback"))

    port, proc, output = await child_relay(4096)
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    os.kill(proc.pid, signal.SIGSTOP)
    connected = []
    for _ in range(200):
        d = defer.Deferred.fromCoroutine(connect_raw(port, b"", BYSTANDER))
        d.addCallbacks(connected.append, lambda f: None)
    await sleep(0.9)
    results["15 backlog / burst of 200 into a busy relay: connected within 0.9 s"] = (
        listening.split()[2], len(connected))
    os.kill(proc.pid, signal.SIGCONT)
    await sleep(0.5)
    for p in connected:
        p.transport.abortConnection()
    stop(proc, output)


async def main():
    results = {}
    await in_process(results)
    await fds(results)
    for k, v in results.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    task.react(lambda r: defer.Deferred.fromCoroutine(main()))
