"""
Log observers for twistd's C{--logger} option.

    twistd --nodaemon --pidfile= --logger pipegate.logs.json pipegate-server ...

writes one JSON object per line to standard output (journald and log shippers take it
as it is); C{pipegate.logs.text} is twistd's usual text format on standard output.
Each JSON line has C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{message} (the
formatted text), C{traceback} when a failure is attached, and the event's own named
fields (C{tunnel_id}, C{peer}, C{reason}, ...) when they are plain JSON values.
"""

from __future__ import annotations

import json as _json
import sys
from datetime import datetime, timezone
from typing import IO

from twisted.logger import ILogObserver, formatEvent, textFileLogObserver
from zope.interface import implementer

_SCALARS = (str, int, float, bool, type(None))
_RESERVED = {"time", "level", "namespace", "message", "traceback"}


def record(event: dict) -> dict:
    """The JSON object for one twisted.logger event."""
    level = event.get("log_level")
    out = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        out["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _RESERVED or key in ("format", "message", "isError",
                                                                 "system", "time", "why"):
            continue
        if isinstance(value, _SCALARS):
            out[key] = value
    return out


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one line of JSON to C{out}."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict) -> None:
        try:
            line = _json.dumps(record(event), default=str)
        except Exception as e:  # never let a strange event break logging
            line = _json.dumps({"level": "error", "message": f"unloggable event: {e}"})
        self.out.write(line + "\n")
        self.out.flush()


def json() -> JSONLinesObserver:
    """C{twistd --logger pipegate.logs.json}: JSON lines on standard output."""
    return JSONLinesObserver(sys.stdout)


def text():
    """C{twistd --logger pipegate.logs.text}: text lines on standard output."""
    return textFileLogObserver(sys.stdout)
