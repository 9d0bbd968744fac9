"""
The hub: the relay as a meeting point of the port plane (C{pipegate-server --mux}).

Providers and gateways that both sit behind NAT dial the hub.  The hub admits each link
by one of its router secrets (the secret a peer proves decides its router), and is a
peer of the other kind to each of them: to a gateway it is a provider announcing the
routes of every provider of the same router; to a provider it is a gateway.  An OPEN from
a gateway becomes an OPEN to a provider offering that gate (round robin, failover on
OPEN_FAIL), and the two channels are spliced: DATA, WINDOW, FIN, RESET and DATAGRAM pass
through with their channel ids rewritten.  Credit is passed on one for one, so the end
points keep their flow control and the hub never holds more than one window per channel
and direction.

L{pipegate.mux.hubcore.HubCore} is the routing logic without I/O (events in, effects
out); L{HubNode} and L{HubLink} here are the Twisted shell around it, with the hub's
options.  See docs/protocol.md §2.13.
"""

from __future__ import annotations

import os

from twisted.application import service, strports
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pipegate.core.codec import FrameError
from pipegate.accept import ConnectionGate
from pipegate.core.budget import Budget
from pipegate.mux import frames, tls
from pipegate.mux.hello import EXPORTER_LABEL, EXPORTER_LENGTH, hello_mac, verify_hello
from pipegate.mux.hubcore import Close, HubConfig, HubCore
from pipegate.mux.options import mux_rate
from pipegate.mux.session import ROLE_NAMES, LinkConfig, LinkError, LinkFactory, MuxLink
from pipegate.drain import Drainer
from pipegate.stats import Stats


class HubLink(MuxLink):
    """
    A link accepted by the hub.  It waits for the peer's HELLO, finds the router secret
    that verifies it, and only then answers with its own HELLO under that secret, taking
    the role opposite to the peer's (provider to a gateway, gateway to anyone else).
    """

    def __init__(self, node, config: LinkConfig, clock, secrets: tuple[bytes, ...], owner=None) -> None:
        super().__init__(node, config, clock, is_tls_client=False, owner=owner)
        self.secrets = secrets
        self.router: int | None = None

    def handshakeCompleted(self) -> None:
        try:
            self._exporter = self.transport.getHandle().export_keying_material(
                EXPORTER_LABEL, EXPORTER_LENGTH)
        except Exception as e:
            self.fail(f"TLS exporter unavailable: {e}")

    def _admit(self, hello) -> None:
        if self._exporter is None:
            raise LinkError("Hello before the TLS handshake completed")
        if hello.version != frames.VERSION:
            raise LinkError(f"unsupported mux version {hello.version}")
        for router, secret in enumerate(self.secrets):
            if verify_hello(secret, self._exporter, hello, True):
                break
        else:
            self.stats.inc("admission_failures", "secret")
            raise LinkError("admission failed: the peer knows none of the hub's router secrets")
        self.router = router
        role = frames.ROLE_PROVIDER if hello.role == frames.ROLE_GATEWAY else frames.ROLE_GATEWAY
        nonce = os.urandom(frames.NONCE_SIZE)
        self._write(frames.Hello(version=frames.VERSION, role=role, nonce=nonce,
                                 mac=hello_mac(secret, self._exporter, role, nonce, False)))
        self._admitted(hello)

    def _frame(self, frame) -> None:
        # Channel frames go to the hub, not to a channel table: the hub splices them.
        if self.admitted and not isinstance(frame, (frames.Hello, frames.Ping, frames.Pong, frames.GoAway)):
            self.node.link_frame(self, frame)
        else:
            super()._frame(frame)


class HubLinkFactory(LinkFactory):

    def __init__(self, node, config: LinkConfig, clock, secrets: tuple[bytes, ...]) -> None:
        super().__init__(node, config, clock, is_tls_client=False)
        self.secrets = secrets

    def buildProtocol(self, addr):
        link = HubLink(self.node, self.config, self.clock, self.secrets, owner=self)
        link.factory = self
        return link


class HubNode(Drainer, service.Service):
    """The links of the hub and the L{HubCore} that routes between them."""

    log = Logger()

    def __init__(self, config: HubConfig, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.core = HubCore(config)
        self.links: set = set()
        # admission_failures (counted by the links), dropped_datagrams and drain_cut;
        # exported with a hub_ prefix next to the relay's own counters.
        self.stats = Stats()

    def link_admitted(self, link) -> None:
        if not self.running:   # admitted while stopping: it would outlive the drain
            link.go_away("hub stopping")
            return
        self.links.add(link)
        self.log.info("hub: {role} {peer} joined router #{router}",
                      role=ROLE_NAMES.get(link.peer_role, "?"), peer=link.peer_name, router=link.router)
        self._do(self.core.admit(link, link.router, link.peer_role))

    def link_lost(self, link) -> None:
        self.links.discard(link)
        self._do(self.core.lost(link))

    def link_frame(self, link, frame) -> None:
        self._do(self.core.frame(link, frame))

    def _do(self, outputs: list) -> None:
        for out in outputs:
            if isinstance(out, Close):
                out.peer.fail(out.reason)
            elif isinstance(out.frame, frames.Datagram) and out.peer.paused:
                self.stats.inc("dropped_datagrams")   # the link is full: dropped, as UDP would
            else:
                try:
                    out.peer.send(out.frame)
                except FrameError as e:   # a frame the peer's limits refuse
                    out.peer.fail(f"cannot forward {type(out.frame).__name__}: {e}")

    def stopService(self):
        """
        Drain: GOAWAY every link (gateways open no new channels here), let the channels
        through the hub end for up to C{drain_timeout} seconds, then close the links.
        """
        super().stopService()
        for link in list(self.links):
            link.announce_going_away("hub stopping")
        channels = self.core.splices()
        if channels:
            self.log.info("hub draining: {count} channel(s) open, up to {timeout:g} s",
                          count=channels, timeout=self.core.config.drain_timeout)
        return self.start_drain(self.clock, self.core.config.drain_timeout,
                                lambda: self.core.splices() == 0, self._drained)

    def _drained(self, in_time: bool) -> None:
        cut = self.core.splices()
        if cut:
            self.stats.inc("drain_cut", amount=cut)
            self.log.warn("hub drain timeout: {count} channel(s) cut", count=cut)
        for link in list(self.links):
            link.go_away("hub stopping")


def hub_node(options) -> HubNode | None:
    """The hub that C{--mux} asks for, not yet started; None without C{--mux}."""
    if not options["mux"]:
        return None
    per_router = options["mux-max-peers-per-router"]
    if per_router is None:
        per_router = max(1, options["mux-max-peers"] // len(options["mux-secrets"]))
    return HubNode(HubConfig(window=options["mux-window"], max_window=options["mux-max-window"],
                             max_peers=options["mux-max-peers"], max_peers_per_router=per_router,
                             max_channels=options["mux-max-channels"],
                             max_frame_size=options["mux-max-frame-size"],
                             drain_timeout=options["drain-timeout"]))


def add_hub(top: service.MultiService, options, reactor, hub: HubNode | None) -> None:
    """Add C{hub} (from L{hub_node}) and its --mux listeners to C{top}, if there is one."""
    if hub is None:
        return
    secrets = options["mux-secrets"]
    link_config = LinkConfig(
        secret=secrets[0], role=frames.ROLE_GATEWAY, max_frame_size=options["mux-max-frame-size"],
        window=options["mux-window"], ping_interval=options["mux-ping-interval"],
        ping_deadline=options["mux-ping-deadline"], handshake_timeout=options["mux-handshake-timeout"],
        max_channels=options["mux-max-channels"])
    if options["mux-tls-key"]:
        certificate = tls.load_certificate(options["mux-tls-key"], options["mux-tls-cert"])
    else:
        certificate = tls.generated_certificate()
    # Connections to the --mux listeners, per source IP and in total, from accept (before TLS
    # and admission) until gone, and new ones per IP over time: past a cap one is closed at
    # once, counted (admission_failures{reason="cap"}) and logged at most once per 10 s.
    # Peers behind one NAT share an address, hence a generous per-IP cap.
    budget = Budget(options["mux-max-conns-per-ip"], options["mux-max-conns"])   # all --mux listeners
    rate = mux_rate(options)
    for description in options["mux"]:
        factory = tls.server_factory(certificate, HubLinkFactory(hub, link_config, reactor, secrets))
        factory = ConnectionGate(factory, budget, reactor, what=f"hub --mux {description}", rate=rate,
                                 on_refused=lambda cap: hub.stats.inc("admission_failures", "cap"))
        strports.service(description, factory, reactor=reactor).setServiceParent(top)
    hub.setServiceParent(top)   # added last so that it stops first: links get a GOAWAY
