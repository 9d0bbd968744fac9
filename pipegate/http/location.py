"""
Redirects that name the local app: the connector sends the app C{Host: <target authority>},
so an app that builds an absolute C{Location} from C{Host} (rather than C{X-Forwarded-Host})
would send a browser to C{http://127.0.0.1:3000/...}, off the tunnel.  Such a C{Location}
is turned into the public URL the caller used (its scheme, host and the tunnel's prefix),
as Apache's C{ProxyPassReverse} does.  Any other C{Location} passes as the app sent it.
"""

from __future__ import annotations

from pipegate.http.target import Target


def public_location(headers, target: Target, scheme: bytes, host: bytes, prefix: bytes):
    """C{headers} (name, value pairs) with a C{Location} under C{target} made public."""
    if not host:
        return headers
    origin = (target.scheme + b"://" + target.authority).lower()
    out = []
    for name, value in headers:
        if name.lower() == b"location" and value[:len(origin)].lower() == origin:
            rest = value[len(origin):]
            if rest[:1] in (b"", b"/", b"?", b"#"):
                path = rest if rest[:1] == b"/" else b"/" + rest
                base = target.base
                if not base or path == base or path[:len(base) + 1] in (base + b"/", base + b"?", base + b"#"):
                    value = scheme + b"://" + host + prefix + (path[len(base):] or b"/")
        out.append((name, value))
    return out
