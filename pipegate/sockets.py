"""
The TCP socket under a transport, and what the tunnels do to it: Nagle off, and
sending a link's frames when they are written rather than on the reactor's next turn.

Why L{send_now}: Twisted's TCP transport queues every C{write} and sends the queue
when the reactor next polls and finds the socket writable, that is after it has
handled every other ready socket of this turn.  For a link that carries many
requests this serialises the tunnel: the relay reads 50 public requests, and only
after the last one does the connector get the first; the connector answers 50,
and only then does the relay get any answer.  Each process idled while the other
worked (30-40 % of the two cores idle under C{wrk -c50}).  Links send each batch
of frames as soon as it is written, so the next hop starts on the first request
while this one is still reading the rest (benchmarks/README.md).
"""

from __future__ import annotations

from twisted.internet.abstract import FileDescriptor


def socket_transport(transport):
    """The TCP transport under C{transport} (through TLS or a wrapper), or None."""
    # Not hasattr(..., "setTcpNoDelay"): protocol wrappers such as TLS delegate it.
    while transport is not None and not isinstance(transport, FileDescriptor):
        transport = getattr(transport, "transport", None)
    return transport


def no_delay(transport) -> None:
    """Turn Nagle off on the TCP socket under C{transport} (through TLS or a wrapper)."""
    transport = socket_transport(transport)
    if transport is not None:
        try:
            transport.setTcpNoDelay(True)
        except OSError:
            pass


def send_now(transport) -> None:
    """
    Hand what C{transport} holds to the kernel now instead of at the reactor's next
    turn.  Use it on a socket with Nagle off, after writing a batch of frames.

    Through TLS the records that Twisted's buffering TLS layer holds for the next turn
    are written first.  What the socket does not take stays queued for the reactor,
    as after any write.  Nothing is done while the socket has a producer registered
    (its C{doWrite} could resume that producer from inside this call) or once it is
    closing; a send error is left for the reactor, whose next C{doWrite} meets it
    again and closes the connection the usual way.
    """
    while transport is not None and not isinstance(transport, FileDescriptor):
        # twisted.protocols.tls.BufferingTLSTransport keeps small writes for one turn.
        aggregator = getattr(transport, "_aggregator", None)
        if aggregator is not None:
            aggregator.flush()
        transport = getattr(transport, "transport", None)
    if (transport is None or not transport.connected or transport.disconnecting
            or transport.producer is not None):
        return
    transport.doWrite()
