"""
How a public request names its tunnel (sans-IO: bytes in, an answer out).

A caller reaches a tunnel by the first path segment (C{/<id>/path}) or, with
C{--domain}, by its host name (C{Host: <id>.<domain>}).  A bare C{/<id>} is redirected
to C{/<id>/}.  C{/healthz} is the relay's own, except on a tunnel's host name.
"""

from __future__ import annotations

import attrs

from pipegate import auth


@attrs.frozen
class Redirect:
    """L{route}'s answer for a bare C{/<id>}: go to C{location} (C{/<id>/?query})."""

    location: bytes


@attrs.frozen
class Route:
    """L{route}'s answer for a tunnel's request: its id, the target the app sees, the prefix cut off."""

    tunnel_id: str
    target: bytes
    prefix: bytes


def directory_redirect(first: bytes, slash: bytes, query_sep: bytes, query: bytes,
                       method: bytes, upgrade: bool) -> Redirect | None:
    """
    C{GET /<id>?q} (no slash after the id) -> redirect to C{/<id>/?q}, as a web server
    does for a directory: proxied as C{/}, the app's relative links would resolve
    against the relay's root.  Only GET and HEAD without Upgrade: a redirect would drop
    another method's body, and a WebSocket client does not follow one.
    """
    if slash or upgrade or method not in (b"GET", b"HEAD"):
        return None
    return Redirect(b"/" + first + b"/" + query_sep + query)


def domain_label(host: bytes | None, domain: str | None) -> str | None:
    """With a C{domain} (C{--domain}): the first label of a C{Host: <label>.<domain>}, else None."""
    if not domain:
        return None
    name = (host or b"").decode("latin-1").lower()
    name = name.rsplit(":", 1)[0] if not name.endswith("]") else name
    name = name.rstrip(".")  # a fully qualified name (abc.example.com.) is the same host
    suffix = "." + domain.lower()
    return name[: -len(suffix)] if name.endswith(suffix) else None


def is_health(uri: bytes, host: bytes | None, domain: str | None) -> bool:
    """C{/healthz} is the relay's own, except on a tunnel's host name."""
    return uri.split(b"?")[0] == b"/healthz" and domain_label(host, domain) is None


def _absolute(uri: bytes) -> tuple[bytes, bytes] | None:
    """
    An absolute-form target (RFC 9112 3.2.2, C{http://host:port/path?query}) as its
    authority and the rest (C{/path?query}, C{?query} or empty); None for any other form.
    """
    if uri[:7].lower() == b"http://" or uri[:8].lower() == b"https://":
        rest = uri.split(b"//", 1)[1]
        cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
        return rest[:cut], rest[cut:]
    return None


def host_refusal(uri: bytes, hosts: list[bytes], domain: str | None) -> str | None:
    """
    Why a request's C{Host} lines (C{hosts}, all of them) make its tunnel ambiguous, or
    None.  More than one C{Host} line is refused (RFC 9112 3.2 asks for 400): the relay
    routes by one, and a proxy or filter in front of it may have looked at the other.  With
    C{--domain}, where the host names the tunnel, an absolute-form target must name the
    same host as C{Host}: RFC 9112 3.2.2 has a server route by the target's authority, the
    relay by C{Host}, and a proxy in front that follows the RFC would send one tunnel's
    caller to another's app.
    """
    if len(hosts) > 1:
        return "more than one Host header"
    if domain:
        absolute = _absolute(uri)
        if absolute is not None and (not hosts or absolute[0].lower() != hosts[0].strip().lower()):
            return "the request target and Host name different hosts"
    return None


def route(uri: bytes, host: bytes | None, method: bytes, upgrade: bool,
          domain: str | None) -> Route | Redirect | str:
    """
    Map a request (its target, C{Host}, method, whether it asks for an Upgrade) to a
    L{Route}, a L{Redirect}, or an error reason (C{"unknown tunnel"}: 404, else 400).
    """
    absolute = _absolute(uri)
    if absolute is not None:   # keep the origin-form part
        rest = absolute[1]
        uri = rest if rest[:1] == b"/" else b"/" + rest
    if not uri.startswith(b"/"):
        return "bad request target"
    label = domain_label(host, domain)
    if label is not None:
        if not auth.valid_connection_id(label):
            return "unknown tunnel"
        return Route(label, uri, b"")
    path, sep, query = uri.partition(b"?")
    first, slash, rest = path[1:].partition(b"/")
    try:
        tunnel_id = first.decode("ascii")
    except UnicodeDecodeError:
        return "unknown tunnel"
    if not auth.valid_connection_id(tunnel_id):
        return "unknown tunnel"
    redirect = directory_redirect(first, slash, sep, query, method, upgrade)
    if redirect is not None:
        return redirect
    # Connection ids are case-insensitive (as host names are): /MyApp is tunnel myapp.
    return Route(tunnel_id.lower(), b"/" + rest + sep + query, b"/" + first)
