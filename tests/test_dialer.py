"""
pipegate.dialer.Redialer: the one redial/GOAWAY object of dialled links, on a
MemoryReactorClock with an endpoint that connects only when the test says so.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from pipegate.core.redial import Redial
from pipegate.dialer import Redialer


class ClosingTransport(StringTransport):
    """A StringTransport whose protocol hears of the close (ClientService waits for it)."""

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.protocol.connectionLost(Failure(ConnectionDone()))

    abortConnection = loseConnection


@implementer(IStreamClientEndpoint)
class HeldEndpoint:
    """Each connect waits until L{succeed} or L{fail} answers it."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Factory, defer.Deferred]] = []

    def connect(self, factory):
        d = defer.Deferred()
        self.attempts.append((factory, d))
        return d

    def succeed(self, index: int = -1) -> Protocol:
        factory, d = self.attempts[index]
        protocol = factory.buildProtocol(None)
        transport = ClosingTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol

    def fail(self, index: int = -1) -> None:
        self.attempts[index][1].errback(ConnectionRefusedError("refused"))


class RedialerTests(unittest.TestCase):
    timeout = 10
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = HeldEndpoint()
        self.backoff = Redial(initial=1.0, rng=lambda: 1.0)
        self.redialer = Redialer(self.endpoint, Factory.forProtocol(Protocol), self.clock,
                                 retry_policy=self.backoff)
        self.redialer.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if not self.redialer.running:
            return None
        d = self.redialer.stopService()
        for _, attempt in self.endpoint.attempts:
            if not attempt.called:
                attempt.errback(defer.CancelledError())
        return d

    def test_dials_at_start_and_again_after_a_failure_with_the_backoff(self) -> None:
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.endpoint.fail()
        self.assertEqual(self.backoff.failures, 1)
        self.clock.advance(0.99)
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.endpoint.attempts), 2)
        self.endpoint.fail()
        self.clock.advance(1.99)
        self.assertEqual(len(self.endpoint.attempts), 2)   # the delay doubled
        self.clock.advance(0.01)
        self.assertEqual(len(self.endpoint.attempts), 3)

    def test_succeeded_resets_the_backoff(self) -> None:
        self.endpoint.fail()
        self.clock.advance(1)
        self.endpoint.fail()
        self.assertEqual(self.backoff.failures, 2)
        self.redialer.succeeded()
        self.assertEqual(self.backoff.failures, 0)

    def test_goaway_dials_a_replacement_and_retires_the_old_dialler_when_its_link_closes(self) -> None:
        link = self.endpoint.succeed()
        old = self.redialer.current
        self.assertTrue(self.redialer.going_away(link))
        self.assertEqual(len(self.endpoint.attempts), 2)   # dialled at once, no delay
        self.assertIsNot(self.redialer.current, old)
        self.assertTrue(self.redialer.retiring(link))
        self.assertFalse(self.redialer.going_away(link))   # once per link
        self.assertEqual(len(self.endpoint.attempts), 2)
        self.assertIn(old, list(self.redialer))
        self.assertTrue(self.redialer.link_closed(link))
        self.assertIn(old, list(self.redialer))   # not from inside connectionLost
        self.clock.advance(0)
        self.assertNotIn(old, list(self.redialer))
        self.assertFalse(old.running)
        self.assertTrue(self.redialer.current.running)
        self.assertFalse(self.redialer.retiring(link))

    def test_on_retry_hears_each_delay_of_the_current_dialler_only(self) -> None:
        delays: list[float] = []
        self.redialer.on_retry = delays.append
        self.endpoint.fail()
        self.assertEqual(delays, [1.0])
        self.clock.advance(1)
        link = self.endpoint.succeed()
        self.redialer.succeeded()
        # GOAWAY: a replacement is dialled; the old link's close is no failed attempt, and its
        # retiring dialler neither logs a "next attempt" it will never make nor grows the backoff.
        self.assertTrue(self.redialer.going_away(link))
        self.redialer.link_closed(link)
        link.transport.loseConnection()
        self.assertEqual(delays, [1.0])
        self.assertEqual(self.backoff.failures, 0)
        self.endpoint.fail()   # the replacement's first attempt
        self.assertEqual(delays, [1.0, 1.0])

    def test_the_peer_counts_as_stopping_after_its_goaway_until_a_success_or_a_while(self) -> None:
        from pipegate.dialer import STOPPING_FOR

        link = self.endpoint.succeed()
        self.assertFalse(self.redialer.peer_stopping())
        self.redialer.going_away(link)
        self.assertTrue(self.redialer.peer_stopping())
        self.redialer.succeeded()   # a link admitted again
        self.assertFalse(self.redialer.peer_stopping())
        self.redialer.going_away(self.endpoint.succeed())
        self.clock.advance(STOPPING_FOR)
        self.assertFalse(self.redialer.peer_stopping())

    def test_a_link_that_was_not_replaced_keeps_its_dialler(self) -> None:
        link = self.endpoint.succeed()
        old = self.redialer.current
        self.assertFalse(self.redialer.link_closed(link))
        self.clock.advance(0)
        self.assertIs(self.redialer.current, old)
        self.assertTrue(old.running)

    def test_no_replacement_while_stopping(self) -> None:
        link = self.endpoint.succeed()
        self.stop()
        self.assertFalse(self.redialer.going_away(link))
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_no_replacement_after_a_fatal_refusal(self) -> None:
        link = self.endpoint.succeed()
        self.redialer.stop_dialing()
        self.assertFalse(self.redialer.going_away(link))

    def test_the_default_policy_is_a_redial_it_resets(self) -> None:
        redialer = Redialer(self.endpoint, Factory.forProtocol(Protocol), self.clock)
        self.assertIsInstance(redialer.retry_policy, Redial)
        self.assertIs(redialer.backoff, redialer.retry_policy)
        plain = Redialer(self.endpoint, Factory.forProtocol(Protocol), self.clock, retry_policy=lambda n: 1.0)
        self.assertIsNone(plain.backoff)
        plain.succeeded()   # nothing to reset
