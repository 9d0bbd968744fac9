"""
What a mux link does to the sockets under it and the channels it writes to: its socket's
write buffer (L{link_write_buffer}), and which channels take a DATA payload as a view of
the read it came in (L{takes_views}).
"""

from __future__ import annotations

from twisted.protocols.policies import ProtocolWrapper

from pipegate.mux.channel import StreamChannel
from pipegate.sockets import bounded_reads, socket_transport

# The link's socket buffers this much before it pauses its producer (with Twisted's 64 KiB,
# thousands of busy channels spent the link's time pausing and resuming each other).
LINK_WRITE_BUFFER = 4 * 1024 * 1024


def link_write_buffer(transport, size: int = LINK_WRITE_BUFFER) -> None:
    """
    Raise the write buffer of the socket under C{transport} (through TLS or wrappers),
    keeping its reads at READ_SIZE (127 KiB: L{pipegate.sockets.bounded_reads}).
    """
    transport = socket_transport(transport)
    if transport is not None:
        transport.bufferSize = max(transport.bufferSize, size)
        bounded_reads(transport)


_STREAM_PAYLOAD = StreamChannel.payload_received
_STREAM_PIECES = StreamChannel.pieces_received
_WRAPPER_WRITE = ProtocolWrapper.write
_WRAPPER_WRITE_SEQUENCE = ProtocolWrapper.writeSequence


def _takes(transport, name: str, wrapped) -> bool:
    # Whether transport's write method C{name}, through pass-through wrappers, takes views.
    write = getattr(transport, name, None)
    while getattr(write, "__func__", None) is wrapped:
        write = getattr(write.__self__.transport, name, None)
    return getattr(getattr(write, "__func__", None), "takes_views", False) is True


def takes_views(channel) -> bool:
    """
    Whether C{channel} may be given a DATA payload as a read-only memoryview of a link read
    (L{pipegate.mux.decoder.FrameDecoder}'s C{views}) instead of bytes, or several as their pieces
    (L{deliver_views}): a L{StreamChannel} whose C{payload_received} and C{pieces_received} are its
    own (it writes the payload to its socket and keeps nothing), over a socket whose C{write} and
    C{writeSequence} take views (L{pipegate.sockets.eager_writes}: what the kernel does not take at
    once it queues as bytes), found through pass-through C{ProtocolWrapper}s such as the gateway's
    C{ConnectionGate}.  Anything else (a wrapper with a C{write} of its own, such as a rate shaper,
    which may hold what it is given) gets bytes.
    """
    kind = type(channel)
    if getattr(kind, "payload_received", None) is not _STREAM_PAYLOAD or (
            getattr(kind, "pieces_received", None) is not _STREAM_PIECES):
        return False
    transport = channel.transport
    return (_takes(transport, "write", _WRAPPER_WRITE)
            and _takes(transport, "writeSequence", _WRAPPER_WRITE_SEQUENCE))


def deliver_views(channel, channel_id: int, payload) -> int:
    """
    Give C{channel} (or None: a channel not open) a DATA payload that the decoder gave as a view
    of the read, or the payloads of one channel's consecutive DATA of a read as one list of
    pieces (L{pipegate.mux.decoder.FrameDecoder}), and return its size.  To a channel that
    L{takes_views} as they are (pieces in one C{pieces_received}: one credit check, one
    C{sendmsg}), else as bytes (pieces joined, as one payload).  Either way a group that overruns
    the channel's credit writes nothing.
    """
    if type(payload) is not list:
        if channel is not None:
            channel.payload_received(channel_id, payload if takes_views(channel) else payload.tobytes())
        return len(payload)
    size = 0
    for piece in payload:
        size += len(piece)
    if channel is not None:
        if takes_views(channel):
            channel.pieces_received(channel_id, payload, size)
        else:
            channel.payload_received(channel_id, b"".join(payload))
    return size
