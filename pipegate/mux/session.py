"""
One mux link: admission, frame dispatch, liveness, and the channels it carries.

The protocol sits inside Twisted's TLS layer.  When the TLS handshake completes it
sends its Hello, bound to this TLS session by the keying-material exporter; nothing
but a verified Hello is accepted before admission.  After admission the link is
symmetric: frames for channels go to the channel objects, everything else to the
node (the gateway or the provider that owns the link).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from pipegate._compat import write_now
from pipegate.core.budget import LogThrottle
from pipegate.dialer import Redialer
from pipegate.sockets import eager_writes, no_delay, send_now
from pipegate.stats import stats_of
from pipegate.mux import frames
from pipegate.mux.hello import EXPORTER_LABEL, hello_mac, verify_hello
from pipegate.mux.decoder import FrameDecoder
from pipegate.mux.linkio import deliver_views, link_write_buffer
from pipegate.mux.tls import LinkTLSProtocol, tls_failure
from pipegate.timers import cancel

ROLE_NAMES = {frames.ROLE_PROVIDER: "provider", frames.ROLE_GATEWAY: "gateway",
              frames.ROLE_OBSERVER: "observer"}


#: What a peer may have sent, and this side hold, before its Hello is whole (docs/protocol.md
#: 2.4): a Hello is 75 bytes.  Without it, a stranger that completes TLS could make a link hold a
#: frame up to max_frame_size (1 MiB) until the handshake timeout, on every connection the mux
#: listener's caps allow.
MAX_BEFORE_ADMISSION = 4096


@attrs.frozen
class LinkConfig:
    secret: bytes
    role: int
    max_frame_size: int = 1_048_576
    window: int = 262_144
    ping_interval: float = 10.0
    ping_deadline: float = 30.0
    handshake_timeout: float = 10.0
    max_channels: int = 10_000


class Node(TypingProtocol):
    """What a link needs from the service that owns it."""

    def link_admitted(self, link: MuxLink) -> None: ...

    def link_lost(self, link: MuxLink) -> None: ...

    def link_frame(self, link: MuxLink, frame) -> None: ...


class LinkOwner(TypingProtocol):
    """What a link tells the factory that built it (L{LinkFactory}) about itself; C{owner=None}: nobody."""

    # Lines about links that ended before admission go through this throttle, if any.
    unadmitted_log: LogThrottle | None

    def link_admitted(self, link: MuxLink) -> None: ...

    def link_refused(self, link: MuxLink, reason: str) -> None: ...

    def link_going_away(self, link: MuxLink) -> None: ...

    def link_closed(self, link: MuxLink) -> None: ...

    def peer_stopping(self) -> bool: ...


class LinkChannel:
    """An entry of a link's channel table (or one with these methods: L{StreamChannel}); each does nothing."""

    def frame_received(self, frame) -> None:
        pass

    def payload_received(self, channel_id: int, data: bytes) -> None:
        """A DATA frame, as the link's hot path gives it (no L{frames.Data} made): by default as one."""
        self.frame_received(frames.Data(channel_id, data))

    def link_resumed(self) -> None:
        """The link took more again; called for the channels that asked (L{MuxLink.hold})."""

    def link_lost(self) -> None:
        pass


_PAYLOAD = frozenset({frames.Data, frames.Datagram})
_Datagram = frames.Datagram
_COALESCED = frozenset({frames.Data, frames.Datagram})
# DATA written in pieces at least this big (a TLS record's worth) goes at once: see _write.
SEND_AT_ONCE = 16_384
# The largest DATA payload whose frame (after its prefix: length, type, channel) is under SEND_AT_ONCE
_SMALL_DATA = SEND_AT_ONCE - 1 - frames.PREFIX.size
_DATA_PREFIX = frames.PREFIX.pack
_DATA, _HEADER_SIZE, _MAX_CHANNEL = frames.DATA, frames.HEADER_SIZE, frames.MAX_CHANNEL


class LinkError(Exception):
    """The peer broke the protocol; the link is closed with this reason."""


@implementer(IHandshakeListener, IPushProducer)
class MuxLink(Protocol):
    log = Logger()

    def __init__(self, node: Node, config: LinkConfig, clock: IReactorTime, is_tls_client: bool,
                 owner: LinkOwner | None = None) -> None:
        self.node = node
        self.owner = owner
        self.config = config
        self.clock = clock
        self.is_tls_client = is_tls_client
        self.decoder = FrameDecoder(config.max_frame_size)
        self.admitted = False
        self.peer_role: int | None = None
        self.channels: dict[int, object] = {}
        self.next_channel = 1
        self.closed = False
        self.going_away = False  # the peer sent GOAWAY
        self.goaway_sent = False
        self.paused = False
        # Channels that stopped reading their socket because the link was paused, to resume.
        self._held: dict[object, None] = {}
        self._exporter: bytes | None = None
        self._last_seen = clock.seconds()
        self._pinger: LoopingCall | None = None
        self._handshake_timer = None
        self._ping_token = 0
        self.stats = stats_of(node)
        # DATA goes straight to its channel unless a subclass routes frames its own way (the hub)
        self._direct_data = type(self)._frame is MuxLink._frame
        # (and bulk payloads as views of the read they came in, when the channel takes them: takes_views)
        self.decoder.data_pairs = self.decoder.views = self._direct_data
        # bytes direction: up = client -> service, i.e. gateway -> provider
        self._sent, self._received = ("up", "down") if config.role == frames.ROLE_GATEWAY else ("down", "up")
        # The "bytes" counter's key for what this link sends: send_data and dataReceived add to
        # Stats.counts directly, as Stats.inc would (one call less per message each way).
        self._sent_key = ("bytes", self._sent)

    def __repr__(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return f"<MuxLink {ROLE_NAMES.get(self.peer_role, '?')} {getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}>"

    @property
    def peer_name(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    # -- connection
    def connectionMade(self) -> None:
        self._write_now = write_now(self.transport)
        # What holds small frames for the turn's end (the TLS layer's write), looked up once: an
        # attribute of the layer is found through ProtocolWrapper's __getattr__ slot (about 400
        # instructions), and this is once per message sent.
        self._write_later = self.transport.write
        no_delay(self.transport)
        eager_writes(self.transport)
        link_write_buffer(self.transport)
        self.transport.registerProducer(self, True)
        self._handshake_timer = self.clock.callLater(
            self.config.handshake_timeout, self.fail, "no admission within the handshake timeout")

    def handshakeCompleted(self) -> None:
        try:
            self._exporter = self.transport.getHandle().export_keying_material(
                EXPORTER_LABEL, 32)
        except Exception as e:
            self.fail(f"TLS exporter unavailable: {e}")
            return
        nonce = os.urandom(32)
        mac = hello_mac(self.config.secret, self._exporter, self.config.role, nonce,
                               self.is_tls_client)
        self._write(frames.Hello(version=1, role=self.config.role, nonce=nonce, mac=mac))

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            received = self.decoder.feed(data)
            if received:
                self._last_seen = self.clock.seconds()
            channels = self.channels
            # Decided once per read: a link admitted by a Hello of this read sends the rest of
            # it through _frame, which does the same with them.
            direct = self.admitted and self._direct_data
            payload_bytes = 0   # DATA and DATAGRAM payloads of this read, counted once at its end
            try:
                for frame in received:
                    if type(frame) is tuple:
                        # A DATA frame, as (channel, payload) (the decoder's data_pairs: no Data
                        # object per message), straight to its channel.
                        channel_id, payload = frame
                        if direct and type(payload) is bytes:
                            payload_bytes += len(payload)
                            channel = channels.get(channel_id)
                            if channel is not None:
                                channel.payload_received(channel_id, payload)
                        elif direct:   # a bulk payload as a view of the read, or one channel's as pieces
                            payload_bytes += deliver_views(channels.get(channel_id), channel_id, payload)
                        else:
                            self._frame(frames.Data(channel_id, b"".join(payload) if type(payload) is list
                                                    else bytes(payload)))
                    elif direct and type(frame) in _PAYLOAD:
                        # The hot path (one frame per message or datagram under request/response
                        # load), without the dispatch of _frame.
                        payload_bytes += len(frame.data)
                        channel = channels.get(frame.channel)
                        if channel is not None:
                            channel.frame_received(frame)
                    else:
                        self._frame(frame)
                    if self.closed:
                        return
            finally:
                if payload_bytes:
                    # (Stats.inc's work without its call, once per read: see _sent_key)
                    counts, key = self.stats.counts, ("bytes", self._received)
                    counts[key] = counts.get(key, 0) + payload_bytes
            if not self.admitted and self.decoder.buffered > MAX_BEFORE_ADMISSION:
                raise LinkError(f"{self.decoder.buffered} bytes before admission without a whole Hello")
        except (frames.FrameError, LinkError) as e:
            self.fail(str(e))

    def silent_peer(self) -> bool:
        """The peer sent no byte at all: a TCP probe (health check, C{nc -z}), not a login."""
        return isinstance(self.transport, LinkTLSProtocol) and self.transport.raw_bytes_received == 0

    def connectionLost(self, reason=None) -> None:
        if not self.admitted and not self.closed:
            stopping = self.owner is not None and self.owner.peer_stopping()   # (it said GOAWAY)
            if self.silent_peer() and self.is_tls_client and stopping:
                self.log.info("link with {peer} closed before TLS: it is stopping", peer=self.peer_name)
            elif self.silent_peer() and self.is_tls_client:
                # We dialled and the listener hung up at once: its cap, its drain, or not a mux port.
                self._warn_unadmitted("link with {peer} closed before admission: {peer} closed the connection "
                                      "before TLS (at a cap such as --mux-max-conns-per-ip, stopping, or not a "
                                      "PipeGate --mux port)", peer=self.peer_name)
            elif self.silent_peer():
                self.log.debug("connection from {peer} closed without sending anything (a TCP probe)",
                               peer=self.peer_name)
            else:
                self.stats.inc("admission_failures", "tls")
                why = tls_failure(reason)
                if why is not None:
                    self._warn_unadmitted("link with {peer} closed before admission: TLS: {why}",
                                          peer=self.peer_name, why=why)
                else:
                    self._warn_unadmitted("link with {peer} closed before admission (wrong router secret, "
                                          "refused role, or TLS failure)", peer=self.peer_name)
                self._refused("the link closed before admission (wrong router secret, refused role, "
                              "or TLS failure)")
        self._stop_timers()
        was_admitted, self.admitted = self.admitted, False
        self.closed = True
        if self.owner is not None:
            self.owner.link_closed(self)
        channels, self.channels = self.channels, {}
        self._held = {}
        for channel in channels.values():
            channel.link_lost()
        if was_admitted:
            self.node.link_lost(self)

    # -- admission and dispatch
    def _frame(self, frame) -> None:
        if not self.admitted:
            if not isinstance(frame, frames.Hello):
                raise LinkError(f"{type(frame).__name__} before admission")
            self._admit(frame)
            return
        match frame:
            case frames.Hello():
                raise LinkError("second Hello")
            case frames.Ping(token):
                self._write(frames.Pong(token))
            case frames.Pong():
                pass
            case frames.GoAway(reason):
                self.going_away = True
                self.log.info("peer {peer} going away: {reason}", peer=self.peer_name, reason=reason)
                self.node.link_frame(self, frame)
                if self.owner is not None:
                    self.owner.link_going_away(self)
            case frames.Data() | frames.Window() | frames.Fin() | frames.Reset() | frames.Datagram() \
                    | frames.OpenOk() | frames.OpenFail():
                if type(frame) in _PAYLOAD:
                    self.stats.inc("bytes", self._received, len(frame.data))
                channel = self.channels.get(frame.channel)
                if channel is not None:
                    channel.frame_received(frame)
            case _:
                self.node.link_frame(self, frame)

    def _admit(self, hello) -> None:
        if self._exporter is None:
            raise LinkError("Hello before the TLS handshake completed")
        if hello.version != 1:
            raise LinkError(f"unsupported mux version {hello.version}")
        if not verify_hello(self.config.secret, self._exporter, hello, not self.is_tls_client):
            self.stats.inc("admission_failures", "secret")
            raise LinkError("admission failed: the peer does not know the router secret")
        if hello.role == frames.ROLE_PROVIDER and self.config.role == frames.ROLE_PROVIDER:
            raise LinkError("provider-to-provider links are refused")
        self._admitted(hello)

    def _admitted(self, hello) -> None:
        """The peer's Hello verified: start pinging and hand the link to the node."""
        self.peer_role = hello.role
        self.admitted = True
        self._handshake_timer = cancel(self._handshake_timer)
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self.clock
        self._pinger.start(self.config.ping_interval, now=False)
        self.log.info("link to {role} {peer} admitted", role=ROLE_NAMES[hello.role], peer=self.peer_name)
        if self.owner is not None:
            self.owner.link_admitted(self)
        self.node.link_admitted(self)

    def _warn_unadmitted(self, text: str, **fields) -> None:
        """A link ended before admission: through the listener's LogThrottle, if it has one."""
        throttle = self.owner.unadmitted_log if self.owner is not None else None
        if throttle is None:
            self.log.warn(text, **fields)
            return
        held_back = throttle.allow(self.clock.seconds())
        if held_back is not None:
            self.log.warn(text + " ({more} more links ended before admission in the last interval)",
                          more=held_back, **fields)

    def _refused(self, reason: str) -> None:
        if self.owner is not None:
            self.owner.link_refused(self, reason)

    def _ping(self) -> None:
        if self.clock.seconds() - self._last_seen > self.config.ping_deadline:
            self.fail(f"no frame for {self.config.ping_deadline:g} s (ping deadline)")
            return
        self._ping_token += 1
        self._write(frames.Ping(self._ping_token))

    # -- sending
    def _write(self, frame) -> None:
        if not self.closed and self.transport is not None:
            # Small DATA and DATAGRAM frames of one reactor turn go out together: Twisted's
            # buffering TLS layer holds writes under 64 KB until the end of the turn, then
            # makes them one TLS record and one send.  Under redis-benchmark -c 50 -P 1 a
            # turn carries many small replies; one record and one send each made gateway +
            # provider spend about 60 µs of CPU per request, batched about 36 (git log -p
            # benchmarks/README.md).  DATA of SEND_AT_ONCE bytes or more (bulk: copying it
            # into a batch would cost more than its own record) and every other frame
            # (WINDOW: the peer waits for it; OPEN, FIN, RESET, ...) go now, after what is held,
            # through _write_now: not through the TLS layer's turn-end buffer, which would
            # schedule one more flush per frame (pipegate._compat.write_now).
            if type(frame) in _COALESCED and len(frame.data) < SEND_AT_ONCE:
                self._write_later(frames.encode(frame))
                return
            self._write_now(frames.encode(frame))
            send_now(self.transport)

    def send(self, frame) -> None:
        """Send a frame on an admitted link (dropped once the link is closed)."""
        if self.admitted:
            if type(frame) is _Datagram:
                self.send_datagram(frame.channel, frame.data)
                return
            if type(frame) in _PAYLOAD:
                self.stats.inc("bytes", self._sent, len(frame.data))
            self._write(frame)

    def send_datagram(self, channel_id: int, data: bytes) -> None:
        """
        C{send(Datagram(channel_id, data))} without the frame object and C{encode}'s
        dispatch: one per UDP datagram carried.  Sent with the turn's other frames (L{_write}).
        """
        if self.admitted and not self.closed and self.transport is not None:
            wire = frames.encode_datagram(channel_id, data)
            counts, key = self.stats.counts, self._sent_key
            counts[key] = counts.get(key, 0) + len(data)
            self._write_later(wire)

    def send_data(self, channel_id: int, chunks) -> None:
        """Send DATA frames for C{chunks} in one write: with the turn's other frames when small (L{_write})."""
        if self.admitted and chunks and not self.closed and self.transport is not None:
            counts, key = self.stats.counts, self._sent_key
            if len(chunks) == 1:
                # One small message (a request or a reply): encode_data's frame and checks, inline.
                chunk = chunks[0]
                size = len(chunk)
                if 0 < size <= _SMALL_DATA and 0 < channel_id <= _MAX_CHANNEL:
                    counts[key] = counts.get(key, 0) + size
                    self._write_later(_DATA_PREFIX(_HEADER_SIZE + size, _DATA, channel_id) + chunk)
                    return
            counts[key] = counts.get(key, 0) + sum(map(len, chunks))
            wire = frames.encode_data(channel_id, chunks)
            if len(wire) >= SEND_AT_ONCE:
                self._write_now(wire)
                send_now(self.transport)
            else:
                self._write_later(wire)

    # -- the channel table: nodes and channels go through these, never through self.channels
    def allocate_channel(self, channel) -> int:
        """Give C{channel} a new channel id of ours (an OPEN we send); L{LinkError} when full."""
        if len(self.channels) >= self.config.max_channels:
            raise LinkError("too many channels")
        while self.next_channel in self.channels or self.next_channel == 0:
            self.next_channel = (self.next_channel + 1) & 0xFFFFFFFF
        channel_id = self.next_channel
        self.next_channel = (self.next_channel + 1) & 0xFFFFFFFF
        self.channels[channel_id] = channel
        return channel_id

    def reserve_channel(self, channel_id: int, holder: LinkChannel) -> None:
        """Hold the peer's C{channel_id} (its OPEN) with C{holder} while the channel is being made."""
        self.channels[channel_id] = holder

    def bind_channel(self, channel_id: int, channel, holder=None) -> bool:
        """
        Put C{channel} at C{channel_id}.  With C{holder}, only if the id is still held by
        it (not released meanwhile) and the link is open; says whether it did.
        """
        if holder is not None and (self.closed or self.channels.get(channel_id) is not holder):
            return False
        self.channels[channel_id] = channel
        return True

    def release_channel(self, channel_id: int, holder=None) -> bool:
        """Free C{channel_id} (only if C{holder} holds it, when given); says whether it did."""
        if holder is not None and self.channels.get(channel_id) is not holder:
            return False
        channel = self.channels.pop(channel_id, None)
        if channel is None:
            return False
        self._held.pop(channel, None)
        return True

    def hold(self, channel) -> None:
        """C{channel} stopped reading while the link is paused: resume it with the link."""
        self._held[channel] = None

    def holds_channel(self, channel_id: int, holder) -> bool:
        """The link is open and C{channel_id} is still held by C{holder}."""
        return not self.closed and self.channels.get(channel_id) is holder

    def has_channel(self, channel_id: int) -> bool:
        return channel_id in self.channels

    def channel_count(self) -> int:
        return len(self.channels)

    # -- closing
    def fail(self, reason: str) -> None:
        """Close this link, logging why; other links are untouched."""
        if self.closed:
            return
        if not self.admitted and self.silent_peer():
            # Connected and said nothing until the handshake timeout: not an admission failure.
            self.log.debug("closing silent connection from {peer}: {reason}", peer=self.peer_name, reason=reason)
        else:
            if not self.admitted and "router secret" not in reason:
                self.stats.inc("admission_failures", "timeout" if "handshake timeout" in reason else "protocol")
            if self.admitted:
                self.log.warn("closing link with {peer}: {reason}", peer=self.peer_name, reason=reason)
            else:
                self._warn_unadmitted("closing link with {peer}: {reason}", peer=self.peer_name, reason=reason)
            if not self.admitted:
                self._refused(reason)
        self.closed = True
        self._stop_timers()
        if self.transport is not None:
            self.transport.abortConnection()

    def announce_going_away(self, reason: str) -> None:
        """Send GOAWAY once: the peer opens no new channels here; open ones run on."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self.send(frames.GoAway(reason))

    def go_away(self, reason: str) -> None:
        self.announce_going_away(reason)
        self._stop_timers()
        if self.transport is not None:
            # A transport with a registered producer never finishes closing.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def _stop_timers(self) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None
        self._handshake_timer = cancel(self._handshake_timer)

    # -- IPushProducer: the link's TLS transport is full.  Each channel stops reading its
    # socket when it next reads one (L{hold}), so a pause costs nothing for the channels that
    # have nothing to send: with thousands of idle connections on a link, pausing every
    # socket (a system call each) at every pause took a quarter of a busy channel's
    # throughput.  What the link takes meanwhile is one read per channel at most, within its
    # flow-control window as always.
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        held, self._held = self._held, {}
        for channel in held:
            channel.link_resumed()

    def stopProducing(self) -> None:
        pass


class LinkFactory(Factory):
    """
    Builds links for one node (C{is_tls_client} tells which side of TLS we are) and is
    their L{LinkOwner}: it counts admissions, reports refusals to C{on_refused}, throttles
    the lines of links ended before admission through C{unadmitted_log} (listeners), and,
    when it dials (L{dialer}), passes admissions and GOAWAYs to its L{Redialer}.
    """

    noisy = False

    def __init__(self, node: Node, config: LinkConfig, clock: IReactorTime, is_tls_client: bool, *,
                 on_refused: Callable[[str], None] | None = None,
                 unadmitted_log: LogThrottle | None = None) -> None:
        self.node = node
        self.config = config
        self.clock = clock
        self.is_tls_client = is_tls_client
        self.admitted = 0  # links admitted through this factory (a dialer: 1 + reconnects)
        self.on_refused = on_refused  # told why a link ended before admission
        self.unadmitted_log = unadmitted_log
        self.redialer: Redialer | None = None

    def dialer(self, endpoint, retry_policy: Callable[[int], float] | None = None) -> Redialer:
        """
        The service that keeps a link of this factory to C{endpoint}: it redials with
        C{retry_policy} (by default a L{Redial}: the delay grows over failed admissions, not
        only over failed TCP connects, and resets once a link is admitted), and dials a
        replacement at once when the peer says GOAWAY.
        """
        self.redialer = Redialer(endpoint, self, self.clock, retry_policy=retry_policy)
        return self.redialer

    # -- LinkOwner
    def link_admitted(self, link: MuxLink) -> None:
        if not self.is_tls_client:
            return
        self.admitted += 1
        if self.admitted > 1:
            link.stats.inc("reconnects")
        if self.redialer is not None:
            self.redialer.succeeded()

    def link_refused(self, link: MuxLink, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)

    def link_going_away(self, link: MuxLink) -> None:
        if self.redialer is not None:
            self.redialer.going_away(link)

    def link_closed(self, link: MuxLink) -> None:
        if self.redialer is not None:
            self.redialer.link_closed(link)

    def peer_stopping(self) -> bool:
        return self.redialer is not None and self.redialer.peer_stopping()

    def buildProtocol(self, addr):
        link = MuxLink(self.node, self.config, self.clock, self.is_tls_client, owner=self)
        link.factory = self
        return link
