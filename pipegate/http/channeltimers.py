"""
The timers of the relay's public HTTP channel (L{pipegate.http.public.RelayChannel}), moved
here whole from pipegate/http/public.py: the head deadline (a whole request head within the
idle timeout of its first byte), the idle timeout on one L{IdleTimer} per connection, and the
abort of a connection that closes behind an answer its caller does not read.
"""

from __future__ import annotations

from pipegate import _compat
from pipegate.sockets import UnreadAbort
from pipegate.timers import IdleTimer, cancel


class ChannelTimers:
    """
    Mixed into L{pipegate.http.public.RelayChannel} (before C{http.HTTPChannel}), whose
    C{dataReceived}, C{allHeadersReceived}, C{requestDone} and C{connectionLost} arm and
    cancel them.
    """

    _pg_head_timer = None
    _pg_head_armed = False  # the head timer runs for the head being received

    #: The idle timeout (TimeoutMixin's C{timeOut}), on one L{IdleTimer} per connection.
    _pg_idle: IdleTimer | None = None
    _pg_idle_on = False
    _pg_idle_period = None   # the idle timeout to restore once a head that may take over is done
    _pg_unread: UnreadAbort | None = None   # the last answer is done: the connection closes behind it

    def setTimeout(self, period):
        """
        TimeoutMixin's, on an L{IdleTimer} (pipegate/timers.py) instead of a DelayedCall:
        twisted.web suspends the idle timeout for each request and restarts it when the
        request is done, which on a DelayedCall is a cancel and a new call (heap operations,
        and Python comparisons in the reactor's heap) per request; here it is a flag and a
        touch.  Fires at the same time, as TimeoutMixin would.
        """
        prev, self.timeOut = self.timeOut, period
        if period is None:
            self._pg_idle_on = False
            return prev
        timer = self._pg_idle
        if timer is not None and timer.active() and timer.seconds == period:
            timer.touch()
        else:
            cancel(timer)
            self._pg_idle = IdleTimer(self.site.reactor, period, self._pg_idle_expired)
        self._pg_idle_on = True
        return prev

    def resetTimeout(self):
        if self._pg_idle_on:
            self._pg_idle.touch()

    def _pg_idle_expired(self):
        # (a suspended timer, between a request's head and its end, lapses unheard)
        if self._pg_idle_on:
            self._pg_idle_on = False  # (TimeoutMixin forgets its call when it fires)
            self.timeoutConnection()

    def _pg_head_late(self):
        self._pg_head_timer = None
        if not self._pg_head_armed:
            return  # between heads: the next head's first byte arms it again
        self.log.info("request head from {peer} not complete within {seconds:g} s; closing",
                       peer=str(self.transport.getPeer()), seconds=self.timeOut)
        self.timeoutConnection()

    def timeoutConnection(self):
        # The head timer and the idle timer fire together when a caller sent its bytes at
        # once and stalled (a TLS ClientHello to this plain port); a second timeout would
        # replace, and so leak, the first one's pending forced abort.  (_abortingCall is
        # HTTPChannel's, Twisted 26.10.0; test_http_e2e LoginFailures.test_wss_to_a_plain_port
        # leaves the reactor dirty if it changes.)
        if not _compat.abort_pending(self):
            super().timeoutConnection()

    def _pg_unread_log(self):
        self.log.info("{peer} did not read its answer within {seconds:g} s of its end; closing",
                      peer=str(self.transport.getPeer()), seconds=self.site.timeOut)

    def _pg_cancel_head_timer(self):
        timer, self._pg_head_timer = self._pg_head_timer, None
        if timer is not None and timer.active():
            timer.cancel()
