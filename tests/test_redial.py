"""
pipegate.core.redial: the backoff that grows over failed logins and admissions, not
only over failed TCP connects (issue 18 item 4), and the words for connect failures
(item 6).  Driven by task.Clock; no sockets.
"""

from __future__ import annotations

from twisted.application.internet import ClientService
from twisted.internet import defer, error, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from pipegate.core.redial import Redial
from pipegate.dialer import describe_connect_error


class RedialPolicy(unittest.TestCase):
    def test_grows_to_the_cap_and_resets_only_on_success(self):
        redial = Redial(initial=1.0, maximum=60.0, rng=lambda: 1.0)
        self.assertEqual([redial.next_delay() for _ in range(9)], [1, 2, 4, 8, 16, 32, 60, 60, 60])
        redial.succeeded()
        self.assertEqual(redial.next_delay(), 1.0)

    def test_jitter_scales_each_delay_by_half_to_one(self):
        low = Redial(rng=lambda: 0.0)
        self.assertEqual([low.next_delay() for _ in range(3)], [0.5, 1.0, 2.0])

    def test_ignores_client_service_attempt_number(self):
        # ClientService passes attempt 1 after every connect-then-drop: that must not reset.
        redial = Redial(rng=lambda: 1.0)
        self.assertEqual([redial(1), redial(1), redial(1)], [1.0, 2.0, 4.0])

    def test_very_many_failures_stay_at_the_cap(self):
        redial = Redial(maximum=60.0, rng=lambda: 1.0, failures=10_000)
        self.assertEqual(redial.next_delay(), 60.0)


class ConnectThenRefused:
    """An endpoint whose every connection succeeds at TCP and is dropped at once (a login refused)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.attempts: list[float] = []

    def connect(self, factory):
        self.attempts.append(self.clock.seconds())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.clock.callLater(0, protocol.connectionLost, Failure(error.ConnectionDone()))
        return defer.succeed(protocol)


class UnderClientService(unittest.TestCase):
    def gaps(self, policy) -> list[float]:
        clock = task.Clock()
        endpoint = ConnectThenRefused(clock)
        service = ClientService(endpoint, Factory.forProtocol(Protocol), retryPolicy=policy, clock=clock)
        service.startService()
        clock.advance(0)
        for _ in range(200):
            clock.advance(0.5)
            clock.advance(0)  # the drop scheduled during that step
        service.stopService()
        return [round(b - a, 1) for a, b in zip(endpoint.attempts, endpoint.attempts[1:])]

    def test_the_attempt_count_restarts_after_a_tcp_connect(self):
        # Why Redial keeps its own count: a policy of ClientService's attempt number sees
        # attempt 1 for ever (what users saw: a refused login retried every 0.5-1 s).
        gaps = self.gaps(lambda attempt: float(attempt))
        self.assertGreater(len(gaps), 50)
        self.assertEqual(set(gaps), {1.0})

    def test_redial_grows_over_failed_logins(self):
        gaps = self.gaps(Redial(initial=1.0, maximum=16.0, rng=lambda: 1.0))
        self.assertEqual(gaps[:6], [1.0, 2.0, 4.0, 8.0, 16.0, 16.0])


class ConnectErrors(unittest.TestCase):
    def test_user_words(self):
        self.assertEqual(describe_connect_error(error.ConnectionRefusedError("111: Connection refused")),
                         "connection refused")
        self.assertIn("DNS name not found",
                      describe_connect_error(error.DNSLookupError("no results for hostname lookup: x.invalid")))
        self.assertIn("x.invalid", describe_connect_error(error.DNSLookupError("lookup: x.invalid")))
        self.assertEqual(describe_connect_error(error.TimeoutError()), "timed out")
        self.assertEqual(describe_connect_error(TimeoutError()), "timed out")
        self.assertEqual(describe_connect_error(error.NoRouteError()), "no route to host")
        self.assertEqual(describe_connect_error(OSError("boom")), "OSError: boom")
