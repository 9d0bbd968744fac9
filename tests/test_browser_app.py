"""
A real web app used through the HTTP plane from a real headless Chromium (Playwright,
as in tests/test_inspect_browser.py), in path mode (C{/t1/...}) and subdomain mode
(C{t1.localhost}): relative links, a multipart upload, redirects, a Path=/ cookie,
a WebSocket echo and Server-Sent Events from page JavaScript, gzip, a 1 MB download,
HEAD, ETag revalidation (If-None-Match -> 304), with the request inspector's
recorder on the connector (it must not hold back a stream or an upgrade).

The SSE resource sends its second event only after the page has acknowledged the first
one, so an event held back anywhere on the way stalls the page (the test times out)
instead of being measured against a clock.
"""

from __future__ import annotations

import json

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor, threads
from twisted.trial import unittest
from twisted.web import resource, server, util
from twisted.web.server import GzipEncoderFactory
from twisted.web.resource import EncodingResourceWrapper

from pipegate.http.inspect.recorder import Recorder
from tests.support import Loopback, debian_tool
from tests.test_inspect_browser import CHROMIUM_ARGS, TIMEOUT_MS, sync_playwright

BIG = bytes(range(256)) * 4096  # 1 MiB
PAGE = b"""<!doctype html><html><head><title>app</title></head><body>
<a id="next" href="next">next</a>
<form id="up" action="upload" method="post" enctype="multipart/form-data">
<input type="file" name="f"><input name="note" value="hi"><button>send</button></form>
</body></html>"""


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


class Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def render(self, request):
        return self.fn(request)


class Events(resource.Resource):
    """text/event-stream: event 1 at once, event 2 once the page has acked event 1."""
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.waiting = []

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"data: one\n\n")
        self.waiting.append(request)
        request.notifyFinish().addErrback(lambda _: self.waiting.remove(request)
                                          if request in self.waiting else None)
        return server.NOT_DONE_YET

    def ack(self, request):
        for r in list(self.waiting):
            self.waiting.remove(r)
            r.write(b"data: two\n\n")
            r.finish()
        return b"ok"


class App(resource.Resource):
    def __init__(self):
        super().__init__()
        self.events = Events()
        self.conditional = 0
        self.seen = {}
        ws = WebSocketServerFactory()
        ws.protocol = Echo
        self.putChild(b"", Leaf(lambda r: self.page(r)))
        self.putChild(b"next", Leaf(lambda r: b"<p id=n>next page</p>"))
        self.putChild(b"upload", Leaf(self.upload))
        self.putChild(b"rel", Leaf(lambda r: util.redirectTo(b"next", r)))
        self.putChild(b"abs", Leaf(self.absolute))
        self.putChild(b"cookie", Leaf(self.cookie))
        self.putChild(b"ws", WebSocketResource(ws))
        self.putChild(b"events", self.events)
        self.putChild(b"ack", Leaf(self.events.ack))
        self.putChild(b"gz", EncodingResourceWrapper(Leaf(lambda r: b"z" * 5000), [GzipEncoderFactory()]))
        self.putChild(b"big", Leaf(lambda r: BIG))
        self.putChild(b"etag", Leaf(self.etag))

    def page(self, request):
        request.setHeader(b"content-type", b"text/html")
        return PAGE

    def upload(self, request):
        f = request.args.get(b"f", [b""])[0]
        return json.dumps({"size": len(f), "note": request.args.get(b"note", [b""])[0].decode(),
                           "cookie": (request.getCookie(b"sid") or b"").decode()}).encode()

    def absolute(self, request):
        host = request.getHeader(b"x-forwarded-host") or request.getHeader(b"host")
        prefix = request.getHeader(b"x-forwarded-prefix") or b""
        return util.redirectTo(b"http://" + host + prefix + b"/next", request)

    def cookie(self, request):
        request.addCookie(b"sid", b"s3cret", path=b"/")
        return b"set"

    def etag(self, request):
        request.setHeader(b"cache-control", b"no-cache")
        if request.setETag(b'"v1"') is not None:  # CACHED: If-None-Match matched
            self.conditional += 1
            return b""
        return b"tagged"


SCRIPT = """async () => {
  const out = {};
  const ws = new WebSocket(new URL("ws", location.href).href.replace(/^http/, "ws"));
  out.ws = await new Promise((ok, no) => {
    ws.onopen = () => ws.send("ping \u00e9");
    ws.onmessage = e => { ok(e.data); ws.close(); };
    ws.onerror = () => no(new Error("websocket failed"));
  });
  out.sse = await new Promise((ok, no) => {
    const got = [];
    const es = new EventSource("events");
    es.onmessage = e => {
      got.push(e.data);
      if (got.length === 1) fetch("ack");
      if (got.length === 2) { es.close(); ok(got); }
    };
    es.onerror = () => { if (got.length < 2) { es.close(); no(new Error("sse failed " + got)); } };
  });
  const gz = await fetch("gz");
  out.gz = [gz.headers.get("content-encoding"), (await gz.text()).length];
  const big = await fetch("big");
  out.big = (await big.arrayBuffer()).byteLength;
  const head = await fetch("big", {method: "HEAD"});
  out.head = [head.status, head.headers.get("content-length"), (await head.text()).length];
  const e1 = await fetch("etag");
  const e2 = await fetch("etag");
  out.etag = [e1.status, await e1.text(), e2.status, await e2.text()];
  return out;
}"""


def drive(playwright, chromium: str, base: str) -> dict:
    seen = {}
    with playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(base + "/cookie")
            page.goto(base + "/")
            page.click("#next")
            page.wait_for_selector("#n")
            seen["next_url"] = page.url
            page.goto(base + "/")
            page.set_input_files("input[type=file]", {"name": "a.bin", "mimeType": "application/octet-stream",
                                                      "buffer": BIG[:300_000]})
            page.click("button")
            page.wait_for_load_state()
            seen["upload"] = json.loads(page.inner_text("body"))
            seen["upload_url"] = page.url
            for name in ("rel", "abs"):
                page.goto(base + "/" + name)
                page.wait_for_selector("#n")
                seen[name] = page.url
            page.goto(base + "/")
            seen.update(page.evaluate(SCRIPT))
            seen["cookie_paths"] = [c["path"] for c in page.context.cookies() if c["name"] == "sid"]
        finally:
            browser.close()
    return seen


class BrowserApp(unittest.TestCase):
    timeout = 120

    async def run_mode(self, subdomain: bool) -> None:
        chromium = debian_tool(self, "chromium", "/usr/bin/chromium")
        playwright = sync_playwright(self)
        loop = Loopback(self)
        app = App()
        app_port = await loop.app(app)
        _, relay_port = await loop.relay(domain="localhost" if subdomain else None)
        recorder = Recorder(reactor, 500, 65_536)
        await loop.connector(relay_port, app_port, "t1", observer=recorder)
        port = relay_port.getHost().port
        base = f"http://t1.localhost:{port}" if subdomain else f"http://127.0.0.1:{port}/t1"
        seen = await threads.deferToThread(drive, playwright, chromium, base)
        self.assertEqual(seen["next_url"], base + "/next")
        self.assertEqual(seen["upload"], {"size": 300_000, "note": "hi", "cookie": "s3cret"})
        self.assertEqual(seen["upload_url"], base + "/upload")
        self.assertEqual(seen["rel"], base + "/next")
        self.assertEqual(seen["abs"], base + "/next")
        self.assertEqual(seen["ws"], "ping \u00e9")
        self.assertEqual(seen["sse"], ["one", "two"])
        self.assertEqual(seen["gz"], ["gzip", 5000])
        self.assertEqual(seen["big"], len(BIG))
        self.assertEqual(seen["head"], [200, str(len(BIG)), 0])
        self.assertEqual(seen["etag"], [200, "tagged", 200, "tagged"])
        self.assertEqual(app.conditional, 1)
        # By path all tunnels are one origin: the relay scoped the app's Path=/ cookie.
        self.assertEqual(seen["cookie_paths"], ["/" if subdomain else "/t1/"])
        # The inspector saw the upload, the event stream and the WebSocket.
        paths = {e.summary()["path"] for e in recorder.newest_first()}
        self.assertLessEqual({"/upload", "/events", "/ws"}, paths)

    async def test_path_mode(self):
        await self.run_mode(subdomain=False)

    async def test_subdomain_mode(self):
        await self.run_mode(subdomain=True)
