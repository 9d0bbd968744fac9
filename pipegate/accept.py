"""
Accepting connections on a listener a stranger can reach, without running out of file
descriptors.  Shared by both planes (the relay's public listener, gate ports).

  - L{ConnectionGate}: a wrapping factory that asks a L{pipegate.core.budget.Budget} (per
    source IP and in total) before it builds a protocol.  Past a cap the new connection is
    closed at once (Twisted closes the socket when C{buildProtocol} returns None), counted
    through C{on_refused}, and logged through a L{LogThrottle}: one line per interval, however
    many are refused.  Connections already open, and other sources, are not touched.
  - L{with_backlog}: the listen backlog for an endpoint string that does not name one
    (Twisted's default is 50; the kernel allows C{net.core.somaxconn}, 4096 on current Linux).
  - L{EmfileGuard}: when accept() fails with EMFILE anyway, Twisted's TCP port closes the
    waiting connections with its reserved descriptor and stays up; the guard then pauses
    accepting on every listener it watches, so that the kernel's accept queue holds new
    connections instead of a loop accepting and closing them, and resumes after a pause that
    doubles while EMFILE repeats (0.5 s up to 8 s).  Nothing is raised, no Deferred fails.

Wiring, as pipegate/tap/server.py does it::

    per_ip, total = default_caps(raise_nofile().usable())           # pipegate.fdlimit
    gate = ConnectionGate(factory, Budget(per_ip, total), reactor, what="gate 25565/tcp",
                          on_refused=lambda cap: stats.inc("connections_refused", cap))
    guard = EmfileGuard(reactor)                                     # one per process is enough
    guard.setServiceParent(top)
    listener("tcp:25565", gate, reactor, backlog=1024, guard=guard).setServiceParent(top)
"""

from __future__ import annotations

import re
from typing import Callable

from twisted.application import service, strports
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogPublisher, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from pipegate.core.budget import PER_SOURCE, RATE, TOTAL, Budget, LogThrottle, SourceRate, source_key

#: Listen backlog used when an endpoint string names none.
DEFAULT_BACKLOG = 1024

_BACKLOG_PREFIXES = ("tcp", "tcp6", "ssl", "unix")


def with_backlog(description: str, backlog: int) -> str:
    """
    C{description} with C{:backlog=<backlog>} appended when it is a C{tcp:}, C{tcp6:}, C{ssl:}
    or C{unix:} server endpoint (also inside C{haproxy:}) that names no backlog of its own; other endpoints (C{systemd:},
    whose socket systemd made, and plugins) are returned as they are.
    """
    parts = description.split(":", 2)
    prefix = parts[0].lower()
    if prefix == "haproxy" and len(parts) > 1:  # PROXY protocol around a tcp:/unix:... endpoint
        prefix = parts[1].lower()
    if prefix not in _BACKLOG_PREFIXES or ":" not in description:
        return description
    if re.search(r"(?:^|(?<!\\):)backlog=", description):
        return description
    return f"{description}:backlog={backlog}"


def source_of(address) -> str | None:
    """
    The per-IP source of an IPv4/IPv6 peer (L{source_key}: an IPv6 peer by its /64); None
    for other kinds (unix sockets), held to no per-source cap.
    """
    host = getattr(address, "host", None)
    return source_key(host) if isinstance(host, str) and host else None


class _Gated(ProtocolWrapper):
    source: str | None = None

    def logPrefix(self):
        # The gate stays out of log lines: they name the protocol as without it.
        return _log_prefix(self.wrappedProtocol)


class _PlainGated(_Gated):
    """
    A connection to a plain HTTP listener: one whose first byte starts a TLS record (0x16,
    a wss:// connector or an https:// browser at the wrong port) is closed at once, so that
    the client says "a plain port needs ws://" now instead of after its handshake timeout.
    No HTTP request (nor PROXY header) can start with that byte.
    """

    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first and data:
            self._first = False
            if data[0] == 0x16:
                self.transport.abortConnection()
                return
        self.wrappedProtocol.dataReceived(data)


def _log_prefix(wrapped) -> str:
    prefix = getattr(wrapped, "logPrefix", None)
    return prefix() if prefix is not None else wrapped.__class__.__name__


class ConnectionGate(WrappingFactory):
    """
    Wrap C{wrapped} so that every new connection first takes a unit of C{budget} for its source
    IP, and gives it back when the connection is gone.

    @param on_refused: called with the cap that refused (L{PER_SOURCE} or L{TOTAL}), to count it.
    @param what: names the listener in the log line ("relay", "gate 25565/tcp").
    @param per_source: False for a listener whose peers are proxies (C{haproxy:}): the peer at
        accept is not the caller, so only C{budget}'s total applies to its connections.
    @param rate: new connections per source IP over time (L{SourceRate}), checked once the
        caps on connections held at once let one in; None: no limit.  Sources C{budget}
        exempts (trusted proxies) are exempt from it too.
    @param plain_http: the listener speaks plain HTTP: a TLS handshake is cut at once (L{_PlainGated}).
    """

    protocol = _Gated
    log = Logger()
    noisy = False

    def logPrefix(self):
        return _log_prefix(self.wrappedFactory)

    def __init__(self, wrapped, budget: Budget, clock: IReactorTime, *,
                 on_refused: Callable[[str], None] = lambda cap: None, what: str = "listener",
                 log_interval: float = 10.0, per_source: bool = True, rate: SourceRate | None = None,
                 plain_http: bool = False) -> None:
        super().__init__(wrapped)
        if plain_http:
            self.protocol = _PlainGated
        self.per_source = per_source
        self.budget = budget
        self.rate = rate
        self.clock = clock
        self.on_refused = on_refused
        self.what = what
        self._throttle = {cap: LogThrottle(log_interval) for cap in (PER_SOURCE, TOTAL, RATE)}

    def buildProtocol(self, addr):
        source = source_of(addr)
        # A peer without an IP (a unix socket) is its own source: only the total cap applies.
        key = source if source is not None and self.per_source else object()
        exempt = self.budget.exempt
        if key is source and source not in exempt and addr.host in exempt:
            # An IPv6 trusted proxy: its source is its /64, which --trusted-proxy does not
            # name; it counts under its own address, which the budget exempts.
            key = addr.host
        rate = self.rate
        cap = self.budget.acquire(key)
        if (cap is None and rate is not None and key is source and source not in exempt
                and not rate.allow(source, self.clock.seconds())):
            self.budget.release(key)
            cap = RATE
        if cap is not None:
            self.on_refused(cap)
            held_back = self._throttle[cap].allow(self.clock.seconds())
            if held_back is not None:
                if cap == RATE:
                    limit = f"{rate.rate:g} new connections a second (bursts of {rate.burst:g})"
                else:
                    limit = f"{self.budget.per_source if cap == PER_SOURCE else self.budget.total} connections"
                self.log.warn("{what}: connection refused, {cap} cap of {limit} reached "
                              "({more} more refused since the last line)",
                              what=self.what, cap=cap, limit=limit, more=held_back)
            return None
        try:
            protocol = super().buildProtocol(addr)
        except BaseException:
            self.budget.release(key)
            raise
        if protocol is None:
            self.budget.release(key)
            return None
        protocol.source = key
        return protocol

    def unregisterProtocol(self, protocol) -> None:
        super().unregisterProtocol(protocol)
        source = getattr(protocol, "source", None)
        if source is not None:
            protocol.source = None
            self.budget.release(source)


class _Watched:
    """A server endpoint whose listening ports an L{EmfileGuard} can pause."""

    def __init__(self, endpoint, guard: EmfileGuard) -> None:
        self.endpoint = endpoint
        self.guard = guard

    def listen(self, factory):
        d = self.endpoint.listen(factory)

        def listening(port):
            self.guard.ports.append(port)
            return port
        return d.addCallback(listening)


class EmfileGuard(service.Service):
    """
    Pause accepting on the listeners it watches when the process is out of descriptors.

    Twisted's TCP port (checked with Twisted 26.10) recovers from EMFILE itself: it closes a
    reserved descriptor, accepts and closes the waiting connections, re-reserves it, and logs
    C{"EMFILE encountered; releasing reserved file descriptor."} through the port's logger,
    whose observer is the global log publisher.  That event is the only sign of it, so the
    guard observes it there (tests/test_edge_relay.py checks the text against the installed
    Twisted by running into EMFILE for real).
    """

    log = Logger()
    MARK = "EMFILE encountered"

    def __init__(self, clock: IReactorTime, *, on_pause: Callable[[], None] = lambda: None,
                 publisher: LogPublisher = globalLogPublisher, first: float = 0.5,
                 longest: float = 8.0) -> None:
        self.clock = clock
        self.on_pause = on_pause
        self.publisher = publisher
        self.first = first
        self.longest = longest
        self.ports: list = []
        self.paused = False
        self.pauses = 0
        self._delay = first
        self._last_resume = float("-inf")
        self._resume_call = None
        self._throttle = LogThrottle(10.0)

    def watch(self, listener: service.Service) -> service.Service:
        """Watch the port of a C{strports.service} listener (its C{endpoint} is wrapped)."""
        listener.endpoint = _Watched(listener.endpoint, self)
        return listener

    def startService(self) -> None:
        super().startService()
        self.publisher.addObserver(self._observe)

    def stopService(self):
        super().stopService()
        self.publisher.removeObserver(self._observe)
        call, self._resume_call = self._resume_call, None
        if call is not None and call.active():
            call.cancel()

    def _observe(self, event: dict) -> None:
        if str(event.get("log_format", "")).startswith(self.MARK):
            self.emfile()

    def emfile(self) -> None:
        """The process ran out of descriptors while accepting: pause every watched listener."""
        if self.paused:
            return
        now = self.clock.seconds()
        # EMFILE again right after a resume: wait twice as long; after a quiet spell, start over.
        self._delay = min(self.longest, self._delay * 2) if now - self._last_resume < self.longest else self.first
        self.paused = True
        self.pauses += 1
        self.on_pause()
        for port in self.ports:
            stop = getattr(port, "stopReading", None)
            if stop is not None:
                stop()
        self._resume_call = self.clock.callLater(self._delay, self._resume)
        held_back = self._throttle.allow(now)
        if held_back is not None:
            delay = self._delay
            # Not from inside the log observer that called us.
            self.clock.callLater(0, lambda: self.log.warn(
                "out of file descriptors (EMFILE): accepting paused for {seconds:g} s "
                "({more} more pauses since the last line)", seconds=delay, more=held_back))

    def _resume(self) -> None:
        self._resume_call = None
        self.paused = False
        self._last_resume = self.clock.seconds()
        for port in self.ports:
            if getattr(port, "connected", False) and not getattr(port, "disconnecting", False):
                port.startReading()


def listener(description: str, factory, reactor, *, backlog: int = DEFAULT_BACKLOG,
             guard: EmfileGuard | None = None) -> service.Service:
    """
    C{strports.service} for C{description} (with L{with_backlog}), fail-fast as STYLE.md rule 4
    asks, its port watched by C{guard}.
    """
    listening = strports.service(with_backlog(description, backlog), factory, reactor=reactor)
    if guard is not None:
        guard.watch(listening)
    return listening


class SiteLimits:
    """
    The bounds of a small HTTP listener (C{--metrics} with C{/status}, the gateway's
    C{/unlimited}, the provider's resolver): connections one source IP may hold and in total
    (0: no cap), and seconds a connection may stay idle (C{--api-max-conns-per-ip},
    C{--api-max-conns}, C{--api-idle-timeout}).  twisted.web's own idle timeout is 12 hours
    and it has no connection cap: a stranger who reached one of them could hold connections
    until the process ran out of descriptors, and with it every gate and public listener.
    """

    def __init__(self, per_source: int = 16, total: int = 256, idle: float = 30.0, max_body: int = 65536) -> None:
        self.per_source, self.total, self.idle, self.max_body = per_source, total, idle, max_body

    @classmethod
    def of(cls, options) -> SiteLimits:
        """The limits a service's options set (L{pipegate.config.API_PARAMETERS})."""
        return cls(options["api-max-conns-per-ip"], options["api-max-conns"], options["api-idle-timeout"],
                   options["api-max-body-bytes"])


def bounded_request(max_body: int):
    """A twisted.web request class for a small site (L{small_site}): bodies of at most C{max_body} bytes."""
    from twisted.web import server   # (here: a service without a small site loads no twisted.web)

    class BoundedRequest(server.Request):
        """
        A request of a small site whose body may hold at most C{max_body} bytes.  twisted.web
        reads a whole body before it renders, into a temporary file past 100 KB, so a stranger
        could fill the disk with one POST; past the bound (a C{Content-Length} over it at the
        head, or a chunked body as it grows) the caller gets 413 and the connection closes,
        and nothing more is read or kept.  (C{gotLength}, C{handleContentChunk} and
        C{requestReceived} are twisted.web's public C{Request} methods.)
        """

        _refused = False
        _seen = 0

        def gotLength(self, length):
            if length is not None and length > self.max_body:
                self._refuse()
                return
            super().gotLength(length)

        def handleContentChunk(self, data):
            if self._refused:
                return
            self._seen += len(data)
            if self._seen > self.max_body:
                self._refuse()
                return
            super().handleContentChunk(data)

        def requestReceived(self, command, path, version):
            if not self._refused:
                super().requestReceived(command, path, version)

        def _refuse(self) -> None:
            self._refused = True
            self.content = None
            transport = self.channel.transport if self.channel is not None else None
            if transport is not None:
                transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
                transport.loseConnection()   # (which stops reading: the rest is never taken)

    BoundedRequest.max_body = max_body
    return BoundedRequest


def small_site(description: str, site, reactor, what: str, limits: SiteLimits) -> service.Service:
    """
    C{strports.service} for a small twisted.web C{site}, held to C{limits}: its idle
    timeout, and connections per source IP and in total (L{ConnectionGate}: past a cap a new
    connection is closed at accept, one log line per interval).
    """
    site.timeOut = limits.idle
    if limits.max_body:
        site.requestFactory = bounded_request(limits.max_body)
    gate = ConnectionGate(site, Budget(limits.per_source, limits.total), reactor, what=what)
    return strports.service(description, gate, reactor=reactor)
