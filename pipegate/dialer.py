"""
The Twisted side of dialing a peer again: why a connection attempt failed, in a
user's words, and an endpoint that reports each failure before the retry policy
(L{pipegate.core.redial.Redial}) picks the next delay.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, error
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer


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
