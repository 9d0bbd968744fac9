"""
The relay's list of revoked token ids (C{jti}) and connection ids (C{--revoked FILE}).

L{parse_revocations} is pure; L{RevocationWatcher} is the shell that polls the file's
stat on an injected clock, re-reads it when it changes (and on demand, for SIGHUP) and
hands the new list to a callback.  An unreadable file keeps the last good list.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import attrs
from twisted.application import service
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

# A jti of pipegate token (32 hex) or of other issuers, or a connection id.
ENTRY = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:=+/-]{0,127}\Z")
POLL_INTERVAL = 2.0   # seconds between stat calls: a change is noticed within this (docs promise 5 s)
MAX_FILE_BYTES = 16 * 1024 * 1024


@attrs.frozen
class Revocations:
    """Entries are kept lower-case: connection ids are case-insensitive, jti compared likewise."""

    entries: frozenset[str] = frozenset()

    def revoked(self, jti: str | None, tunnel_id: str) -> bool:
        return tunnel_id.lower() in self.entries or (jti is not None and jti.lower() in self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def parse_revocations(text: str) -> tuple[Revocations, list[tuple[int, str]]]:
    """
    One entry per line; C{#} starts a comment (whole line or after the entry); blank lines
    are skipped.  Returns the list and the bad lines as (line number, why).
    """
    entries: set[str] = set()
    bad: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not ENTRY.match(entry):
            why = "more than one word" if len(entry.split()) > 1 else "not a token id or connection id"
            bad.append((number, why))
            continue
        entries.add(entry.lower())
    return Revocations(frozenset(entries)), bad


def _signature(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class RevocationWatcher(service.Service):
    """Polls C{path} every C{interval} s on C{clock}; C{on_change(Revocations)} after each good read."""

    log = Logger()

    def __init__(self, path: str, clock: IReactorTime, on_change: Callable[[Revocations], None],
                 interval: float = POLL_INTERVAL) -> None:
        self.path = path
        self.clock = clock
        self.on_change = on_change
        self.interval = interval
        self.current = Revocations()
        self._seen: tuple | None = None
        self._loop: task.LoopingCall | None = None
        self._failing = False

    def load(self) -> Revocations:
        """Read the file now; raise OSError/UnicodeError (used at startup, where it stops the relay)."""
        st = os.stat(self.path)
        with open(self.path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise OSError(f"{self.path}: larger than {MAX_FILE_BYTES} bytes")
        revocations, bad = parse_revocations(data.decode("utf-8"))
        for number, why in bad:
            self.log.warn("{path}:{line}: skipped ({why})", path=self.path, line=number, why=why)
        self._seen = _signature(st)
        self.current = revocations
        return revocations

    def reload(self) -> None:
        """Read the file whether or not it changed (SIGHUP)."""
        self._read(force=True)

    def poll(self) -> None:
        self._read(force=False)

    def _read(self, force: bool) -> None:
        try:
            if not force and self._seen == _signature(os.stat(self.path)):
                self._failing = False
                return
            before = self.current
            revocations = self.load()
        except (OSError, UnicodeError) as e:
            if force or not self._failing:
                self.log.error("--revoked {path}: cannot read it ({error}); keeping the last good list "
                               "of {count} entries", path=self.path, error=e, count=len(self.current))
            self._failing = True
            return
        self._failing = False
        self.log.info("--revoked {path}: {count} entries{change}", path=self.path, count=len(revocations),
                      change="" if revocations != before else " (unchanged)")
        try:
            self.on_change(revocations)
        except Exception:
            # Never let one failure end the polling: revocation would stop without a word.
            self.log.failure("--revoked {path}: applying the new list failed", path=self.path)

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda failure: self.log.failure("--revoked {path}: polling stopped", failure, path=self.path))

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()
