"""
Automatic HTTPS for the relay: ACME (RFC 8555) certificates for C{--domain} and for
C{<id>.<domain>} of every tunnel that has logged in, served by SNI on C{--https}.

Pieces:
 - L{pipegate.http.acmeschedule.OrderScheduler}: sans-IO.  Which names need an order
   and when: a queue with at most C{max_orders} orders at once, exponential backoff after
   failures, C{Retry-After} and a global pause on C{rateLimited}, renewal at two thirds
   of a certificate's lifetime (or at the CA's ARI suggestion), re-armed after each
   issuance.
 - L{AcmeManager}: the service that feeds the scheduler events (startup, connector
   logins, results) from an injected clock, runs orders in a bounded thread pool
   (L{pipegate.http.acmeclient}, certbot's blocking C{acme} library), installs
   certificates in the L{pipegate.http.sni.SNISelector} and counts for C{/metrics}.
 - L{Challenges} and L{ChallengeFirstSite}: the plain C{--listen} listener answers
   C{/.well-known/acme-challenge/<token>} before any tunnel routing, and with
   C{--https-redirect} sends everything else to https.
 - L{AcmeOptions}: the options of C{pipegate-server}.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import attrs
from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web import http

from pipegate.http.acmeschedule import OrderScheduler
from pipegate.http.certstore import CertStore, StoredCertificate, valid_host_name
from pipegate.http.public import RelayResource, RelaySite
from pipegate.http.relay import Relay
from pipegate.stats import Stats
from pipegate.timers import cancel

MAX_SLEEP = 3600.0             # the timer re-checks at least hourly (wall-clock jumps)
CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")   # used with fullmatch


# -- HTTP-01 answers on the plain listener


class Challenges:
    """Tokens being validated and their key authorizations (set from the issuing threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answers: dict[str, str] = {}

    def publish(self, token: str, validation: str) -> None:
        with self._lock:
            self._answers[token] = validation

    def withdraw(self, token: str) -> None:
        with self._lock:
            self._answers.pop(token, None)

    def answer(self, token: str) -> str | None:
        with self._lock:
            return self._answers.get(token)


def _plain(request, code: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8") -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


_HOST = re.compile(r"(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"|\[[0-9A-Fa-f:.]+\])")   # used with fullmatch


class ChallengeFirstResource(RelayResource):
    """
    The relay's resource on the plain listener: ACME challenges first, then (with
    C{--https-redirect}) a 308 to https, else the relay as usual.
    """

    def __init__(self, relay: Relay, challenges: Challenges, redirect_port: int | None) -> None:
        super().__init__(relay)
        self.challenges = challenges
        self.redirect_port = redirect_port   # None: no redirect

    # wants_early_start stays the relay's: challenges and redirects are answered at the end
    # of the headers like public requests, and a body sent with them is read and dropped,
    # never buffered (a stranger's 10 GB POST to port 80 fills no temporary file).

    def render(self, request):
        uri = request.uri
        if uri.startswith(CHALLENGE_PREFIX):
            return self._challenge(request, uri[len(CHALLENGE_PREFIX):].split(b"?")[0])
        if self.redirect_port is not None:
            return self._redirect(request)
        return super().render(request)

    def _challenge(self, request, token: bytes) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _plain(request, http.NOT_ALLOWED, b"")
        text = token.decode("ascii", "replace")
        answer = self.challenges.answer(text) if _TOKEN.fullmatch(text) else None
        if answer is None:
            return _plain(request, http.NOT_FOUND, b"no such challenge\n")
        return _plain(request, http.OK, answer.encode("ascii"), b"application/octet-stream")

    def _redirect(self, request) -> bytes:
        host = (request.getHeader(b"host") or "")
        host = host.decode("latin-1") if isinstance(host, bytes) else host
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if not _HOST.fullmatch(name):
            return _plain(request, http.BAD_REQUEST, b"missing or bad Host header\n")
        port = "" if self.redirect_port == 443 else f":{self.redirect_port}"
        target = request.uri if request.uri.startswith(b"/") else b"/"   # absolute-form: keep it simple
        location = f"https://{name}{port}".encode("ascii") + target
        request.setHeader(b"location", location)
        return _plain(request, http.PERMANENT_REDIRECT, b"moved to https\n")


class ChallengeFirstSite(RelaySite):
    """L{RelaySite} for the plain listener when ACME is on."""

    def __init__(self, relay: Relay, challenges: Challenges, redirect_port: int | None = None) -> None:
        super().__init__(relay)
        self.relay_resource = self.resource = ChallengeFirstResource(relay, challenges, redirect_port)


def endpoint_port(description: str, default: int = 443) -> int:
    """The port of a C{tcp:}/C{ssl:} server endpoint string (C{default} for others)."""
    parts = re.split(r"(?<!\\):", description)
    kind = parts[0].lower()
    if kind.startswith("haproxy") and len(parts) > 1:
        parts = parts[1:]
        kind = parts[0].lower()
    if kind not in ("tcp", "tcp6", "ssl"):
        return default
    positional = [p for p in parts[1:] if "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    value = keywords.get("port", positional[0] if positional else "")
    return int(value) if value.isdigit() and int(value) else default


# -- the service


@attrs.define(eq=False, slots=False)
class AcmeManager(service.Service):
    """
    Keeps certificates for C{domain} and the subdomains of logged-in tunnels.  C{run(f,
    *args)} runs the blocking C{issuer.issue} off the reactor thread and returns a
    Deferred; C{live(name)} says whether a tunnel's name has a connector now.
    """

    log = Logger()

    domain: str = attrs.field(converter=lambda name: name.lower().strip("."))
    store: CertStore
    selector: object
    issuer: object
    clock: IReactorTime
    run: Callable[..., defer.Deferred]
    max_orders: int = 2
    live: Callable[[str], bool] = lambda name: True
    on_stop: Callable[[], object] | None = None
    scheduler: OrderScheduler = attrs.field(init=False)
    held: dict[str, StoredCertificate] = attrs.field(factory=dict, init=False)
    stats: Stats = attrs.field(factory=Stats, init=False)
    _timer: IDelayedCall | None = attrs.field(default=None, init=False)
    _skipped: set[str] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        self.scheduler = OrderScheduler(self.max_orders)

    # -- events
    def startService(self) -> None:
        super().startService()
        now = self.clock.seconds()
        loaded = self.store.load_all()
        for stored in loaded:
            if not self._install(stored):
                continue   # unusable: ordered anew like a missing one
            self.scheduler.held(stored.name, stored.not_before, stored.not_after, now,
                                sticky=stored.name == self.domain)
            self.log.info("ACME: certificate for {name} loaded from the state directory, valid until {expiry}",
                          name=stored.name, expiry=stored.expiry())
        self.scheduler.want(self.domain, now, sticky=True)
        self._wake()

    def login(self, tunnel_id: str) -> None:
        """A connector of C{tunnel_id} logged in: make sure C{<id>.<domain>} has a certificate."""
        try:
            self._login(tunnel_id)
        except Exception:   # never let ACME bookkeeping break a connector's login
            self.log.failure("ACME: handling the login of tunnel {tunnel_id}", tunnel_id=tunnel_id)

    def _login(self, tunnel_id: str) -> None:
        label = tunnel_id.lower()
        name = f"{label}.{self.domain}"
        if "." in label or not valid_host_name(name):
            if label not in self._skipped and len(self._skipped) < 1024:
                self._skipped.add(label)
                self.log.info("ACME: tunnel {tunnel_id!r} is not a DNS label; no certificate for it",
                              tunnel_id=tunnel_id)
            return
        if self.scheduler.want(name, self.clock.seconds()) and self.running:
            self._wake()

    def _wake(self) -> None:
        self._timer = cancel(self._timer)
        if not self.running:
            return
        now = self.clock.seconds()
        started, dropped = self.scheduler.start(now, self.live)
        for name in dropped:
            self.log.info("ACME: not ordering {name} again: its tunnel has no connector", name=name)
        for name in started:
            self._order(name)
        wake = self.scheduler.next_wakeup()
        self._timer = cancel(self._timer)   # a result that came back synchronously has armed one already
        if wake is not None and self.running:
            self._timer = self.clock.callLater(min(max(0.0, wake - now), MAX_SLEEP), self._wake)

    def _order(self, name: str) -> None:
        self.stats.inc("acme_orders")
        self.log.info("ACME: ordering a certificate for {name}", name=name)
        d = self.run(self.issuer.issue, name)
        d.addCallbacks(self._issued, self._failed, callbackArgs=(name,), errbackArgs=(name,))
        d.addErrback(lambda f: self.log.failure("ACME: handling the result for {name}", f, name=name))

    def _issued(self, issued, name: str) -> None:
        if not self.running:
            return
        stored = issued.certificate
        if not self._install(stored):
            delay = self.scheduler.failed(name, self.clock.seconds())
            self.stats.inc("acme_failures", "ca_error")
            self.log.warn("ACME: the certificate issued for {name} is unusable; next try in {delay:.0f} s",
                          name=name, delay=delay)
            self._wake()
            return
        due = self.scheduler.succeeded(name, stored.not_before, stored.not_after, self.clock.seconds(),
                                       issued.renew_at)
        self.log.info("ACME: certificate for {name} issued, valid until {expiry}; renewal in {days:.1f} days",
                      name=name, expiry=stored.expiry(), days=(due - self.clock.seconds()) / 86400)
        self._wake()

    def _failed(self, failure, name: str) -> None:
        if not self.running:
            return
        from pipegate.http.acmeclient import AcmeFailure

        if failure.check(AcmeFailure):
            error = failure.value
            kind, problem, retry_after, limited = error.kind, error.problem, error.retry_after, error.rate_limited
        else:
            self.log.failure("ACME: unexpected error ordering {name}", failure, name=name)
            kind, problem, retry_after, limited = "error", failure.getErrorMessage(), None, False
        delay = self.scheduler.failed(name, self.clock.seconds(), retry_after, limited)
        self.stats.inc("acme_failures", kind)
        self.log.warn("ACME: order for {name} failed ({kind}): {problem}; next try in {delay:.0f} s",
                      name=name, kind=kind, problem=problem, delay=delay)
        self._wake()

    def _install(self, stored: StoredCertificate) -> bool:
        try:
            self.selector.install(stored.name, stored.key_pem, stored.chain_pem)
        except ValueError as e:   # CertificateError: a damaged file or a key that does not match
            self.log.error("ACME: cannot use the certificate for {name}: {error}", name=stored.name, error=e)
            return False
        self.held[stored.name] = stored
        return True

    def stopService(self):
        super().stopService()
        self._timer = cancel(self._timer)
        self.issuer.cancel()
        return self.on_stop() if self.on_stop is not None else None

    # -- observability
    def rows(self) -> list[dict]:
        """One row per name for /status: its certificate's expiry and the order state."""
        now = self.clock.seconds()
        out = []
        for name in sorted(set(self.held) | set(self.scheduler.names)):
            stored = self.held.get(name)
            state = self.scheduler.names.get(name)
            if state is not None and state.busy:
                what = "ordering"
            elif state is not None and state.dormant:
                what = "dormant (no connector)"
            elif state is not None and state.failures:
                what = f"retrying ({state.failures} failure(s))"
            elif stored is None:
                what = "waiting"
            elif stored.not_after <= now:
                what = "expired"
            else:
                what = "valid"
            out.append({
                "name": name,
                "expires": stored.expiry() if stored else None,
                "days_left": round((stored.not_after - now) / 86400, 1) if stored else None,
                "state": what,
            })
        return out

    def expiry_days(self) -> dict[str, float]:
        now = self.clock.seconds()
        return {name: (s.not_after - now) / 86400 for name, s in self.held.items()}


def acme_collector(manager: AcmeManager):
    """C{pipegate_acme_*} for the relay's C{--metrics} listener."""
    from pipegate.metrics import ServiceCollector

    def gauges():
        days = manager.expiry_days()
        return [
            ("acme_certificates", "ACME certificates held and not expired.", None,
             {"": sum(1 for d in days.values() if d > 0)}),
            ("acme_certificate_expiry_days", "Days until each ACME certificate expires.", "name", days),
        ]
    return ServiceCollector(manager.stats, ("acme_orders", "acme_failures"), gauges)


# -- options and wiring


@attrs.define
class AcmeWiring:
    """What C{makeService} needs: the plain listener's site and the services to add."""

    manager: AcmeManager
    challenges: Challenges
    https: str
    redirect_port: int | None

    def plain_site(self, relay: Relay) -> ChallengeFirstSite:
        return ChallengeFirstSite(relay, self.challenges, self.redirect_port)

    def add_services(self, top: service.MultiService, relay: Relay, reactor, listen=None) -> None:
        """
        The manager, then the C{--https} listener (so that it stops first).  C{listen(description,
        factory)} makes the listening service; pipegate.tap.server passes one that applies the
        public listener's connection caps and backlog.
        """
        from twisted.protocols.tls import TLSMemoryBIOFactory

        self.manager.setServiceParent(top)
        factory = TLSMemoryBIOFactory(self.manager.selector, False, RelaySite(relay))
        if listen is None:
            listener = strports.service(self.https, factory, reactor=reactor)
        else:
            listener = listen(self.https, factory)
        listener.setServiceParent(top)


class LazyIssuer:
    """
    Builds the real issuer (L{pipegate.http.acmeclient.Issuer}) at the first order, in
    the issuing thread: certbot's C{acme} library with C{requests} costs about 5 MiB of
    resident memory, which a relay restarted with valid certificates does not need for
    weeks.
    """

    def __init__(self, make: Callable[[], object]) -> None:
        self._make = make
        self._issuer = None
        self._cancelled = False
        self._lock = threading.Lock()

    def issue(self, name: str):
        with self._lock:
            if self._issuer is None:
                self._issuer = self._make()
                if self._cancelled:
                    self._issuer.cancel()
            issuer = self._issuer
        return issuer.issue(name)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._issuer is not None:
                self._issuer.cancel()


def acme_for(options, relay: Relay, reactor) -> AcmeWiring | None:
    """The ACME parts for C{pipegate-server}, or None without C{--acme-directory}."""
    if not options.get("acme-directory"):
        return None
    from twisted.internet import threads
    from twisted.python.threadpool import ThreadPool

    from pipegate.http.sni import SNISelector

    domain = options["domain"].strip(".").lower()
    store = options["acme-store"]
    challenges = Challenges()

    def make_issuer():
        from pipegate.http.acmeclient import Issuer

        return Issuer(options["acme-directory"], store, challenges.publish, challenges.withdraw,
                      email=options["acme-email"], ca_file=options["acme-ca-file"])

    issuer = LazyIssuer(make_issuer)
    max_orders = options["acme-max-orders"]
    pool = ThreadPool(minthreads=0, maxthreads=max_orders, name="pipegate-acme")
    started = []

    def run(f, *args):
        if not started:
            started.append(pool.start())
        return threads.deferToThreadPool(reactor, pool, f, *args)

    def stop():
        # Joining the workers blocks until their current HTTP call returns (cancelled
        # orders stop at their next step): do it off the reactor thread.
        return threads.deferToThread(pool.stop) if started else None

    def live(name: str) -> bool:
        label = name[: -len(domain) - 1]
        return any(t.links for tid, t in list(relay.tunnels.items()) if tid.lower() == label)

    manager = AcmeManager(domain, store, SNISelector(domain), issuer, reactor, run, max_orders, live, stop)
    relay.tunnels.login_observers.append(manager.login)
    redirect = endpoint_port(options["https"]) if options["https-redirect"] else None
    return AcmeWiring(manager, challenges, options["https"], redirect)
