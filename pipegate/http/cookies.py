"""
Cookies of a tunnel reached by path (C{/<id>/...}): every tunnel of a relay then shares
one browser origin, so a cookie the app sets with C{Path=/} would go with requests to
every other tunnel on the relay (to their apps, and their owners), and two apps using
the same cookie name would overwrite each other's.  The relay scopes such a cookie to
the tunnel's prefix (C{Path=/} becomes C{Path=/<id>/}), as nginx's C{proxy_cookie_path}
would.  A path already under the prefix (an app that honours C{X-Forwarded-Prefix}) stays.
"""

from __future__ import annotations


def scope_cookies(pairs: list[tuple[bytes, bytes]], prefix: bytes) -> list[tuple[bytes, bytes]]:
    """C{pairs} (a response head's headers) with each C{Set-Cookie} path put under C{prefix}."""
    if not any(name.lower() == b"set-cookie" for name, _ in pairs):
        return pairs
    return [(name, scoped(value, prefix) if name.lower() == b"set-cookie" else value)
            for name, value in pairs]


def scoped(value: bytes, prefix: bytes) -> bytes:
    """One C{Set-Cookie} value with its C{Path} attribute(s) under C{prefix}."""
    parts = value.split(b";")
    for i in range(1, len(parts)):
        key, sep, path = parts[i].partition(b"=")
        path = path.strip()
        if key.strip().lower() != b"path" or not path.startswith(b"/"):
            continue  # no Path (or not absolute): the browser's default is under the prefix
        if path == prefix or path.startswith(prefix + b"/"):
            continue
        parts[i] = b" Path=" + prefix + path
    return b";".join(parts)
