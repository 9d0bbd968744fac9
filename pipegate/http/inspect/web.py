"""
The inspector's listener: a twisted.web resource tree with the JSON API, a live feed
(Server-Sent Events) and the page, which is plain HTML, CSS and JS from package data.

    GET    /                              the page
    GET    /api/requests                  {"requests": [summary, ...]}, newest first
    DELETE /api/requests                  forget every entry
    GET    /api/requests/<id>             summary + "request" and "response"
    POST   /api/requests/<id>/replay      replay (JSON overrides); 201 + the new entry
    GET    /api/feed                      text/event-stream: "request" and "clear" events

The inspector shows bodies and headers of strangers' requests and can make requests to
the local app, so besides listening on loopback it refuses what a web page elsewhere
could make a browser send it: a C{Host} that is a name other than C{localhost} (DNS
rebinding) and a foreign C{Origin} or C{Sec-Fetch-Site: cross-site} (cross-site requests).
"""

from __future__ import annotations

import ipaddress
import json
import re
from importlib import resources as package_files

from twisted.application import service, strports
from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import http, resource, server, static
from zope.interface import implementer

from pipegate.http.inspect.recorder import Entry, Recorder
from pipegate.http.inspect.replay import ReplayError, Replayer

# Bytes of one API request body (a replay's overrides, the body in base64 among them).
MAX_POST = 16 * 1024 * 1024
# Live-feed clients at once (each browser tab is one); beyond it 503.
MAX_FEED_CLIENTS = 16
# A feed client that has this many bytes of events waiting in its socket buffer is dropped.
MAX_FEED_BACKLOG = 1024 * 1024
# Seconds between keepalive comments on the feed (they also reveal clients that left).
FEED_HEARTBEAT = 15.0

SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                b"connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                b"form-action 'none'; frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
    b"x-frame-options": b"DENY",
}

STATIC = {
    b"": ("index.html", "text/html; charset=utf-8"),
    b"index.html": ("index.html", "text/html; charset=utf-8"),
    b"inspector.js": ("inspector.js", "text/javascript; charset=utf-8"),
    b"inspector.css": ("inspector.css", "text/css; charset=utf-8"),
}


def _static() -> dict[bytes, static.Data]:
    """The page's files (package data), read once."""
    files = package_files.files(__package__) / "static"
    return {name: static.Data((files / filename).read_bytes(), content_type)
            for name, (filename, content_type) in STATIC.items()}


def _json(request, code: int, document) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document).encode() + b"\n"


def _error(code: int, message: str) -> resource.Resource:
    class Error(resource.Resource):
        isLeaf = True

        def render(self, request):
            return _json(request, code, {"error": message})
    return Error()


def refusal(request) -> str | None:
    """Why a request must be refused (see the module's docstring), or None."""
    host = (request.getHeader(b"host") or b"").decode("latin-1").strip().lower()
    name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if name != "localhost":
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return "Host must be an IP address or localhost"
    origin = request.getHeader(b"origin")
    if origin is not None and origin.decode("latin-1").lower() != f"http://{host}":
        return "cross-origin requests are refused"
    if (request.getHeader(b"sec-fetch-site") or b"").lower() == b"cross-site":
        return "cross-site requests are refused"
    return None


class InspectorRequest(server.Request):
    """A request whose body is counted and dropped beyond L{MAX_POST} (413)."""

    too_large = False
    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_POST:
            self.too_large = True
            return
        super().handleContentChunk(data)


class Root(resource.Resource):
    def __init__(self, recorder: Recorder, replayer: Replayer, feed: Feed) -> None:
        super().__init__()
        self.api = resource.Resource()
        self.api.putChild(b"requests", Requests(recorder, replayer))
        self.api.putChild(b"feed", feed)
        self.static = _static()

    def getChildWithDefault(self, name, request):
        for key, value in SECURITY_HEADERS.items():
            request.setHeader(key, value)
        why = refusal(request)
        if why is not None:
            return _error(http.FORBIDDEN, why)
        if getattr(request, "too_large", False):
            return _error(http.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_POST} bytes")
        if name == b"api":
            return self.api
        if name in self.static and not request.postpath:
            return self.static[name]
        return _error(http.NOT_FOUND, "not found")


class Requests(resource.Resource):
    def __init__(self, recorder: Recorder, replayer: Replayer) -> None:
        super().__init__()
        self.recorder = recorder
        self.replayer = replayer

    def getChild(self, name, request):
        if name == b"":
            return self
        entry = self.recorder.get(name.decode("latin-1"))
        if entry is None:
            return _error(http.NOT_FOUND, "no such request")
        return EntryResource(entry, self.replayer)

    def render_GET(self, request):
        return _json(request, http.OK, {"requests": [e.summary() for e in self.recorder.newest_first()]})

    def render_DELETE(self, request):
        self.recorder.clear()
        return _json(request, http.OK, {"requests": []})


class EntryResource(resource.Resource):
    """One entry: C{GET <id>} its detail, C{POST <id>/replay} replays it."""

    isLeaf = True

    def __init__(self, entry: Entry, replayer: Replayer) -> None:
        super().__init__()
        self.entry = entry
        self.replayer = replayer

    def render(self, request):
        below = request.postpath
        if below == [b"replay"]:
            if request.method != b"POST":
                raise resource.UnsupportedMethod([b"POST"])
            return self._replay(request)
        if below in ([], [b""]):
            return super().render(request)   # render_GET (and HEAD); 405 otherwise
        return _error(http.NOT_FOUND, "not found").render(request)

    def render_GET(self, request):
        return _json(request, http.OK, self.entry.detail())

    def _replay(self, request):
        raw = request.content.read()
        try:
            overrides = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            return _json(request, http.BAD_REQUEST, {"error": f"not JSON: {e}"})
        try:
            d = self.replayer.replay(self.entry.id, overrides)
        except ReplayError as e:
            return _json(request, e.code, {"error": str(e)})
        gone = []
        request.notifyFinish().addErrback(lambda f: gone.append(f))

        def answer(entry: Entry) -> None:
            if not gone:
                request.write(_json(request, http.CREATED, entry.detail()))
                request.finish()
        d.addCallback(answer)
        return server.NOT_DONE_YET


@implementer(IPushProducer)
class FeedClient:
    """One browser on the feed; dropped when its socket buffer holds too much."""

    def __init__(self, feed: Feed, request) -> None:
        self.feed = feed
        self.request = request
        self.paused = False
        self.backlog = 0

    def send(self, data: bytes) -> None:
        if self.paused:
            self.backlog += len(data)
            if self.backlog > self.feed.max_backlog:
                self.feed.log.info("dropping a slow inspector feed client")
                self.feed.remove(self)
                self.request.transport.abortConnection()
                return
        self.request.write(data)

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self.backlog = 0

    def stopProducing(self):
        self.feed.remove(self)


class Feed(resource.Resource):
    """C{GET /api/feed}: each entry as it starts and ends, as Server-Sent Events."""

    isLeaf = True
    log = Logger()

    def __init__(self, recorder: Recorder, clock, max_clients: int = MAX_FEED_CLIENTS,
                 max_backlog: int = MAX_FEED_BACKLOG, heartbeat: float = FEED_HEARTBEAT) -> None:
        super().__init__()
        self.recorder = recorder
        self.max_clients = max_clients
        self.max_backlog = max_backlog
        self.clients: list[FeedClient] = []
        self.heartbeat = task.LoopingCall(self._broadcast, b": keepalive\n\n")
        self.heartbeat.clock = clock
        self.heartbeat_interval = heartbeat
        recorder.listeners.append(self._event)

    def render_GET(self, request):
        if len(self.clients) >= self.max_clients:
            return _json(request, http.SERVICE_UNAVAILABLE,
                         {"error": f"{self.max_clients} feed clients already connected"})
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"x-accel-buffering", b"no")
        client = FeedClient(self, request)
        self.clients.append(client)
        request.registerProducer(client, True)
        request.notifyFinish().addBoth(lambda _: self.remove(client))
        if not self.heartbeat.running:
            self.heartbeat.start(self.heartbeat_interval, now=False)
        request.write(b"retry: 2000\n\n")
        return server.NOT_DONE_YET

    def remove(self, client: FeedClient) -> None:
        if client in self.clients:
            self.clients.remove(client)
            if client.request.producer is not None:
                client.request.unregisterProducer()
        if not self.clients and self.heartbeat.running:
            self.heartbeat.stop()

    def _event(self, event: str, entry: Entry | None) -> None:
        data = json.dumps(entry.summary() if entry is not None else {})
        self._broadcast(f"event: {event}\ndata: {data}\n\n".encode())

    def _broadcast(self, data: bytes) -> None:
        for client in list(self.clients):
            client.send(data)

    def close(self) -> None:
        """End every feed response (the inspector is stopping)."""
        for client in list(self.clients):
            self.remove(client)
            if not client.request.finished:
                client.request.finish()
        if self._event in self.recorder.listeners:
            self.recorder.listeners.remove(self._event)


class Inspector(service.MultiService):
    """
    The recorder, its replayer and feed, and the listener on server endpoint C{endpoint}
    (without one, the caller listens with L{site}).
    """

    log = Logger()

    def __init__(self, recorder: Recorder, agent, target, reactor, endpoint: str | None = None) -> None:
        super().__init__()
        self.recorder = recorder
        self.replayer = Replayer(recorder, agent, target, reactor)
        self.feed = Feed(recorder, reactor)
        self.site = server.Site(Root(recorder, self.replayer, self.feed), reactor=reactor)
        self.site.requestFactory = InspectorRequest
        self.site.noisy = False
        self.site.displayTracebacks = False
        self.endpoint = endpoint
        if endpoint is not None:
            listening = strports.service(endpoint, self.site, reactor=reactor)
            listening.endpoint = _Announced(listening.endpoint)   # logs the URL to open
            listening.setServiceParent(self)

    def startService(self):
        if self.endpoint is not None and not is_loopback_endpoint(self.endpoint):
            self.log.warn("the inspector at {endpoint} shows request bodies and headers and replays "
                          "requests: keep it on loopback (interface=127.0.0.1)", endpoint=self.endpoint)
        super().startService()

    def stopService(self):
        self.feed.close()
        self.replayer.cancel_all()
        return super().stopService()


def is_loopback_endpoint(description: str) -> bool:
    """Whether a tcp/ssl server endpoint string names a loopback interface (unix: counts as local)."""
    parts = re.split(r"(?<!\\):", description)
    if parts[0].lower() == "unix":
        return True
    for part in parts:
        if part.startswith("interface="):
            value = part.split("=", 1)[1].replace("\\", "")
            try:
                return ipaddress.ip_address(value.strip("[]")).is_loopback
            except ValueError:
                return value == "localhost"
    return False


def inspector_url(port) -> str:
    """The page's URL for a listening port (on every interface: its loopback one)."""
    address = port.getHost()
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{address.port}/"


class _Announced:
    """A server endpoint whose port, once listening, is logged as the inspector's URL."""

    log = Logger()

    def __init__(self, endpoint) -> None:
        self.endpoint = endpoint

    def listen(self, factory):
        def listening(port):
            self.log.info("request inspector at {url} (every request through the tunnel, with replay)",
                          url=inspector_url(port))
            return port
        return self.endpoint.listen(factory).addCallback(listening)
