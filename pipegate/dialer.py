"""
The Twisted side of dialing a peer again: L{Redialer} (the one redial/GOAWAY object of
every dialled link: mux links of providers and gateways, the connector's WebSocket),
why a connection attempt failed, in a user's words, and an endpoint that reports each
failure before the retry policy (L{pipegate.core.redial.Redial}) picks the next delay.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from pipegate._compat import QuietClientService
from pipegate.core.redial import Redial


#: What a retired dialler's retry policy answers (L{Redialer._dial}): never waited.
RETIRED_DELAY = 60.0
#: For this long after a peer's GOAWAY, until a link is admitted again, the peer counts as
#: stopping (L{Redialer.peer_stopping}): longer than a peer's default drain (30 s).
STOPPING_FOR = 60.0


class Redialer(service.MultiService):
    """
    One peer we dial, kept connected: a L{ClientService} that redials C{endpoint} with
    C{factory} after a loss, waiting C{retry_policy(attempt)} seconds (by default a
    L{Redial}, whose delay grows over failed attempts; L{succeeded} resets its C{backoff}).

    When the peer says GOAWAY (L{going_away}), it dials a replacement at once (a balancer or
    DNS in front reaches a peer that is not stopping) while the old link finishes its work;
    the old dialler stops once that link has closed (L{link_closed}), so it never redials.
    Add it to the service tree where the L{ClientService} would go: stopping it stops every
    dialler it holds, cutting their links.
    """

    def __init__(self, endpoint, factory, clock: IReactorTime, *,
                 retry_policy: Callable[[int], float] | None = None, backoff: Redial | None = None) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.factory = factory
        self.clock = clock
        self.retry_policy = retry_policy if retry_policy is not None else Redial()
        self.backoff = backoff if backoff is not None or not isinstance(self.retry_policy, Redial) \
            else self.retry_policy
        self._retiring: dict[Hashable, QuietClientService] = {}   # link -> the dialler it came from
        self._went_away_at: float | None = None   # the peer's last GOAWAY, until a success
        #: Told every delay the retry policy picks (the dialer's one line per failed attempt).
        self.on_retry: Callable[[float], None] | None = None
        self.current: QuietClientService = self._dial()

    def _dial(self) -> QuietClientService:
        def next_attempt(attempt: int) -> float:
            if dialer is not self.current:
                # A retired dialler whose link closed after GOAWAY: it is stopped on the next
                # turn, so this delay is never waited; it is no failed attempt either.
                return RETIRED_DELAY
            delay = self.retry_policy(attempt)
            if self.on_retry is not None:
                self.on_retry(delay)
            return delay

        dialer = QuietClientService(self.endpoint, self.factory, retryPolicy=next_attempt, clock=self.clock)
        self.current = dialer   # before it starts: an attempt may fail at once
        dialer.setServiceParent(self)
        return dialer

    def succeeded(self) -> None:
        """A link reached its goal (admitted, logged in): the next failure waits the shortest delay."""
        self._went_away_at = None
        if self.backoff is not None:
            self.backoff.succeeded()

    def going_away(self, link) -> bool:
        """
        The peer of C{link} said GOAWAY: dial a replacement now and retire the dialler of
        C{link} once it closes.  Says whether it did (not while stopping, once per link).
        """
        self._went_away_at = self.clock.seconds()
        if not self.running or not self.current.running or link in self._retiring:
            return False
        self._retiring[link] = self.current
        self._dial()
        return True

    def peer_stopping(self) -> bool:
        """
        The peer said GOAWAY lately and no link was admitted since: a dial it hangs up on is
        its drain at work (the replacement reaches it while it stops), not a fault to warn about.
        """
        went = self._went_away_at
        return went is not None and self.clock.seconds() - went < STOPPING_FOR

    def retiring(self, link) -> bool:
        """C{link} went away and has been replaced."""
        return link in self._retiring

    def link_closed(self, link) -> bool:
        """C{link} closed: stop its dialler if it was replaced; says whether it was."""
        old = self._retiring.pop(link, None)
        if old is None:
            return False
        # Not from inside the link's own connectionLost: stop the old dialler on the next turn.
        self.clock.callLater(0, lambda: old.disownServiceParent() if old.parent is not None else None)
        return True

    def stop_dialing(self):
        """Stop redialling (a fatal refusal); the links already up are cut."""
        return self.current.stopService()


def describe_connect_error(reason: BaseException) -> str:
    """
    One phrase for why a TCP connection could not be made, in the words a user
    searches for: "connection refused", "DNS name not found", "timed out".
    """
    if isinstance(reason, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (error.DNSLookupError, error.UnknownHostError)):
        return f"DNS name not found ({reason})"
    if isinstance(reason, (error.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(reason, error.NoRouteError):
        return "no route to host"
    text = str(reason).strip()
    return f"{type(reason).__name__}: {text}" if text else type(reason).__name__


@implementer(IStreamClientEndpoint)
class ReportingEndpoint:
    """
    A client endpoint that tells C{failed(failure)} why a connection attempt failed
    (before the dialer's retry policy picks the next delay); cancellations are not
    failures.
    """

    def __init__(self, endpoint, failed: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory):
        def report(failure: Failure) -> Failure:
            if not failure.check(defer.CancelledError, error.ConnectingCancelledError):
                self._failed(failure)
            return failure

        return self._endpoint.connect(factory).addErrback(report)

    def __repr__(self) -> str:
        return repr(self._endpoint)
