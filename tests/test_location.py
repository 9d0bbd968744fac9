"""
An app that builds an absolute redirect from the C{Host} it sees (the target's, as the
connector sends it) sends the caller back to the public URL, not to C{127.0.0.1:<app port>}.
"""

from __future__ import annotations

from twisted.trial import unittest
from twisted.web import resource, util

from pipegate.http.location import public_location
from pipegate.http.target import Target
from tests.support import Loopback, connect_raw, request


def loc(value: bytes, target: str = "http://127.0.0.1:3000", prefix: bytes = b"/t1") -> bytes:
    [(_, out)] = public_location([(b"Location", value)], Target.parse(target), b"https",
                                 b"relay.example", prefix)
    return out


class Rewrite(unittest.TestCase):
    def test_app_origin_becomes_public_url(self):
        self.assertEqual(loc(b"http://127.0.0.1:3000/next?a=1"), b"https://relay.example/t1/next?a=1")
        self.assertEqual(loc(b"HTTP://127.0.0.1:3000"), b"https://relay.example/t1/")
        self.assertEqual(loc(b"http://127.0.0.1:3000/x", prefix=b""), b"https://relay.example/x")
        self.assertEqual(loc(b"http://127.0.0.1:3000/base/x", "http://127.0.0.1:3000/base"),
                         b"https://relay.example/t1/x")

    def test_other_locations_kept(self):
        for value in (b"/next", b"next", b"https://example.com/", b"http://127.0.0.1:30001/x",
                      b"https://127.0.0.1:3000/x", b"http://127.0.0.1:3000@evil.example/"):
            self.assertEqual(loc(value), value)
        self.assertEqual(loc(b"http://127.0.0.1:3000/other", "http://127.0.0.1:3000/base"),
                         b"http://127.0.0.1:3000/other")
        self.assertEqual(loc(b"http://127.0.0.1:3000/basement", "http://127.0.0.1:3000/base"),
                         b"http://127.0.0.1:3000/basement")

    def test_no_public_host_no_change(self):
        headers = [(b"Location", b"http://127.0.0.1:3000/x")]
        self.assertIs(public_location(headers, Target.parse("http://127.0.0.1:3000"), b"http", b"", b"/t1"),
                      headers)


class ByHost(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return util.redirectTo(b"http://" + request.getHeader(b"host") + b"/next", request)


class ThroughTheTunnel(unittest.TestCase):
    async def setUp(self):
        loop = Loopback(self)
        app = await loop.app(ByHost())
        _, self.relay_port = await loop.relay(domain="localhost")
        await loop.connector(self.relay_port, app, "t1")
        self.agent = loop.agent()
        self.port = self.relay_port.getHost().port

    async def test_path_mode(self):
        response, _ = await request(self.agent, b"GET", f"http://127.0.0.1:{self.port}/t1/login")
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"),
                         [f"http://127.0.0.1:{self.port}/t1/next".encode()])

    async def test_subdomain_mode(self):
        proto = await connect_raw(self.relay_port, b"GET /login HTTP/1.1\r\nHost: t1.localhost:%d\r\n"
                                                   b"Connection: close\r\n\r\n" % self.port)
        answer = await proto.done
        self.assertIn(b"\r\nlocation: http://t1.localhost:%d/next\r\n" % self.port, answer.lower())
