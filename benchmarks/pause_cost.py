"""
What a mux link's pause used to cost per idle channel: N idle TCP connections accepted by a
Twisted reactor, and the time of one C{pauseProducing} + C{resumeProducing} of every one of
their transports (a reactor reader removed and added back each: an epoll_ctl call each way).

    python -m benchmarks.pause_cost [N]

Until the link stopped fanning its pauses out (pipegate/mux/session.py C{MuxLink.hold}),
every pause and resume of a link did this for every channel it carried, idle or not.
"""

from __future__ import annotations

import socket
import sys
import time

from twisted.internet import defer, protocol, reactor, task


def main(n: int) -> None:
    accepted = []

    class Idle(protocol.Protocol):
        def connectionMade(self):
            accepted.append(self)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Idle), interface="127.0.0.1", backlog=4096)
    clients = []

    async def run():
        for i in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port.getHost().port))
            clients.append(s)
            if i % 200 == 199:
                await task.deferLater(reactor, 0.01, lambda: None)
        while len(accepted) < n:
            await task.deferLater(reactor, 0.05, lambda: None)
        rounds = 10
        start = time.perf_counter()
        for _ in range(rounds):
            for p in accepted:
                p.transport.pauseProducing()
            for p in accepted:
                p.transport.resumeProducing()
        each = (time.perf_counter() - start) / rounds
        print(f"{n} idle connections: one pause + resume of every transport = {each * 1000:.1f} ms "
              f"({each / n * 1e6:.2f} us a connection)")
        for s in clients:
            s.close()
        await port.stopListening()

    def done(result):
        reactor.stop()
        return result
    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()).addBoth(done))
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
