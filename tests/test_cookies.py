"""
Cookies through a tunnel reached by path: the relay scopes an app's C{Path=/} cookie to
C{/<id>/}, so it does not go with requests to every other tunnel of the relay (one browser
origin); by subdomain the app's cookies pass as they are.
"""

from __future__ import annotations

from twisted.trial import unittest
from twisted.web import resource

from pipegate.http.cookies import scope_cookies, scoped
from tests.support import Loopback, connect_raw, request


class Scoping(unittest.TestCase):
    def test_path_put_under_prefix(self):
        self.assertEqual(scoped(b"sid=1; Path=/; HttpOnly", b"/t1"), b"sid=1; Path=/t1/; HttpOnly")
        self.assertEqual(scoped(b"a=b;path=/x/y", b"/t1"), b"a=b; Path=/t1/x/y")
        self.assertEqual(scoped(b"a=b; PATH = /x; Secure", b"/MyApp"), b"a=b; Path=/MyApp/x; Secure")

    def test_kept_when_already_scoped_relative_or_absent(self):
        for value in (b"sid=1; Path=/t1/", b"sid=1; Path=/t1", b"sid=1; Path=/t1/admin",
                      b"sid=1", b"sid=1; Path=relative", b"sid=1; Path=", b"path=/; Secure"):
            self.assertEqual(scoped(value, b"/t1"), value)
        self.assertEqual(scoped(b"sid=1; Path=/t10", b"/t1"), b"sid=1; Path=/t1/t10")

    def test_only_set_cookie_touched(self):
        pairs = [(b"Location", b"/x; Path=/"), (b"Set-Cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2")]
        self.assertEqual(scope_cookies(pairs, b"/t1"),
                         [(b"Location", b"/x; Path=/"), (b"Set-Cookie", b"a=1; Path=/t1/"),
                          (b"set-cookie", b"b=2")])
        plain = [(b"Content-Type", b"text/plain")]
        self.assertIs(scope_cookies(plain, b"/t1"), plain)


class Cookies(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.responseHeaders.setRawHeaders(b"set-cookie", [b"sid=s3cret; Path=/; HttpOnly", b"theme=dark"])
        return b"set"


class ThroughTheRelay(unittest.TestCase):
    async def setUp(self):
        loop = Loopback(self)
        app = await loop.app(Cookies())
        _, self.relay_port = await loop.relay(domain="localhost")
        await loop.connector(self.relay_port, app, "t1")
        self.agent = loop.agent()

    async def test_path_mode_scopes_cookie_to_tunnel(self):
        response, body = await request(self.agent, b"GET",
                                       f"http://127.0.0.1:{self.relay_port.getHost().port}/T1/x")
        self.assertEqual(body, b"set")
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"),
                         [b"sid=s3cret; Path=/T1/; HttpOnly", b"theme=dark"])

    async def test_subdomain_mode_passes_cookie_as_set(self):
        proto = await connect_raw(self.relay_port, b"GET /x HTTP/1.1\r\nHost: t1.localhost\r\n"
                                                   b"Connection: close\r\n\r\n")
        answer = await proto.done
        self.assertIn(b": sid=s3cret; Path=/; HttpOnly\r\n", answer)
        self.assertNotIn(b"/t1", answer.lower())
