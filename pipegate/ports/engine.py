"""
A small Docker Engine API client on Twisted: C{twisted.web.client.Agent} over the
Engine's UNIX socket, JSON in and out, every response body read with a size bound
and every request under a timeout; and the C{/events} stream, read line by line with
a line bound and reconnected with backoff.

No Docker SDK and no blocking call: everything returns Deferreds.  Paths are sent
without a version prefix (C{/containers/json}), which Docker and Podman both serve
with their current API version; the fields used are those of Docker's Engine API
reference, checked against what Podman's Docker-compatible API returns (see
C{docs/docker.md}).

Every failure is an L{EngineError} whose message is one line naming the request:
C{GET /containers/json: cannot reach the engine at unix:/var/run/docker.sock: ...},
C{POST /containers/create: HTTP 409: Conflict. The container name ... is already in use}.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from twisted.application import service
from twisted.internet import defer, endpoints, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from pipegate._compat import quiet_pool
from pipegate.timers import cancel

__all__ = ["EngineClient", "EngineError", "EventStream", "EVENT_FILTERS"]

MAX_BODY = 16 * 1024 * 1024     # bytes of one JSON response
MAX_EVENT_LINE = 64 * 1024      # bytes of one /events line
REQUEST_TIMEOUT = 10.0          # seconds for one request, body included
_ERROR_TEXT = 300

# What makes a refresh worthwhile: containers starting and going away, and
# containers joining or leaving networks.  Both Docker's and Podman's names are
# listed (Podman says "died" and "remove" where Docker says "die" and "destroy");
# Docker matches event values exactly and ignores names it does not know.
EVENT_FILTERS = {
    "type": ["container", "network"],
    "event": ["start", "die", "died", "stop", "kill", "destroy", "remove", "connect", "disconnect",
              "pause", "unpause"],
}


class EngineError(Exception):
    """A request to the Engine failed; the message is one line. C{status} is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Unanswered(EngineError):
    """Opening C{/events} got no answer at all (unreachable, timeout): an outage the refresh loop reports."""


def _one_line(text: str, limit: int = _ERROR_TEXT) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@implementer(IAgentEndpointFactory)
class _SocketEndpoints:
    """Every URI goes to the Engine's socket (the host part of the URL is ignored)."""

    def __init__(self, reactor, description: str, timeout: float) -> None:
        self.reactor = reactor
        self.description = description
        self.timeout = timeout

    def endpointForURI(self, uri):
        description = self.description
        if description.startswith("unix:") and ":timeout=" not in description:
            description += f":timeout={max(1, round(self.timeout))}"  # connect timeout of the socket
        return endpoints.clientFromString(self.reactor, description)


class _BoundedBody(protocol.Protocol):
    """Collects a response body; fails with L{EngineError} beyond C{limit} bytes."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred = defer.Deferred(self._cancel)

    def _cancel(self, d) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()
            self.done.errback(EngineError(f"{self.what}: response body larger than {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason=None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(EngineError(f"{self.what}: response cut short: {_one_line(reason.getErrorMessage())}"))


class EngineClient:
    """
    Requests to one Docker Engine.  C{description} is a Twisted client endpoint string
    (C{unix:/var/run/docker.sock}, see L{pipegate.ports.docker.parse_docker_host}).
    """

    def __init__(self, reactor, description: str, timeout: float = REQUEST_TIMEOUT,
                 max_body: int = MAX_BODY) -> None:
        self.reactor = reactor
        self.description = description
        self.timeout = timeout
        self.max_body = max_body
        # No "Starting factory" line per request.
        self.pool = quiet_pool(HTTPConnectionPool(reactor, persistent=False))
        self.agent = Agent.usingEndpointFactory(reactor, _SocketEndpoints(reactor, description, timeout),
                                                pool=self.pool)

    @staticmethod
    def path(path: str, query: Mapping[str, Any] | None = None) -> str:
        """C{/containers/json} plus C{query}; dict and list values are sent as JSON (Docker's C{filters})."""
        if not query:
            return path
        items = [(k, json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else
                  ("true" if v is True else "false" if v is False else str(v))) for k, v in query.items()]
        return path + "?" + urlencode(items)

    def _url(self, path: str) -> bytes:
        return b"http://docker" + path.encode("ascii")

    def request(self, method: str, path: str, body: object = None, query: Mapping[str, Any] | None = None,
                ok: tuple[int, ...] = (200, 201, 204, 304)) -> defer.Deferred:
        """
        C{method path} with C{body} sent as JSON; fires with the decoded JSON answer
        (C{None} for an empty body) or fails with L{EngineError}.  HTTP statuses outside
        C{ok} are errors carrying the Engine's C{message}.
        """
        full = self.path(path, query)
        what = f"{method} {path}"
        d = defer.ensureDeferred(self._request(method, full, body, what, ok))
        d.addTimeout(self.timeout, self.reactor,
                     onTimeoutCancel=lambda result, timeout: _timed_out(result, what, timeout))
        return d

    async def _request(self, method: str, full: str, body: object, what: str, ok: tuple[int, ...]):
        producer = None
        headers = Headers({b"Accept": [b"application/json"]})
        if body is not None:
            producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode("utf-8")))
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
        try:
            response = await self.agent.request(method.encode("ascii"), self._url(full), headers, producer)
        except defer.CancelledError:
            raise
        except Exception as e:
            if _was_cancelled(e):  # Agent wraps a cancel after the request went out
                raise defer.CancelledError() from None
            raise EngineError(f"{what}: cannot reach the engine at {self.description}: {_reason(e)}") from None
        reader = _BoundedBody(self.max_body, what)
        response.deliverBody(reader)
        data = await reader.done
        if response.code not in ok:
            raise EngineError(f"{what}: HTTP {response.code}: {_engine_message(data)}", response.code)
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            raise EngineError(f"{what}: invalid JSON from the engine: {_one_line(str(e))}") from None

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()

    # -- the calls used by discovery and helpers
    def get(self, path: str, **query) -> defer.Deferred:
        return self.request("GET", path, query=query or None)

    def containers(self, all: bool = False, filters: Mapping | None = None) -> defer.Deferred:
        query: dict[str, Any] = {"all": all} if all else {}
        if filters:
            query["filters"] = dict(filters)
        return self.request("GET", "/containers/json", query=query or None)

    def inspect(self, container: str) -> defer.Deferred:
        return self.request("GET", f"/containers/{quote(container, safe='')}/json")

    def network(self, name: str) -> defer.Deferred:
        return self.request("GET", f"/networks/{quote(name, safe='')}")

    def create_network(self, name: str) -> defer.Deferred:
        return self.request("POST", "/networks/create",
                            {"Name": name, "Driver": "bridge", "CheckDuplicate": True})

    def create_container(self, name: str, spec: Mapping) -> defer.Deferred:
        return self.request("POST", "/containers/create", dict(spec), query={"name": name})

    def start(self, container: str) -> defer.Deferred:
        return self.request("POST", f"/containers/{quote(container, safe='')}/start")

    def remove(self, container: str) -> defer.Deferred:
        return self.request("DELETE", f"/containers/{quote(container, safe='')}", query={"force": True})


def _timed_out(result, what: str, timeout: float):
    raise EngineError(f"{what}: no answer from the engine within {timeout:g} s")


def _was_cancelled(e: Exception) -> bool:
    """Agent reports a request cancelled in flight as ResponseNeverReceived/RequestTransmissionFailed."""
    return any(isinstance(r, Failure) and r.check(defer.CancelledError) for r in getattr(e, "reasons", None) or ())


def _reason(e: BaseException) -> str:
    if isinstance(e, error.ConnectError) and isinstance(e.osError, int):
        # A UNIX socket's ConnectError carries the bare errno (str() would print "2"), the words in args.
        text = os.strerror(e.osError)
        if e.osError == errno.EACCES:
            return f"{text} (give the process the socket's group, or run it as root: docs/docker.md §1)"
        return text
    if isinstance(e, error.ConnectError) and e.osError is not None:
        return _one_line(str(e.osError))
    reasons = getattr(e, "reasons", None)  # ResponseNeverReceived & co carry a list of Failures
    if reasons:
        return _one_line("; ".join(r.getErrorMessage() for r in reasons))
    return _one_line(str(e) or type(e).__name__)


def _engine_message(data: bytes) -> str:
    """The C{message} of an Engine error body (Docker and Podman both send one), else the text."""
    text = data.decode("utf-8", "replace")
    try:
        message = json.loads(text).get("message")
        if isinstance(message, str) and message:
            return _one_line(message)
    except (ValueError, AttributeError, RecursionError):
        pass
    return _one_line(text) or "(empty body)"


# ---------------------------------------------------------------------------
# /events


class _EventLines(protocol.Protocol):
    """Splits the C{/events} body into lines; a line over the bound ends the stream."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.finished: defer.Deferred = defer.Deferred(lambda d: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.buffer += data
        while True:
            line, newline, rest = self.buffer.partition(b"\n")
            if not newline:
                break
            self.buffer = rest
            self.stream.line_received(line)
        if len(self.buffer) > self.stream.max_line:
            self.buffer = b""
            self._stop()
            self.finished.errback(EngineError(
                f"GET /events: a line longer than {self.stream.max_line} bytes; reconnecting"))

    def connectionLost(self, reason=None) -> None:
        if not self.finished.called:
            if self.buffer.strip():
                self.stream.line_received(self.buffer)
            self.finished.callback(None)


def backoff_delay(attempt: int, initial: float = 1.0, maximum: float = 60.0) -> float:
    """Seconds before reconnect C{attempt} (1, 2, ...): doubling from C{initial}, at most C{maximum}, jittered."""
    base = min(maximum, initial * 2 ** min(attempt - 1, 30))
    return base * (0.5 + random.random() / 2)


class EventStream(service.Service):
    """
    Follows C{GET /events} (filtered by L{EVENT_FILTERS}) while running; every event
    that parses as a JSON object goes to C{on_event(event)}.  C{on_connected()} is called
    each time the stream (re)opens, since events may have been missed meanwhile.  When
    the stream ends or fails it is reopened after a jittered backoff (C{retry(attempt)}
    seconds); a bad line is logged and skipped, a line over C{max_line} bytes drops the
    connection.
    """

    log = Logger()

    def __init__(self, engine: EngineClient, on_event: Callable[[dict], None],
                 on_connected: Callable[[], None] | None = None,
                 retry: Callable[[int], float] = backoff_delay, max_line: int = MAX_EVENT_LINE) -> None:
        self.engine = engine
        self.on_event = on_event
        self.on_connected = on_connected or (lambda: None)
        self.retry = retry
        self.max_line = max_line
        self.attempt = 0
        self.connected = False
        self._pending: defer.Deferred | None = None
        self._timer = None
        self.bad_lines = 0
        self._logged = False

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self):
        super().stopService()
        self._timer = cancel(self._timer)
        self._pending = cancel(self._pending)

    def _connect(self) -> None:
        self._timer = None
        if not self.running:
            return
        d = defer.ensureDeferred(self._follow())
        self._pending = d
        d.addErrback(self._failed)
        d.addCallback(lambda _: self._ended(d))

    async def _follow(self) -> None:
        engine = self.engine
        full = engine.path("/events", {"filters": EVENT_FILTERS})
        try:
            opening = engine.agent.request(b"GET", engine._url(full), Headers({b"Accept": [b"application/json"]}))
            response = await opening.addTimeout(engine.timeout, engine.reactor)
        except defer.CancelledError:
            raise
        except defer.TimeoutError:
            raise _Unanswered(f"GET /events: no answer from the engine within {engine.timeout:g} s") from None
        except Exception as e:
            raise _Unanswered(f"GET /events: cannot reach the engine at {engine.description}: {_reason(e)}") from None
        if response.code != 200:
            reader = _BoundedBody(engine.max_body, "GET /events")
            response.deliverBody(reader)
            data = await reader.done
            raise EngineError(f"GET /events: HTTP {response.code}: {_engine_message(data)}", response.code)
        lines = _EventLines(self)
        response.deliverBody(lines)
        if self.attempt:
            self.log.info("docker: event stream from {engine} open again", engine=engine.description)
        self.attempt = 0
        self.connected = True
        self.on_connected()
        try:
            await lines.finished
        finally:
            self.connected = False

    def line_received(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            event = None
        if not isinstance(event, dict):
            self.bad_lines += 1
            self.log.warn("docker: ignoring an event line that is not a JSON object ({size} bytes)", size=len(line))
            return
        self.on_event(event)

    def _failed(self, failure: Failure):
        if failure.check(defer.CancelledError) or not self.running:
            return None
        message = failure.getErrorMessage() if failure.check(EngineError) else _one_line(str(failure.value))
        if self.attempt == 0:
            # No answer at all (unreachable, timeout): the refresh loop, which meets the same outage,
            # logs the one error line (docs/docker.md §5). An HTTP error is the stream's alone.
            if not failure.check(_Unanswered):
                self.log.error("docker: event stream: {error}", error=message)
            self._logged = True
        return None

    def _ended(self, d) -> None:
        if self._pending is d:
            self._pending = None
        if not self.running:
            return
        self.attempt += 1
        if self.attempt == 1 and not self._logged:
            self.log.info("docker: event stream from {engine} ended; reopening", engine=self.engine.description)
        self._logged = False
        self._timer = self.engine.reactor.callLater(self.retry(self.attempt), self._connect)
