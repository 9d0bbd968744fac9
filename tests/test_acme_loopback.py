"""
Automatic HTTPS pieces on loopback sockets and in a child process, without Pebble: the
plain listener's challenge and redirect answers (and the attacks on them), the issuer's
reading of CA errors Pebble cannot produce, and the acme library staying unloaded.
The unit tests are in tests/test_acme.py; the whole thing against Pebble in
tests/test_acme_pebble.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.internet import reactor
from twisted.trial import unittest

from pipegate.http.acme import Challenges, ChallengeFirstSite
from pipegate.http.acmeclient import AcmeFailure
from pipegate.http.certstore import CertStore
from pipegate.http.relay import Relay, RelayConfig
from tests.support import SETTINGS, Loopback, request


# -- the plain listener


class PlainListener(unittest.TestCase):
    async def setUp(self):
        self.loop = Loopback(self)
        self.relay = Relay(RelayConfig(jwt=SETTINGS, domain="example.test"), reactor)
        self.relay.startService()
        self.loop.services.append(self.relay)
        self.logins: list[str] = []
        self.relay.tunnels.login_observers.append(self.logins.append)
        self.challenges = Challenges()
        self.challenges.publish("tok-EN_1", "tok-EN_1.thumbprint")
        self.redirect = None

    async def listen(self, redirect: int | None = None):
        port = await self.loop.listen(ChallengeFirstSite(self.relay, self.challenges, redirect))
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.agent = self.loop.agent()

    async def get(self, path: str, host: str = "example.test", method: bytes = b"GET"):
        return await request(self.agent, method, self.base + path, headers={b"host": host.encode()})

    async def test_challenge_answered_before_tunnel_routing(self):
        await self.listen()
        for host in ("example.test", "app1.example.test", "127.0.0.1"):
            response, body = await self.get("/.well-known/acme-challenge/tok-EN_1", host)
            self.assertEqual((response.code, body), (200, b"tok-EN_1.thumbprint"), host)
        response, body = await self.get("/.well-known/acme-challenge/other")
        self.assertEqual(response.code, 404)
        response, _ = await self.get("/.well-known/acme-challenge/tok-EN_1", method=b"POST")
        self.assertEqual(response.code, 405)
        response, body = await self.get("/.well-known/acme-challenge/..%2F..%2Fetc")
        self.assertEqual(response.code, 404)
        self.challenges.withdraw("tok-EN_1")
        response, _ = await self.get("/.well-known/acme-challenge/tok-EN_1")
        self.assertEqual(response.code, 404)
        # Everything else is the relay's as before, and strangers' Host names order nothing.
        response, body = await self.get("/healthz")
        self.assertEqual(response.code, 200)
        response, body = await self.get("/", "stranger.example.test")
        self.assertEqual((response.code, body), (404, b"tunnel offline\n"))
        self.assertEqual(self.logins, [])

    async def test_redirect(self):
        await self.listen(redirect=443)
        response, _ = await self.get("/a/b?c=d", "app1.example.test:80")
        self.assertEqual(response.code, 308)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"https://app1.example.test/a/b?c=d"])
        response, body = await self.get("/.well-known/acme-challenge/tok-EN_1", "app1.example.test")
        self.assertEqual(response.code, 200)
        for bad in ("evil.test/x", "a b", "", "ex@mple.test"):
            response, _ = await self.get("/", bad)
            self.assertEqual(response.code, 400, bad)

    async def test_redirect_answers_at_the_headers_and_drops_the_body(self):
        """A huge upload to the plain listener is answered at once, never buffered."""
        from twisted.internet import endpoints, protocol

        from tests.support import RawHTTP

        await self.listen(redirect=8443)
        for path in (b"/upload", b"/.well-known/acme-challenge/tok-EN_1"):
            raw = RawHTTP(b"POST " + path + b" HTTP/1.1\r\nHost: example.test\r\n"
                          b"Content-Length: 10000000000\r\n\r\n" + b"x" * 65536)
            port = int(self.base.rsplit(":", 1)[1])
            await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                protocol.Factory.forProtocol(lambda: raw))
            await raw.done
            head = bytes(raw.received).split(b"\r\n")[0]
            self.assertIn(head, (b"HTTP/1.1 308 Permanent Redirect", b"HTTP/1.1 405 Method Not Allowed"), path)

    async def test_logins_are_observed(self):
        await self.listen()
        app = await self.loop.app()
        await self.loop.connector(await self.loop.listen(
            ChallengeFirstSite(self.relay, self.challenges)), app, "app1")
        self.assertEqual(self.logins, ["app1"])


# -- the issuer's reading of CA errors


class _ProblemCA:
    """A CA endpoint that answers every request with one problem document (a stand-in only
    for what Pebble cannot be made to do: rate limits)."""

    def __init__(self, status: int, problem: dict, retry_after: str | None) -> None:
        from twisted.web import resource

        outer = self

        class Root(resource.Resource):
            isLeaf = True

            def render(self, request):
                outer.hits += 1
                request.setResponseCode(status)
                request.setHeader(b"content-type", b"application/problem+json")
                if retry_after is not None:
                    request.setHeader(b"retry-after", retry_after.encode())
                return json.dumps(problem).encode()

        self.hits = 0
        self.root = Root()


class IssuerErrors(unittest.TestCase):
    async def issue_against(self, status: int, problem: dict, retry_after: str | None = None):
        from twisted.internet import threads
        from twisted.web import server

        from pipegate.http.acmeclient import Issuer

        ca = _ProblemCA(status, problem, retry_after)
        port = await Loopback(self).listen(server.Site(ca.root))
        store = CertStore(self.mktemp())
        store.prepare()
        challenges = Challenges()
        issuer = Issuer(f"http://127.0.0.1:{port.getHost().port}/dir", store, challenges.publish,
                        challenges.withdraw, timeout=5)
        with self.assertRaises(AcmeFailure) as caught:
            await threads.deferToThread(issuer.issue, "example.test")
        self.assertEqual(ca.hits, 1)
        return caught.exception

    async def test_rate_limited_with_retry_after(self):
        error = await self.issue_against(429, {"type": "urn:ietf:params:acme:error:rateLimited",
                                               "detail": "too many certificates already issued"}, "120")
        self.assertEqual(error.kind, "rate_limited")
        self.assertTrue(error.rate_limited)
        self.assertIn("too many certificates already issued", error.problem)
        self.assertLessEqual(abs(error.retry_after - 120), 2)

    async def test_ca_error_carries_the_problem_document(self):
        error = await self.issue_against(503, {"type": "urn:ietf:params:acme:error:serverInternal",
                                               "detail": "maintenance"}, "30")
        self.assertEqual(error.kind, "ca_error")
        self.assertEqual(error.problem, "urn:ietf:params:acme:error:serverInternal: maintenance")
        self.assertLessEqual(abs(error.retry_after - 30), 2)

    async def test_not_json_is_a_ca_error(self):
        error = await self.issue_against(500, [])
        self.assertEqual(error.kind, "ca_error")


class Unreachable(unittest.TestCase):
    """What an operator reads when the directory cannot be reached: the URL and the cause, short."""

    async def issue(self, url: str, ca_file: str | None = None) -> AcmeFailure:
        from twisted.internet import threads

        from pipegate.http.acmeclient import Issuer

        store = CertStore(self.mktemp())
        store.prepare()
        challenges = Challenges()
        issuer = Issuer(url, store, challenges.publish, challenges.withdraw, ca_file=ca_file, timeout=5)
        with self.assertRaises(AcmeFailure) as caught:
            await threads.deferToThread(issuer.issue, "example.test")
        self.assertEqual(caught.exception.kind, "unreachable")
        return caught.exception

    async def test_connection_refused(self):
        from tests.support import free_port

        port = free_port()
        error = await self.issue(f"https://127.0.0.1:{port}/dir")
        self.assertEqual(error.problem, f"cannot reach https://127.0.0.1:{port}/dir: Connection refused")

    async def test_untrusted_certificate_points_at_acme_ca_file(self):
        from twisted.internet import ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.web import resource, server

        from pipegate.tlsreload import options_from_pem
        from tests.test_systemd import make_cert

        cert, key = make_cert()
        factory = TLSMemoryBIOFactory(options_from_pem(cert, key), False, server.Site(resource.Resource()))
        port = (await Loopback(self).listen(factory)).getHost().port
        error = await self.issue(f"https://127.0.0.1:{port}/dir")
        self.assertTrue(error.problem.startswith(f"cannot reach https://127.0.0.1:{port}/dir: certificate "
                                                 "verify failed: "), error.problem)
        self.assertTrue(error.problem.endswith("(a CA of your own: --acme-ca-file)"), error.problem)
        del ssl


class LazyImport(unittest.TestCase):
    def test_acme_library_loaded_only_for_an_order(self):
        """Not without --acme-directory, and with it not before the first order."""
        state = os.path.abspath(self.mktemp())
        for args in ([], ["--acme-directory", "https://acme.test/dir", "--https", "tcp:0", "--domain", "a.test",
                          "--acme-state", state]):
            code = ("import sys; from pipegate.tap import server as tap; from twisted.internet.testing import "
                    "MemoryReactorClock; o = tap.Options(); o.environ = {'PIPEGATE_JWT_SECRET': 'x' * 40}; "
                    f"o.parseOptions({args!r}); tap.makeService(o, MemoryReactorClock()); "
                    "print(sorted(m for m in ('acme', 'josepy', 'requests', 'pipegate.http.acmeclient') "
                    "if m in sys.modules))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            self.assertEqual(out.stdout.strip(), "[]", out.stderr)
