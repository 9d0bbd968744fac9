"""
The mux link's TLS layer (pipegate/mux/tls.py: LinkTLSProtocol, with whole writes)
against Twisted's stock TLS layer (TLSMemoryBIOFactory: BufferingTLSTransport), on one
TLS connection over 127.0.0.1:

    python -m benchmarks.tls_link [--repeat 3] [--mib 1024] [--rounds 10000]

Each measurement runs in a fresh interpreter, the two layers alternating (link, stock,
stock, link, ...), and the medians are printed as one JSON line per layer:

- bulk: C{--mib} MiB written as full DATA frames (64 KiB, one write each), as fast as the
  producer is let, and decoded by the link's frame decoder at the other end; MB/s and
  CPU seconds per GB (both ends are in the one process: CPU is what the two spend);
- small: C{--rounds} rounds of 50 DATA frames of 40 bytes (50 channels' replies of one
  reactor turn), then L{pipegate.sockets.send_now}; the other end decodes them and sends
  each back as a DATA frame, then C{send_now}; the next round starts when the whole
  round is back.  Messages/s and CPU µs per message.

Both sockets get what a mux link gives its socket (Nagle off, eager writes, a 4 MiB
write buffer with 64 KiB reads), so only the TLS layer differs.

Times on a shared 2-core machine move by a third between runs; instruction counts do not:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python -m benchmarks.tls_link --count LAYER bulk N

runs the same workloads between StringTransports (no sockets, so no system calls are
counted): (instructions with N=200 - with N=0) / 200 = instructions per 64 KiB frame,
both ends together; C{small N} is N rounds of 50 frames echoed (divide by 50 N).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from twisted.internet import defer, protocol, ssl
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from tests.support import shuttle

LAYERS = ("link", "stock")
CHUNK = 65_536
SMALL = 40
BATCH = 50


def _prepare(transport) -> None:
    from pipegate.mux.linkio import link_write_buffer
    from pipegate.sockets import eager_writes, no_delay
    no_delay(transport)
    eager_writes(transport)
    link_write_buffer(transport)


def _factories(layer: str, server_app, client_app, clock=None):
    from pipegate.mux import tls
    cert = tls.generated_certificate()
    server_options = ssl.CertificateOptions(
        privateKey=cert.privateKey.original, certificate=cert.original, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    client_options = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    make = tls.LinkTLSFactory if layer == "link" else TLSMemoryBIOFactory
    return make(server_options, False, server_app, clock), make(client_options, True, client_app, clock)


class _Sink(protocol.Protocol):
    def __init__(self, total: int, done: defer.Deferred) -> None:
        from pipegate.mux.decoder import FrameDecoder
        self.total, self.done, self.received = total, done, 0
        self.decoder = FrameDecoder()

    def connectionMade(self) -> None:
        _prepare(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.decoder.feed(data)   # what the link does with what it reads
        if self.received >= self.total and not self.done.called:
            self.done.callback(None)


@implementer(IPushProducer)
class _Source(protocol.Protocol):
    def __init__(self, total: int, reactor) -> None:
        self.total, self.reactor, self.sent, self.paused = total, reactor, 0, False
        from pipegate.mux.frames import encode_data
        self.chunk = encode_data(1, [bytes(range(256)) * (CHUNK // 256)])   # one full DATA frame

    def connectionMade(self) -> None:
        _prepare(self.transport)
        self.transport.registerProducer(self, True)
        self.reactor.callLater(0, self.resumeProducing)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.total:
            self.transport.write(self.chunk)
            self.sent += len(self.chunk)

    def stopProducing(self) -> None:
        self.paused = True


class _Echo(protocol.Protocol):
    def connectionMade(self) -> None:
        from pipegate.mux.decoder import FrameDecoder
        _prepare(self.transport)
        self.decoder = FrameDecoder()

    def dataReceived(self, data: bytes) -> None:
        from pipegate.mux.frames import encode_data
        from pipegate.sockets import send_now
        for frame in self.decoder.feed(data):
            self.transport.write(encode_data(frame.channel, [frame.data]))
        send_now(self.transport)


class _Pinger(protocol.Protocol):
    def __init__(self, rounds: int, done: defer.Deferred) -> None:
        self.rounds, self.done, self.round, self.back = rounds, done, 0, 0
        from pipegate.mux.decoder import FrameDecoder
        from pipegate.mux.frames import encode_data
        self.decoder = FrameDecoder()
        self.messages = [encode_data(channel, [b"m" * SMALL]) for channel in range(1, BATCH + 1)]

    def connectionMade(self) -> None:
        _prepare(self.transport)
        self.send_round()

    def send_round(self) -> None:
        from pipegate.sockets import send_now
        for message in self.messages:
            self.transport.write(message)
        send_now(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.back += len(self.decoder.feed(data))
        if self.back >= BATCH:
            self.back -= BATCH
            self.round += 1
            if self.round >= self.rounds:
                if not self.done.called:
                    self.done.callback(None)
            else:
                self.send_round()


def _run(reactor, layer: str, server_proto, client_proto, done: defer.Deferred):
    from twisted.internet import endpoints
    server, client = _factories(layer, protocol.Factory.forProtocol(lambda: server_proto),
                                protocol.ClientFactory.forProtocol(lambda: client_proto))
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    started = {}

    def connected(_):
        started["wall"], started["cpu"] = time.perf_counter(), time.process_time()
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    server_proto.factory = server
    connecting = endpoint.connect(client)
    connecting.addCallback(connected)

    def finished(_):
        wall, cpu = time.perf_counter() - started["wall"], time.process_time() - started["cpu"]
        port.stopListening()
        client_proto.transport.abortConnection()
        return wall, cpu
    return done.addCallback(finished)


def one(layer: str, kind: str, mib: int, rounds: int) -> dict:
    from twisted.internet import reactor
    done: defer.Deferred = defer.Deferred()
    if kind == "bulk":
        total = mib * 1024 * 1024
        d = _run(reactor, layer, _Sink(total, done), _Source(total, reactor), done)
    else:
        d = _run(reactor, layer, _Echo(), _Pinger(rounds, done), done)
    out = {}

    def record(result):
        wall, cpu = result
        if kind == "bulk":
            out.update(mb_s=round(total / wall / 1e6, 1), cpu_s_per_gb=round(cpu / (total / 1e9), 3))
        else:
            n = rounds * BATCH
            out.update(msg_s=round(n / wall), cpu_us_per_msg=round(cpu / n * 1e6, 2))
        reactor.callLater(0.05, reactor.stop)

    def failed(f):
        out["error"] = f.getErrorMessage()
        reactor.stop()
    d.addCallbacks(record, failed)
    reactor.callLater(300, lambda: done.called or done.errback(RuntimeError("timed out")))
    reactor.run()
    return out


def count(layer: str, kind: str, n: int) -> None:
    """
    The same two workloads without sockets, for counting instructions (exact on a busy
    machine): both ends on StringTransports, bytes moved by hand; C{n} full DATA frames
    (each read whole by the other end) or C{n} rounds of 50 small frames echoed.
    """
    from twisted.internet import task
    from twisted.internet.testing import StringTransport
    clock = task.Clock()
    sink_done: defer.Deferred = defer.Deferred()
    if kind == "bulk":
        server_app, client_app = _Sink(1 << 62, sink_done), protocol.Protocol()
    else:
        server_app, client_app = _Echo(), _Pinger(n, sink_done)
    client_app.connectionMade = lambda: None   # (no socket settings, no first round yet)
    server_app.connectionMade = lambda: None
    if kind == "small":
        from pipegate.mux.decoder import FrameDecoder
        server_app.decoder = FrameDecoder()
    server, client = _factories(layer, protocol.Factory.forProtocol(lambda: server_app),
                                protocol.ClientFactory.forProtocol(lambda: client_app), clock)
    server, client = server.buildProtocol(None), client.buildProtocol(None)
    server_transport, client_transport = StringTransport(), StringTransport()
    server.makeConnection(server_transport)
    client.makeConnection(client_transport)

    def pump() -> None:
        shuttle(client, client_transport, server, server_transport, clock)
    pump()
    if kind == "bulk":
        from pipegate.mux.frames import encode_data
        frame = encode_data(1, [bytes(range(256)) * (CHUNK // 256)])
        for _ in range(n):
            client.write(frame)
            data = client_transport.value()
            client_transport.clear()
            server.dataReceived(data)
        assert server_app.received == n * len(frame), server_app.received
    elif n:
        client_app.send_round()   # the next round starts when this one is back
        pump()
        assert client_app.round == n, client_app.round


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tls_link")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=10000)
    parser.add_argument("--one", nargs=2, metavar=("LAYER", "KIND"), help=argparse.SUPPRESS)
    parser.add_argument("--count", nargs=3, metavar=("LAYER", "KIND", "N"),
                        help="no sockets, for valgrind --tool=callgrind (see the module's docstring)")
    args = parser.parse_args(argv)
    if args.count:
        count(args.count[0], args.count[1], int(args.count[2]))
        return {}
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.mib, args.rounds)), flush=True)
        return {}
    runs: dict = {layer: {"bulk": [], "small": []} for layer in LAYERS}
    for i in range(args.repeat):
        for kind in ("bulk", "small"):
            for layer in (LAYERS if i % 2 == 0 else LAYERS[::-1]):
                line = subprocess.run(
                    [sys.executable, "-m", "benchmarks.tls_link", "--one", layer, kind,
                     "--mib", str(args.mib), "--rounds", str(args.rounds)],
                    check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                result = json.loads(line)
                runs[layer][kind].append(result)
                print(layer, kind, json.dumps(result), file=sys.stderr, flush=True)
    medians = {}
    for layer in LAYERS:
        row = {}
        for kind in ("bulk", "small"):
            for key in runs[layer][kind][0]:
                row[key] = statistics.median(r[key] for r in runs[layer][kind])
        medians[layer] = row
        print(layer, json.dumps(row), flush=True)
    return medians


if __name__ == "__main__":
    main()
