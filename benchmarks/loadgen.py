"""
Small Python clients for what wrk and iperf3 do not measure.

- L{OpenLoop}: HTTP GETs at a fixed rate, open loop (wrk2-style).  Debian's wrk 4.1 has
  no C{-R} option and wrk2 is not packaged, so requests are *scheduled* at exact
  intervals of 1/rate on up to C{max_conns} keep-alive connections, and each latency
  is measured from the request's scheduled time, not from when it could be sent: when
  the tunnel falls behind, the queueing delay shows in the latency (no coordinated
  omission), as with wrk2.  The generator runs on asyncio in the harness process.
- L{connect_latency}: N sequential connect + 1-byte echo + close.
- L{udp_request_response}: DNS-sized UDP request/response, closed loop, several flows.
- L{IdleConnections}: many concurrent TCP connections that each echo once, stay idle,
  and are checked again later.
"""

from __future__ import annotations

import asyncio
import collections
import math
import selectors
import socket
import time


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of C{values}."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


class _HTTPConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; answers are framed by Content-Length."""

    def __init__(self) -> None:
        self.transport = None
        self.buf = b""
        self.need: int | None = None
        self.status = 0
        self.waiter: asyncio.Future | None = None
        self.broken = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.waiter is not None:
            if self.need is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end].lower()
                self.status = int(head[9:12])
                i = head.find(b"\r\ncontent-length:")
                length = int(head[i + 17:].split(b"\r\n", 1)[0]) if i >= 0 else 0
                self.need = end + 4 + length
            if len(self.buf) < self.need:
                return
            self.buf = self.buf[self.need:]
            self.need = None
            waiter, self.waiter = self.waiter, None
            if not waiter.done():
                waiter.set_result(self.status)

    def connection_lost(self, exc) -> None:
        self.broken = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))


class OpenLoop:
    """Fixed-rate GETs to http://127.0.0.1:PORT/PATH, latency from the scheduled send time."""

    def __init__(self, port: int, path: str, max_conns: int = 100, timeout: float = 5.0) -> None:
        self.port = port
        self.request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        self.max_conns = max_conns
        self.timeout = timeout
        self.idle: list[_HTTPConn] = []
        self.waiting: collections.deque = collections.deque()
        self.open_conns = 0

    async def _get(self) -> _HTTPConn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.broken:
                return conn
            self.open_conns -= 1
        if self.open_conns < self.max_conns:
            self.open_conns += 1
            try:
                _, conn = await asyncio.get_running_loop().create_connection(_HTTPConn, "127.0.0.1", self.port)
            except BaseException:
                self.open_conns -= 1
                raise
            return conn
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        return await fut

    def _put(self, conn: _HTTPConn) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self.idle.append(conn)

    def _drop(self, conn: _HTTPConn | None) -> None:
        if conn is not None:
            self.open_conns -= 1
            if conn.transport is not None:
                conn.transport.abort()
        # someone may be waiting for a connection that will now never come back
        if self.waiting and self.open_conns < self.max_conns:
            asyncio.ensure_future(self._refill())

    async def _refill(self) -> None:
        try:
            self.open_conns += 1
            _, conn = await asyncio.get_running_loop().create_connection(_HTTPConn, "127.0.0.1", self.port)
        except OSError:
            self.open_conns -= 1
            return
        self._put(conn)

    async def _one(self, scheduled: float, out: dict) -> None:
        loop = asyncio.get_running_loop()
        conn = None
        try:
            conn = await self._get()
            conn.waiter = loop.create_future()
            conn.transport.write(self.request)
            status = await conn.waiter
            out["latencies"].append(loop.time() - scheduled)
            out["last"] = loop.time()
            if status != 200:
                out["errors"] += 1
            self._put(conn)
        except asyncio.CancelledError:
            out["timeouts"] += 1
            self._drop(conn)
        except Exception:
            out["errors"] += 1
            self._drop(conn)

    async def run(self, rate: float, duration: float) -> dict:
        loop = asyncio.get_running_loop()
        out = {"latencies": [], "errors": 0, "timeouts": 0, "last": None}
        total = max(1, int(rate * duration))
        start = loop.time() + 0.01
        tasks = []
        i = 0
        while i < total:
            now = loop.time()
            while i < total and start + i / rate <= now:
                tasks.append(loop.create_task(self._one(start + i / rate, out)))
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        _, pending = await asyncio.wait(tasks, timeout=self.timeout) if tasks else (None, ())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        lat = out["latencies"]
        elapsed = (out["last"] or loop.time()) - start
        return {
            "offered_rps": rate, "requests": total, "completed": len(lat),
            "achieved_rps": round(len(lat) / elapsed, 1) if elapsed > 0 else None,
            "errors": out["errors"], "timeouts": out["timeouts"],
            "p50_ms": _ms(percentile(lat, 50)), "p90_ms": _ms(percentile(lat, 90)),
            "p99_ms": _ms(percentile(lat, 99)), "max_ms": _ms(max(lat) if lat else None),
            "connections": self.open_conns,
        }

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle = []


def fixed_rate(port: int, path: str, rate: float, duration: float, warmup: float = 1.0,
               max_conns: int = 100) -> dict:
    """One open-loop run (after an unrecorded warm-up at the same rate)."""
    async def main():
        gen = OpenLoop(port, path, max_conns=max_conns)
        try:
            if warmup > 0:
                await gen.run(rate, warmup)
            return await gen.run(rate, duration)
        finally:
            gen.close()
    return asyncio.run(main())


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def connect_echo(port: int) -> float:
    """One connect + 1-byte echo + close to 127.0.0.1:PORT, TCP_NODELAY on: its seconds (OSError if it fails)."""
    start = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise OSError("no echo")
    finally:
        s.close()
    return time.perf_counter() - start


def connect_latency(port: int, n: int, warmup: int = 20, budget: float | None = None) -> dict:
    """N sequential connect + 1-byte echo + close to 127.0.0.1:PORT (fewer if C{budget} seconds run out)."""
    lat = []
    errors = 0
    deadline = None if budget is None else time.monotonic() + budget
    for i in range(warmup + n):
        if deadline is not None and i > warmup and time.monotonic() > deadline:
            break
        try:
            seconds = connect_echo(port)
        except OSError:
            if i >= warmup:
                errors += 1
            continue
        if i >= warmup:
            lat.append(seconds)
    return {"n": n, "measured": len(lat), "errors": errors, "p50_ms": _ms(percentile(lat, 50)), "p90_ms": _ms(percentile(lat, 90)),
            "p99_ms": _ms(percentile(lat, 99)), "max_ms": _ms(max(lat) if lat else None),
            "mean_ms": _ms(sum(lat) / len(lat) if lat else None)}


def udp_request_response(port: int, duration: float, *, flows: int = 16, size: int = 64,
                         warmup: float = 0.5, timeout: float = 0.5) -> dict:
    """
    A DNS-sized request/response loop: C{flows} UDP sockets (one source port each, so
    one flow each at a gate), each sending a C{size}-byte datagram and the next one as
    soon as the echo comes back, for C{duration} seconds after C{warmup}.  A request
    without an answer after C{timeout} counts as lost and the flow sends a new one.
    """
    sel = selectors.DefaultSelector()
    socks = []
    sent_at: dict = {}
    seq: dict = {}
    pad = b"q" * max(0, size - 8)
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
        seq[s] = 0
        sel.register(s, selectors.EVENT_READ)
    lat: list[float] = []
    lost = answered = 0
    now = time.perf_counter
    start = now()
    measure_from = start + warmup
    end = measure_from + duration

    def send(s):
        seq[s] += 1
        sent_at[s] = now()
        try:
            s.send(seq[s].to_bytes(8, "big") + pad)
        except OSError:
            pass
    try:
        for s in socks:
            send(s)
        next_check = start + timeout / 4
        while True:
            t = now()
            if t >= end:
                break
            for key, _ in sel.select(timeout=min(0.05, end - t)):
                s = key.fileobj
                while True:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        break
                    except OSError:
                        break
                    if int.from_bytes(data[:8], "big") != seq[s]:
                        continue  # a late answer to a request counted as lost
                    t = now()
                    if t >= measure_from:
                        answered += 1
                        lat.append(t - sent_at[s])
                    send(s)
            t = now()
            if t >= next_check:
                next_check = t + timeout / 4
                for s in socks:
                    if t - sent_at[s] > timeout:
                        if t >= measure_from:
                            lost += 1
                        send(s)
    finally:
        for s in socks:
            sel.unregister(s)
            s.close()
        sel.close()
    return {"flows": flows, "size": size, "answered": answered, "lost": lost,
            "rps": round(answered / duration, 1), "p50_ms": _ms(percentile(lat, 50)),
            "p99_ms": _ms(percentile(lat, 99))}


class IdleConnections:
    """N concurrent TCP connections to 127.0.0.1:PORT, each proven by a 1-byte echo."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.socks: list[socket.socket] = []

    def open(self, n: int, batch: int = 32, timeout: float = 30.0) -> int:
        """Open C{n} more connections, in batches; return how many echoed."""
        ok = 0
        while n > 0:
            k = min(batch, n)
            fresh = []
            for _ in range(k):
                s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
                fresh.append(s)
            self.socks.extend(fresh)
            ok += self._echo(fresh, b"o", timeout)
            n -= k
        return ok

    def echo_all(self, timeout: float = 60.0, batch: int = 256) -> int:
        """Send one byte on every connection; return how many echoed it back."""
        ok = 0
        for i in range(0, len(self.socks), batch):
            ok += self._echo(self.socks[i:i + batch], b"e", timeout)
        return ok

    @staticmethod
    def _echo(socks: list[socket.socket], byte: bytes, timeout: float) -> int:
        sel = selectors.DefaultSelector()
        for s in socks:
            try:
                s.setblocking(True)
                s.sendall(byte)
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            except OSError:
                pass
        ok = 0
        deadline = time.monotonic() + timeout
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                s = key.fileobj
                try:
                    data = s.recv(16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data == byte:
                    ok += 1
                sel.unregister(s)
        sel.close()
        return ok

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []
