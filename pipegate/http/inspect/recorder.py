"""
The inspector's record of requests (sans-IO: no reactor, no sockets).

A L{Recorder} keeps at most C{max_entries} L{Entry} objects, the oldest dropped first,
and of each body only its first C{body_bytes} bytes (every byte is counted).  The
connector calls L{Recorder.begin} for each stream and feeds the returned
L{StreamRecording} the frames of that stream; nothing here holds on to a body beyond
the cap, so an inspected 1 GiB upload costs the cap, not the upload.
"""

from __future__ import annotations

import base64
import itertools
from typing import Callable

import attrs
from twisted.internet.interfaces import IReactorTime

from pipegate.http import frames

# How much of an upgraded connection's answer is read for its handshake (status + headers).
HANDSHAKE_BYTES = 16_384


@attrs.define(eq=False)
class Capture:
    """The first C{cap} bytes of a body, and how many bytes it had in all."""

    cap: int
    kept: bytearray = attrs.field(factory=bytearray)
    size: int = 0
    complete: bool = False

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        room = self.cap - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    @property
    def truncated(self) -> bool:
        return self.size > len(self.kept)


def _text(value: bytes) -> str:
    return value.decode("latin-1")


@attrs.define(eq=False)
class Entry:
    """One request (or one upgraded connection) as the inspector shows it."""

    id: str
    method: bytes
    path: bytes
    started: float
    request_headers: list[tuple[bytes, bytes]]
    request: Capture
    response: Capture
    replay_of: str | None = None
    upgrade: bool = False
    status: int | None = None
    reason: bytes = b""
    response_headers: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    duration_ms: float | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.duration_ms is not None

    def summary(self) -> dict:
        out = {
            "id": self.id, "method": _text(self.method), "path": _text(self.path),
            "status": self.status, "duration_ms": self.duration_ms, "started": self.started,
            "replay_of": self.replay_of, "upgrade": self.upgrade, "error": self.error,
            "request_size": self.request.size, "response_size": self.response.size,
        }
        if self.upgrade:
            out["bytes_to_app"] = self.request.size
            out["bytes_from_app"] = self.response.size
        return out

    def detail(self) -> dict:
        out = self.summary()
        out["request"] = _part(self.request_headers, self.request, self.upgrade)
        out["response"] = _part(self.response_headers, self.response, self.upgrade)
        out["response"]["reason"] = _text(self.reason)
        return out


def _part(headers, capture: Capture, upgrade: bool) -> dict:
    # An upgraded connection's bytes are a protocol of their own (WebSocket frames): the
    # entry shows its handshake and byte counts, not the bytes.
    kept = b"" if upgrade else bytes(capture.kept)
    return {
        "headers": [[_text(n), _text(v)] for n, v in headers],
        "body": base64.b64encode(kept).decode(),
        "body_size": capture.size,
        "body_truncated": capture.size > len(kept),
    }


class Recorder:
    """
    The bounded ring of entries, newest last.  Listeners (the live feed) are called
    with C{("request", entry)} when an entry starts or ends and C{("clear", None)}.
    """

    def __init__(self, clock: IReactorTime, max_entries: int = 500, body_bytes: int = 65_536) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.clock = clock
        self.max_entries = max_entries
        self.body_bytes = body_bytes
        self.entries: dict[str, Entry] = {}
        self._ids = itertools.count(1)
        self.listeners: list[Callable[[str, Entry | None], None]] = []

    def _notify(self, event: str, entry: Entry | None) -> None:
        for listener in list(self.listeners):
            listener(event, entry)

    def add(self, method: bytes, path: bytes, headers, *, replay_of: str | None = None,
            upgrade: bool = False) -> Entry:
        """Start an entry; the oldest goes when there are more than C{max_entries}."""
        entry = Entry(
            id=str(next(self._ids)), method=method, path=path, started=self.clock.seconds(),
            request_headers=list(headers), request=Capture(self.body_bytes),
            response=Capture(HANDSHAKE_BYTES if upgrade else self.body_bytes),
            replay_of=replay_of, upgrade=upgrade,
        )
        self.entries[entry.id] = entry
        while len(self.entries) > self.max_entries:
            del self.entries[next(iter(self.entries))]
        self._notify("request", entry)
        return entry

    def response_head(self, entry: Entry, status: int, reason: bytes, headers) -> None:
        entry.status, entry.reason, entry.response_headers = status, reason, list(headers)

    def finish(self, entry: Entry, error: str | None = None) -> None:
        """The exchange is over (C{error} says why when it did not complete)."""
        if entry.done:
            return
        entry.duration_ms = round((self.clock.seconds() - entry.started) * 1000, 3)
        if error is not None and entry.error is None:
            entry.error = error
        if entry.upgrade:
            _parse_handshake(entry)
        if entry.id in self.entries:
            self._notify("request", entry)

    def newest_first(self) -> list[Entry]:
        return list(reversed(self.entries.values()))

    def get(self, entry_id: str) -> Entry | None:
        return self.entries.get(entry_id)

    def clear(self) -> None:
        self.entries.clear()
        self._notify("clear", None)

    # the connector's observer interface
    def begin(self, head: frames.RequestHead, path: bytes, headers) -> StreamRecording:
        """A stream from the relay starts; C{headers} are those sent to the app."""
        pairs = [(n, v) for n, vs in headers.getAllRawHeaders() for v in vs]
        entry = self.add(head.method, path, pairs, upgrade=head.upgrade)
        entry.request.complete = head.end
        return StreamRecording(self, entry)


def _parse_handshake(entry: Entry) -> None:
    """An upgraded connection's answer (C{HTTP/1.1 101 ...} and headers) from its first bytes."""
    head, sep, _ = bytes(entry.response.kept).partition(b"\r\n\r\n")
    if not sep:
        return
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) >= 2 and parts[1].isdigit():
        entry.status = int(parts[1])
        entry.reason = parts[2] if len(parts) > 2 else b""
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            entry.response_headers.append((name.strip(), value.strip()))


class StreamRecording:
    """Feeds one stream's frames into its entry: what came from the relay, what went back."""

    __slots__ = ("recorder", "entry")

    def __init__(self, recorder: Recorder, entry: Entry) -> None:
        self.recorder = recorder
        self.entry = entry

    def received(self, frame: frames.Frame) -> None:
        """A frame from the relay (the caller's side)."""
        if isinstance(frame, frames.Data):
            self.entry.request.feed(frame.data)
        elif isinstance(frame, frames.End):
            self.entry.request.complete = True
        elif isinstance(frame, frames.Reset):
            self.recorder.finish(self.entry, f"the caller went away: {frame.reason.decode('utf-8', 'replace')}")

    def sent(self, frame: frames.Frame) -> None:
        """A frame to the relay (the app's side)."""
        if isinstance(frame, frames.Data):
            self.entry.response.feed(frame.data)
        elif isinstance(frame, frames.ResponseHead):
            self.recorder.response_head(self.entry, frame.status, frame.reason, frame.headers)
        elif isinstance(frame, frames.End):
            self.entry.response.complete = True
        elif isinstance(frame, frames.Reset):
            if self.entry.status is None:
                self.entry.status = frame.code
            self.recorder.finish(self.entry, frame.reason.decode("utf-8", "replace"))

    def closed(self, error: str | None = None) -> None:
        self.recorder.finish(self.entry, error)
