"""
Where a JSON document comes from: the SOURCE of C{--services}, C{--filter} and
C{--ingress-policy} (pure: no reactor, no sockets; URLs are read by the caller's
C{fetch}).

A SOURCE is inline JSON (starting with C{[} or C{{}), an C{http(s)://} URL read through
a caller-supplied C{fetch(url) -> bytes}, or a file path.  Every L{SourceError} message
is a single line naming the source (L{source_label}); the port plane's services
(L{pipegate.ports.services}) and the ingress policy (L{pipegate.core.policydoc}) both
load their documents here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "Fetch",
    "SourceError",
    "load_source",
    "source_label",
]

_INLINE_LABEL_CHARS = 40

Fetch = Callable[[str], bytes]


class SourceError(ValueError):
    """A source cannot be read or is not JSON; the message is one line naming the source."""


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _is_url(text: str) -> bool:
    lowered = text.lower()
    return lowered.startswith("http://") or lowered.startswith("https://")


def _redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc="***@" + host))


def source_label(source: str) -> str:
    """
    How messages name a SOURCE: the path, the URL (any C{user:password@} hidden), or
    C{inline JSON '<first 40 characters>...'}.  Always one line.
    """
    text = source.strip()
    if text.startswith(("[", "{")):
        flat = _one_line(text)
        if len(flat) > _INLINE_LABEL_CHARS:
            flat = flat[:_INLINE_LABEL_CHARS] + "..."
        return f"inline JSON '{flat}'"
    if _is_url(text):
        return _one_line(_redact_url(text))
    return _one_line(text) if text == _one_line(text) else repr(text)


def _decode(data: bytes | str, label: str) -> object:
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise SourceError(f"{label}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"{label}: not UTF-8 text (byte {e.start})") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise SourceError(f"{label}: invalid JSON: {_one_line(str(e))}") from None


def load_source(source: str, fetch: Fetch | None = None) -> object:
    """
    Read the JSON document a C{--services}, C{--filter} or C{--ingress-policy} SOURCE names.

    The value is stripped, then read as inline JSON if it starts with C{[} or C{{}, as
    the body of C{fetch(url)} if it is an C{http://} or C{https://} URL, and as a file
    path otherwise.  Any failure is a L{SourceError} naming the source.
    """
    text = source.strip()
    label = source_label(source)
    if not text:
        raise SourceError("empty source: expected inline JSON, an http(s) URL or a file path")
    if text.startswith(("[", "{")):
        return _decode(text, label)
    if _is_url(text):
        if fetch is None:
            raise SourceError(f"{label}: URLs need a fetch function; none was given")
        try:
            body = fetch(text)
        except SourceError:
            raise
        except Exception as e:
            detail = _one_line(str(e)) or type(e).__name__
            raise SourceError(f"{label}: fetch failed: {detail}") from None
        return _decode(body, label)
    try:
        with open(text, "rb") as f:
            body = f.read()
    except FileNotFoundError:
        raise SourceError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise SourceError(f"{label}: is a directory, not a file") from None
    except OSError as e:
        raise SourceError(f"{label}: cannot read: {e.strerror or e}") from None
    return _decode(body, label)
