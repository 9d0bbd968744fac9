"""
The port plane's per-message Python path, without sockets or TLS, for counting
instructions (repeatable on a busy machine, unlike time):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m benchmarks.mux_path 0
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m benchmarks.mux_path 200

(difference of the two "Collected" counts) / (200 x 50) = instructions per message.  One
message: a service's reply read by a channel and sent as a DATA frame, plus a DATA frame
read by the link and written to its channel's socket: what each of gateway and provider
does per request under redis-benchmark -P 1.  50 channels on one link (redis-benchmark's
-c 50); each round, each channel reads one reply and the link reads one batch of 50
frames.  Transports are twisted.internet.testing.StringTransport.
"""

from __future__ import annotations

import sys

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pipegate.core.window import INITIAL_WINDOW
from pipegate.mux import frames
from pipegate.mux.channel import StreamChannel
from pipegate.mux.session import LinkConfig, MuxLink
from tests.support import NullNode

CHANNELS = 50


def run(rounds: int) -> None:
    link = MuxLink(NullNode(), LinkConfig(secret=b"s" * 32, role=frames.ROLE_PROVIDER), Clock(), True)
    link_transport = StringTransport()
    link.makeConnection(link_transport)
    link.admitted = True  # (admission is not per message)
    channels = []
    for channel_id in range(1, CHANNELS + 1):
        channel = StreamChannel(window=INITIAL_WINDOW)
        channel.makeConnection(StringTransport())
        link.bind_channel(channel_id, channel)
        channel.attach(link, channel_id)
        channels.append(channel)
    reply = b"$3\r\nabc\r\n"
    batch = b"".join(frames.encode(frames.Data(c, b"*1\r\n$3\r\nGET\r\n")) for c in range(1, CHANNELS + 1))
    for i in range(rounds):
        for channel in channels:
            channel.dataReceived(reply)
        link.dataReceived(batch)
        if i % 20 == 0:
            link_transport.clear()
            for channel in channels:
                channel.transport.clear()


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
