"""
Replay: send a recorded request again, straight to the local app through the
connector's own L{Agent} and pool (not through the relay), and record what comes back
as a new entry whose C{replay_of} is the original.
"""

from __future__ import annotations

import base64
import binascii
import uuid

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client, http
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from pipegate.http.inspect.recorder import Entry, Recorder
from pipegate.http.pipe import filter_headers

# A replay that has not finished in this many seconds is cancelled (the answer says so).
REPLAY_TIMEOUT = 60.0
# Replays running at once; beyond it the API answers 429.
MAX_REPLAYS = 8
# Set by the Agent from the method, URL and body: never taken from a recording.
_AGENT_SETS = frozenset({b"content-length", b"transfer-encoding"})


class ReplayError(Exception):
    """The replay cannot be made as asked: C{code} is the HTTP status for the API."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _b(value, what: str) -> bytes:
    if not isinstance(value, str):
        raise ReplayError(http.BAD_REQUEST, f"{what}: expected a string")
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise ReplayError(http.BAD_REQUEST, f"{what}: only Latin-1 characters are allowed") from None


def _token(value: bytes, what: str) -> bytes:
    if not value or any(c <= 32 or c >= 127 or c in b'()<>@,;:\\"/[]?={}' for c in value):
        raise ReplayError(http.BAD_REQUEST, f"{what}: not an HTTP token: {value!r}")
    return value


def build_request(entry: Entry, overrides: dict) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    """
    (method, path, headers, body) for a replay of C{entry} with C{overrides} (any of
    C{method}, C{path}, C{headers} as [[name, value], ...], C{body} in base64).
    """
    if not isinstance(overrides, dict):
        raise ReplayError(http.BAD_REQUEST, "expected a JSON object")
    unknown = set(overrides) - {"method", "path", "headers", "body"}
    if unknown:
        raise ReplayError(http.BAD_REQUEST, f"unknown field(s): {', '.join(sorted(unknown))}")
    if entry.upgrade:
        raise ReplayError(http.CONFLICT, "an upgraded connection cannot be replayed")
    method = _token(_b(overrides["method"], "method"), "method") if "method" in overrides else entry.method
    path = _b(overrides["path"], "path") if "path" in overrides else entry.path
    if not path.startswith(b"/") or any(c <= 32 or c == 127 for c in path):
        raise ReplayError(http.BAD_REQUEST, "path: must start with / and hold no spaces or control characters")
    if "headers" in overrides:
        given = overrides["headers"]
        if not isinstance(given, list) or not all(isinstance(h, list) and len(h) == 2 for h in given):
            raise ReplayError(http.BAD_REQUEST, "headers: expected a list of [name, value] pairs")
        headers = []
        for name, value in given:
            name, value = _token(_b(name, "header name"), "header name"), _b(value, "header value")
            if b"\r" in value or b"\n" in value or b"\0" in value:
                raise ReplayError(http.BAD_REQUEST, f"header {name.decode()}: value holds a line break")
            headers.append((name, value))
    else:
        headers = list(entry.request_headers)
        # A fresh correlation id, so the app's logs tell the replay from the original.
        headers = [(n, v) for n, v in headers if n.lower() != b"x-pipegate-correlation-id"]
        headers.append((b"X-Pipegate-Correlation-Id", uuid.uuid4().hex.encode()))
    if "body" in overrides:
        if not isinstance(overrides["body"], str):
            raise ReplayError(http.BAD_REQUEST, "body: expected base64 text")
        try:
            body = base64.b64decode(overrides["body"], validate=True)
        except (binascii.Error, ValueError):
            raise ReplayError(http.BAD_REQUEST, "body: not valid base64") from None
    else:
        if entry.request.truncated:
            raise ReplayError(http.CONFLICT, f"the request body was kept only up to {len(entry.request.kept)} "
                                             f"of {entry.request.size} bytes; give a body to replay it")
        if not entry.request.complete:
            raise ReplayError(http.CONFLICT, "the request body has not been received in full yet")
        body = bytes(entry.request.kept)
    headers = [(n, v) for n, v in filter_headers(headers) if n.lower() not in _AGENT_SETS]
    return method, path, headers, body


class _Capture(Protocol):
    """Reads a replay's response into its entry (the cap applies; the rest is counted)."""

    def __init__(self, entry: Entry) -> None:
        self.entry = entry
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.entry.response.feed(data)

    def connectionLost(self, reason: Failure) -> None:
        if reason.check(client.ResponseDone, http.PotentialDataLoss):
            self.entry.response.complete = True
            self.done.callback(None)
        else:
            self.done.errback(reason)


@attrs.define(eq=False)
class Replayer:
    """Replays entries of C{recorder} to the app at C{target} with C{agent}."""

    log = Logger()

    recorder: Recorder
    agent: object
    target: object
    clock: object
    timeout: float = REPLAY_TIMEOUT
    max_running: int = MAX_REPLAYS
    running: set[defer.Deferred] = attrs.field(factory=set, init=False)

    def replay(self, entry_id: str, overrides: dict) -> defer.Deferred[Entry]:
        """Fires with the new entry once the app has answered in full (or failed)."""
        original = self.recorder.get(entry_id)
        if original is None:
            raise ReplayError(http.NOT_FOUND, f"no request {entry_id!r}")
        if len(self.running) >= self.max_running:
            raise ReplayError(429, f"{self.max_running} replays are already running")
        method, path, headers, body = build_request(original, overrides)
        entry = self.recorder.add(method, path, headers, replay_of=original.id)
        entry.request.feed(body)
        entry.request.complete = True
        return defer.Deferred.fromCoroutine(self._send(entry, method, path, headers, body))

    async def _send(self, entry: Entry, method, path, headers, body) -> Entry:
        hdrs = Headers()
        for name, value in headers:
            hdrs.addRawHeader(name, value)
        url = self.target.scheme + b"://" + self.target.authority + path
        d = self.agent.request(method, url, hdrs, _Bytes(body) if body else None)
        capture = _Capture(entry)
        timed_out = []

        def stop():
            timed_out.append(True)
            if capture.transport is None:
                d.cancel()  # (d may be 'called' yet waiting on the connection's Deferred)
            else:
                capture.transport.stopProducing()

        self.running.add(stop)
        timer = self.clock.callLater(self.timeout, stop)
        try:
            response = await d
            self.recorder.response_head(entry, response.code, response.phrase, filter_headers(
                list(response.headers.getAllRawHeaders())))
            response.deliverBody(capture)
            await capture.done
            self.recorder.finish(entry)
        except Exception as e:
            if timed_out:
                reason = f"no complete answer within {self.timeout:g} s"
            else:
                failure = Failure(e)
                reason = failure.getErrorMessage()
                if failure.check(client.ResponseNeverReceived, client.RequestTransmissionFailed,
                                 client.ResponseFailed) and failure.value.reasons:
                    reason = failure.value.reasons[0].getErrorMessage()
                reason = f"the local app failed: {reason}"
            self.recorder.finish(entry, reason)
        finally:
            self.running.discard(stop)
            if timer.active():
                timer.cancel()
        return entry

    def cancel_all(self) -> None:
        """Stop every running replay (the inspector is stopping)."""
        for stop in list(self.running):
            stop()


@implementer(IBodyProducer)
class _Bytes:
    """A replay's body: at most the inspector's cap or the size of the API's POST."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass
