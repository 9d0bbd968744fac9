"""
The provider: announces its services to every admitted gateway and, for each OPEN,
connects to the service (TCP) or opens a connected socket towards it (UDP).
"""

from __future__ import annotations

import collections
import ipaddress

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from pipegate.core.budget import Budget, LogThrottle, source_key
from pipegate.drain import Drainer
from pipegate.stats import Stats
from pipegate.mux import frames
from pipegate.core.window import GrowthBudget
from pipegate.mux.channel import StreamChannel
from pipegate.mux.session import LinkChannel
from pipegate.ports import proxyprotocol
from pipegate.ports.resolver import Records, tuple_key
from pipegate.ports.services import Service
from pipegate.ports.udp import (
    EVICT_MIN_IDLE, UDP_BUFFER, BackendSocket, Flow, datagram_sender, evict_idle, set_buffers)
from pipegate._compat import lean_dispatch
from pipegate.tcpclient import connect_stream
from pipegate.sockets import listen_udp_quietly


def service_route(svc: Service, policy: bytes = b"") -> frames.Route:
    return frames.Route(gate_port=svc.gate_port, protocol=svc.protocol,
                        service_host=svc.service_host, service_port=svc.service_port,
                        tags=tuple(svc.tags), policy=policy)


class _BackendRelease:
    """
    What L{Provider._acquire} returns: called (with any arguments, as a callback), it gives
    the backend socket, and the UDP flow of a UDP open, back to the provider's caps once.
    One per open channel: a slotted object instead of a closure over the OPEN frame.
    """

    __slots__ = ("provider", "source", "udp")

    def __init__(self, provider: Provider, source: str, udp: bool) -> None:
        self.provider, self.source, self.udp = provider, source, udp

    def __call__(self, *_: object) -> None:
        provider, self.provider = self.provider, None
        if provider is not None:
            provider.backends.release(self.source)
            if self.udp:
                provider.udp_flows.release(None)


@attrs.frozen
class ProviderConfig:
    services: tuple[Service, ...] = ()
    policy: bytes = b""  # the merged ingress policy, shipped with every route
    connect_timeout: float = 5.0
    udp_idle_timeout: float = 120.0
    window: int = frames.INITIAL_WINDOW
    max_window: int = frames.MAX_WINDOW
    window_budget: int = frames.WINDOW_BUDGET
    drain_timeout: float = 30.0
    udp_buffer: int = UDP_BUFFER
    # Backend sockets (TCP connections and UDP flows to services) this provider holds at
    # once, in total and per client IP, and how many of them may be UDP flows; 0 = no cap.
    # pipegate.tap.provider sizes them from the fd budget.  Past a cap an OPEN gets
    # OPEN_FAIL, so the gateway tries its next provider.
    max_backends: int = 4096
    backends_per_source: int = 256
    max_udp_flows: int = 2048


FLOW_SUMMARY_INTERVAL = 60.0


@attrs.define
class FlowSummary:
    """UDP flows opened and closed since the last summary, and open now."""

    opened: int = 0
    closed: int = 0
    open: int = 0

    def flow_opened(self) -> None:
        self.opened += 1
        self.open += 1

    def flow_closed(self) -> None:
        self.closed += 1
        self.open -= 1

    def take(self) -> tuple[int, int, int] | None:
        """(opened, closed, open) since the last call, or None when nothing happened."""
        counts = (self.opened, self.closed, self.open)
        self.opened = self.closed = 0
        return counts if counts[0] or counts[1] else None


class Provider(service.Service, Drainer):
    log = Logger()

    def __init__(self, config: ProviderConfig, reactor, records: Records | None = None) -> None:
        self.config = config
        self.window_budget = GrowthBudget(config.window_budget)
        self.reactor = reactor
        self.records = records
        self.services = list(config.services)
        self.links: set = set()
        self.stats = Stats()
        self.draining = False
        # UDP flows are logged at debug level one by one; at info, a summary per interval.
        self.flow_summary = FlowSummary()
        self._summary = LoopingCall(self._log_flow_summary)
        self._summary.clock = reactor
        self.backends = Budget(config.backends_per_source, config.max_backends)
        self.udp_flows = Budget(0, config.max_udp_flows)
        # Open UDP flows, least recently used first: at the cap, one idle long enough makes room.
        self.udp_table: collections.OrderedDict[Flow, None] = collections.OrderedDict()
        self._refusal_log = LogThrottle()
        # A dead backend fails every OPEN of a flood: one line per service per interval.
        self._failure_logs: dict[tuple, LogThrottle] = {}

    def startService(self):
        super().startService()
        lean_dispatch(self.reactor)   # (no legacy log context per I/O event: pipegate._compat)
        self._summary.start(FLOW_SUMMARY_INTERVAL, now=False)

    def _log_flow_summary(self) -> None:
        counts = self.flow_summary.take()
        if counts is not None:
            self.log.info("UDP flows in the last {interval:g} s: {opened} opened, {closed} closed, "
                          "{open} open", interval=FLOW_SUMMARY_INTERVAL, opened=counts[0],
                          closed=counts[1], open=counts[2])

    def _acquire(self, link, frame) -> object | None:
        """
        Take a backend socket for C{frame}'s client (and a UDP flow for a UDP open); on
        refusal send OPEN_FAIL and return C{None}.  The return value, called, gives it back
        (once, however often it is called).
        """
        source = source_key(frame.client_host)   # an IPv6 client by its /64
        refused = self.backends.acquire(source)
        kind = "backend"
        if refused is None and frame.protocol == "udp":
            refused = self.udp_flows.acquire(None)
            kind = "udp"
            if refused is not None and evict_idle(self.udp_table, self.reactor.seconds(), EVICT_MIN_IDLE):
                self.stats.inc("evicted_flows")
                refused = self.udp_flows.acquire(None)
            if refused is not None:
                self.backends.release(source)
        if refused is not None:
            self.stats.inc("cap_refusals", f"{kind}-{refused}")
            held_back = self._refusal_log.allow(self.reactor.seconds())
            if held_back is not None:
                self.log.warn("open of gate {port}/{proto} refused: {kind} {cap} cap reached "
                              "({more} more refused in the last interval)", port=frame.gate_port,
                              proto=frame.protocol, kind=kind, cap=refused, more=held_back)
            link.send(frames.OpenFail(frame.channel, f"overloaded: {kind} {refused} cap reached"))
            return None
        return _BackendRelease(self, source, frame.protocol == "udp")

    def _log_failure(self, svc: Service, text: str, **fields) -> None:
        """Log a failed backend open, at most one line per service every 10 s, with the count held back."""
        key = (svc.gate_port, svc.protocol)
        held_back = self._failure_logs.setdefault(key, LogThrottle()).allow(self.reactor.seconds())
        if held_back is not None:
            self.log.info(text + " ({more} more failures of this service in the last interval)",
                          more=held_back, **fields)

    def routes(self) -> frames.Routes:
        return frames.Routes(tuple(service_route(s, self.config.policy) for s in self.services))

    def set_services(self, services: list[Service]) -> None:
        """Replace the announced services; every gateway hears of the change at once."""
        self.services = list(services)
        for link in list(self.links):
            link.send(self.routes())

    # -- links
    def link_admitted(self, link) -> None:
        if self.draining:  # admitted while stopping: it would outlive the drain
            link.go_away("provider stopping")
            return
        self.links.add(link)
        link.send(self.routes())

    def link_lost(self, link) -> None:
        self.links.discard(link)

    def link_frame(self, link, frame) -> None:
        if isinstance(frame, frames.Open):
            self._open(link, frame)

    def _find(self, gate_port: int, protocol: str) -> Service | None:
        return next((s for s in self.services
                     if s.gate_port == gate_port and s.protocol == protocol), None)

    def _open(self, link, frame: frames.Open) -> None:
        if link.has_channel(frame.channel):
            link.fail(f"OPEN for channel {frame.channel} already in use")
            return
        svc = self._find(frame.gate_port, frame.protocol)
        if svc is None:
            link.send(frames.OpenFail(frame.channel, "unknown service"))
            return
        if link.channel_count() >= link.config.max_channels:
            link.send(frames.OpenFail(frame.channel, "overloaded"))
            return
        release = self._acquire(link, frame)
        if release is None:
            return
        if svc.protocol == "udp":
            self._open_udp(link, frame, svc, release)
        else:
            self._open_tcp(link, frame, svc, release)

    def _open_tcp(self, link, frame, svc: Service, release) -> None:
        channel = BackendChannel(self.config.window, self.config.max_window, self.window_budget)
        channel.on_done = release
        placeholder = _Pending(link, frame.channel)
        link.reserve_channel(frame.channel, placeholder)

        def connected():
            if not link.bind_channel(frame.channel, channel, placeholder):
                channel.transport.abortConnection()
                release()
                return
            if svc.proxy_protocol:
                # The gate's address as this provider knows it: the gateway's IP, the gate port.
                channel.transport.write(proxyprotocol.header(
                    svc.proxy_protocol, "tcp", frame.client_host, frame.client_port,
                    link.transport.getPeer().host, frame.gate_port))
            if self.records is not None:
                mine, theirs = channel.transport.getHost(), channel.transport.getPeer()
                self._record("tcp", mine, theirs.host, theirs.port, frame, channel)
            link.send(frames.OpenOk(frame.channel))
            channel.attach(link, frame.channel)

        def failed(failure):
            release()
            if link.release_channel(frame.channel, placeholder):
                reason = failure.getErrorMessage()
                self._log_failure(svc, "channel {channel} to {host}:{port} failed: {reason}",
                                  channel=frame.channel, host=svc.service_host, port=svc.service_port,
                                  reason=reason)
                link.send(frames.OpenFail(frame.channel, f"{svc.service_host}:{svc.service_port}: {reason}"[:1000]))

        channel.on_connected = connected
        connect_stream(self.reactor, svc.service_host, svc.service_port, self.config.connect_timeout,
                       channel, failed)

    def _open_udp(self, link, frame, svc: Service, release) -> None:
        placeholder = _Pending(link, frame.channel)
        link.reserve_channel(frame.channel, placeholder)

        def resolved(address):
            if not link.holds_channel(frame.channel, placeholder):
                release()
                return
            socket = BackendSocket()
            socket.noisy = False  # no "Starting protocol" / "Stopping protocol" per flow
            interface = "::" if ":" in address else "0.0.0.0"
            try:
                listening = listen_udp_quietly(self.reactor, 0, socket, interface, 65535)
            except CannotListenError as e:  # EMFILE and the like: say so at once
                release()
                link.release_channel(frame.channel, placeholder)
                self._log_failure(svc, "channel {channel}: cannot open a UDP socket: {error}",
                                  channel=frame.channel, error=e.socketError)
                link.send(frames.OpenFail(frame.channel, f"cannot open a UDP socket: {e.socketError}"[:1000]))
                return
            try:
                set_buffers(listening, self.config.udp_buffer)
                socket.transport.connect(address, svc.service_port)
            except (OSError, ValueError) as e:
                release()
                listening.stopListening()
                link.release_channel(frame.channel, placeholder)
                link.send(frames.OpenFail(frame.channel, f"{svc.service_host}:{svc.service_port}: {e}"[:1000]))
                return

            channel = frame.channel

            def done(flow):
                release()
                self.flow_summary.flow_closed()
                self.log.debug("UDP flow {channel} to {host}:{port} closed", channel=channel,
                               host=address, port=svc.service_port)
                return listening.stopListening()
            flow = Flow(self.reactor, self.config.udp_idle_timeout, None, done)
            flow.write = datagram_sender(listening, flow.count_drop)
            self.flow_summary.flow_opened()
            self.log.debug("UDP flow {channel} to {host}:{port} open", channel=channel,
                           host=address, port=svc.service_port)
            socket.flow = flow
            flow.table = self.udp_table
            self.udp_table[flow] = None
            if self.records is not None:
                self._record("udp", socket.transport.getHost(), address, svc.service_port, frame, flow)
            link.bind_channel(frame.channel, flow)
            link.send(frames.OpenOk(frame.channel))
            flow.attach(link, frame.channel)

        def failed(failure):
            release()
            if link.release_channel(frame.channel, placeholder):
                link.send(frames.OpenFail(frame.channel, f"{svc.service_host}: {failure.getErrorMessage()}"[:1000]))

        try:
            ipaddress.ip_address(svc.service_host)
            d = defer.succeed(svc.service_host)  # a literal address (IPv6 too) needs no lookup
        except ValueError:
            d = self.reactor.resolve(svc.service_host)
        d.addCallback(resolved)
        d.addErrback(failed)  # also when resolved() itself fails: OPEN_FAIL, never an unhandled error

    def _record(self, protocol: str, mine, backend_host: str, backend_port: int, frame, channel) -> None:
        """Register the channel with the resolver until it ends."""
        key = tuple_key(protocol, mine.host, mine.port, backend_host, backend_port)
        self.records.add(key, protocol=protocol, gate_port=frame.gate_port, channel_port=mine.port,
                         client=(frame.client_host, frame.client_port), labels=frame.labels,
                         now_ms=self.reactor.seconds() * 1000)
        previous = channel.on_done

        def done(ch, key=key):
            self.records.remove(key)
            if previous is not None:
                previous(ch)
        channel.on_done = done

    def stopService(self):
        """GOAWAY every link (gateways withdraw our routes), let open channels finish up to
        C{drain_timeout} seconds, then close the links."""
        super().stopService()
        if self._summary.running:
            self._summary.stop()
        self.draining = True
        for link in list(self.links):
            link.announce_going_away("provider stopping")
        return self.start_drain(self.reactor, self.config.drain_timeout,
                                lambda: not any(link.channel_count() for link in self.links), self._drained)

    def _drained(self, in_time: bool) -> None:
        cut = sum(link.channel_count() for link in self.links)
        if cut:
            self.stats.inc("drain_cut", amount=cut)
            self.log.warn("drain timeout: {count} channel(s) cut", count=cut)
        for link in list(self.links):
            link.go_away("provider stopping")


class BackendChannel(StreamChannel):
    """A channel's connection to its service: C{on_connected()} runs once it is made."""

    on_connected = None

    def connectionMade(self) -> None:
        super().connectionMade()
        connected, self.on_connected = self.on_connected, None
        if connected is not None:
            connected()


class _Pending(LinkChannel):
    """Holds a channel id while the service connection is being made."""

    def __init__(self, link, channel_id: int) -> None:
        self.link = link
        self.channel_id = channel_id

    def frame_received(self, frame) -> None:
        if isinstance(frame, frames.Reset):  # the gateway gave up (open timeout)
            self.link.release_channel(self.channel_id, self)

