"""
End-to-end tests of the HTTP plane: a real relay, a real connector and a real local
app, all on 127.0.0.1, talking real HTTP and real WebSockets.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import weakref

import attrs

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from pipegate.http import frames
from pipegate.http.public import RelayChannel
from pipegate.sockets import socket_transport
from pipegate.core import window
from tests.support import (
    Loopback, TestApp, collector_off, connect_raw, dechunk, eventually, pattern, raw_request, request, token_for,
    split_response, ws_connect,
)


class Tunnel(unittest.TestCase):
    """Round trips through relay + connector."""

    async def setUp(self):
        self.loop = Loopback(self)
        self.app = TestApp()
        self.app_port = await self.loop.app(self.app)
        self.relay, self.relay_port = await self.loop.relay()
        # A shared token, so that tests may add connectors to t1 with other shared tokens.
        self.connector = await self.loop.connector(self.relay_port, self.app_port, "t1",
                                                   token=token_for("t1", shared=True))
        self.base = f"http://127.0.0.1:{self.relay_port.getHost().port}"
        self.agent = self.loop.agent()

    async def test_get_head_post(self):
        response, body = await request(self.agent, b"GET", self.base + "/t1/api/x?a=1&b=2&a=3&flag")
        self.assertEqual(response.code, 200)
        seen = json.loads(body)
        self.assertEqual(seen["method"], "GET")
        self.assertEqual(seen["uri"], "/api/x?a=1&b=2&a=3&flag")

        response, body = await request(self.agent, b"HEAD", self.base + "/t1/big/1000")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(self.app.seen[-1]["method"], "HEAD")

        # A HEAD answer's Content-Length is the length a GET would have (RFC 9110 9.3.2),
        # and it reaches the caller as the app sent it, not as the empty body's 0.
        app = f"http://127.0.0.1:{self.app_port.getHost().port}/status/200"
        direct, _ = await request(self.agent, b"HEAD", app)
        self.assertEqual(direct.headers.getRawHeaders(b"content-length"), [b"10"])
        response, body = await request(self.agent, b"HEAD", self.base + "/t1/status/200")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"10"])

        payload = pattern(5 * 1024 * 1024)
        response, body = await request(self.agent, b"POST", self.base + "/t1/echo",
                                       {b"content-type": b"application/octet-stream"}, payload)
        self.assertEqual(response.code, 200)
        digest = hashlib.sha256(payload).hexdigest()
        self.assertEqual(hashlib.sha256(body).hexdigest(), digest)
        self.assertEqual(response.headers.getRawHeaders(b"x-body-sha256"), [digest.encode()])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/octet-stream"])

    async def test_windows_grow_while_the_next_hop_keeps_up(self):
        # Download: the relay's window for the response grows beyond the initial credit.
        size = 32 * 1024 * 1024
        link = self.relay.tunnels["t1"].links[0]
        done = defer.ensureDeferred(request(self.agent, b"GET", self.base + f"/t1/big/{size}"))
        await eventually(lambda: any(s.flow.recv.window > window.INITIAL_WINDOW for s in link.streams.values()),
                         timeout=30)
        self.assertLessEqual(max(s.flow.recv.window for s in link.streams.values()), frames.MAX_WINDOW)
        response, body = await done
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(pattern(size)).digest())
        # Upload: the connector's window for the request body grows too.
        session = self.connector.links[0].session
        payload = pattern(size)
        done = defer.ensureDeferred(request(self.agent, b"POST", self.base + "/t1/sha", body=payload))
        await eventually(lambda: any(s.flow.recv.window > window.INITIAL_WINDOW for s in session.streams.values()),
                         timeout=30)
        response, body = await done
        self.assertEqual(json.loads(body)["body_sha256"], hashlib.sha256(payload).hexdigest())
        # Both services got every byte of growth back from the finished streams.
        await eventually(lambda: self.relay.window_budget.used == 0 and self.connector.window_budget.used == 0)

    test_windows_grow_while_the_next_hop_keeps_up.timeout = 120

    async def test_forwarded_headers(self):
        response, body = await request(self.agent, b"GET", self.base + "/t1/who", {
            b"x-pipegate-correlation-id": b"forged", b"x-dup": [b"1", b"2"],
            b"connection": b"keep-alive, x-secret-hop", b"x-secret-hop": b"drop me",
        })
        headers = json.loads(body)["headers"]
        names = [k.lower() for k, v in headers]
        self.assertEqual([v for k, v in headers if k.lower() == "x-dup"], ["1", "2"])
        self.assertNotIn("x-secret-hop", names)
        self.assertNotIn("connection", [n for n in names if n != "connection"] or names[:0])
        correlation = [v for k, v in headers if k.lower() == "x-pipegate-correlation-id"]
        self.assertEqual(len(correlation), 1)
        self.assertRegex(correlation[0], r"^[0-9a-f]{32}$")
        self.assertIn(["X-Forwarded-For", "127.0.0.1"], headers)
        self.assertIn(["X-Forwarded-Proto", "http"], headers)
        self.assertIn(["X-Forwarded-Prefix", "/t1"], headers)
        self.assertIn(["X-Forwarded-Host", f"127.0.0.1:{self.relay_port.getHost().port}"], headers)
        host = [v for k, v in headers if k.lower() == "host"]
        self.assertEqual(host, [f"127.0.0.1:{self.app_port.getHost().port}"])

    async def test_a_connection_leaves_nothing_for_the_cycle_collector(self):
        # A caller's connection to the relay, once closed, is freed by reference counting
        # (its socket's eager write method made a cycle).  (The connector's connections to
        # the app are dialled through Twisted's HostnameEndpoint, whose Connector and Client
        # refer to each other; they are kept alive and reused: test_appclient.)
        refs, kinds = [], set()
        made = RelayChannel.connectionMade

        def recording(channel):
            made(channel)
            for o in (channel, socket_transport(channel.transport)):
                refs.append(weakref.ref(o))
                kinds.add(type(o).__name__)
        self.patch(RelayChannel, "connectionMade", recording)
        ask = b"GET /t1/api/x HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
        self.assertIn(b" 200 ", await raw_request(self.relay_port, ask))
        with collector_off():
            del refs[:]
            kinds.clear()
            self.assertIn(b" 200 ", await raw_request(self.relay_port, ask))
            self.assertEqual(kinds, {"RelayChannel", "Server"})
            await eventually(lambda: all(ref() is None for ref in refs), timeout=5)

    async def test_status_passthrough(self):
        for code in (201, 204, 302, 304, 404, 418, 500, 503, 299):
            response, body = await request(self.agent, b"GET", self.base + f"/t1/status/{code}")
            self.assertEqual(response.code, code)
            if code in (204, 304):
                self.assertEqual(body, b"")
        response, _ = await request(self.agent, b"GET", self.base + "/t1/status/302")
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/elsewhere"])

    async def test_methods(self):
        for method in (b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"PROPFIND", b"MKCOL"):
            response, body = await request(self.agent, method, self.base + "/t1/m")
            self.assertEqual(response.code, 200)
            self.assertEqual(json.loads(body)["method"], method.decode())

    async def test_id_only_path_redirects_to_the_directory(self):
        # Issue 18 item 1: GET /t1 used to be proxied as "/", so the app's relative links
        # and assets resolved against the relay's root.  Now: 301 to /t1/, query kept.
        seen = len(self.app.seen)
        for method in (b"GET", b"HEAD"):
            response, body = await request(self.agent, method, self.base + "/t1?x=1&y=%20")
            self.assertEqual(response.code, 301, method)
            self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/t1/?x=1&y=%20"])
        response, body = await request(self.agent, b"GET", self.base + "/t1")
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/t1/"])
        self.assertEqual(len(self.app.seen), seen)  # nothing reached the app
        response, body = await request(self.agent, b"GET", self.base + "/t1/?x=1")
        self.assertEqual(json.loads(body)["uri"], "/?x=1")
        # A redirect would lose another method's body: that one still goes to "/".
        response, body = await request(self.agent, b"POST", self.base + "/t1?x=1", body=b"data")
        self.assertEqual(json.loads(body)["uri"], "/?x=1")
        self.assertEqual(json.loads(body)["body_len"], 4)

    async def test_raw_utf8_request_line_is_accepted(self):
        # Issue 18 item 7: curl and several HTTP libraries send UTF-8 paths unencoded; the
        # relay answered 400.  Now the bytes cross the tunnel unchanged and the app gets
        # them percent-encoded (an HTTP/1.1 request target is ASCII).
        raw = await raw_request(self.relay_port, "GET /t1/café/ünï?q=ö HTTP/1.1\r\nHost: x\r\n"
                                                 "Connection: close\r\n\r\n".encode())
        self.assertIn(b" 200 ", split_response(raw)[0])
        self.assertEqual(self.app.seen[-1]["uri"], "/caf%C3%A9/%C3%BCn%C3%AF?q=%C3%B6")
        # Control characters and raw bytes in the method or version are still refused.
        for line in (b"GET /t1/a\x01b HTTP/1.1", "GËT /t1/x HTTP/1.1".encode()):
            raw = await raw_request(self.relay_port, line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertIn(b" 400 ", split_response(raw)[0])

    async def test_concurrent_requests(self):
        # 200 requests from one address: let one caller hold every slot (--caller-share 100).
        self.relay.config = attrs.evolve(self.relay.config, max_in_flight=200, caller_share=100)
        async def one(i):
            response, body = await request(self.agent, b"GET", self.base + f"/t1/n/{i}")
            return response.code, json.loads(body)["uri"]
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(one(i)) for i in range(200)])
        self.assertEqual(results, [(200, f"/n/{i}") for i in range(200)])

    async def test_set_cookie_kept_separate(self):
        response, _ = await request(self.agent, b"GET", self.base + "/t1/cookies")
        # Path=/ scoped to the tunnel: by path, all tunnels share one origin (tests/test_cookies.py).
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"),
                         [b"a=1; Path=/t1/", b"b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/t1/"])

    async def test_gzip_byte_identical(self):
        response, body = await request(self.agent, b"GET", self.base + "/t1/gzip",
                                       {b"accept-encoding": b"gzip"})
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(body, gzip.compress(b"hello compressed world\n" * 100, mtime=0))
        raw = await raw_request(self.relay_port, b"GET /t1/gzip HTTP/1.1\r\nHost: x\r\n"
                                b"Accept-Encoding: gzip\r\nConnection: close\r\n\r\n")
        status, headers, raw_body = split_response(raw)
        self.assertIn((b"content-length", str(len(body)).encode()), headers)
        self.assertEqual(raw_body, body)

    async def test_encoded_path_bytes_unchanged(self):
        port = self.relay_port
        for path in (b"/a%2Fb", b"/q%3Fnot-a-query", b"/h%23not-a-fragment", b"/p%2541", b"/sp%20ace"):
            raw = await raw_request(port, b"GET /t1" + path + b"?k=v&k=w HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\n\r\n")
            status, headers, body = split_response(raw)
            self.assertIn(b" 200 ", status)
            self.assertEqual(self.app.seen[-1]["uri"], (path + b"?k=v&k=w").decode())

    async def test_dot_segments_cannot_escape_base(self):
        connector = await self.loop.connector(
            self.relay_port, f"http://127.0.0.1:{self.app_port.getHost().port}/base", "t2")
        self.assertEqual(connector.tunnel_id, "t2")
        for path in (b"/../../cookies", b"/%2e%2e/%2E%2E/cookies", b"/x/../../cookies"):
            raw = await raw_request(self.relay_port, b"GET /t2" + path + b" HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\n\r\n")
            self.assertIn(b" 200 ", split_response(raw)[0])
            self.assertEqual(self.app.seen[-1]["uri"], "/base/cookies")

    async def test_chunked_upload(self):
        raw = await raw_request(
            self.relay_port,
            b"POST /t1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        status, headers, body = split_response(raw)
        self.assertIn(b" 200 ", status)
        seen = self.app.seen[-1]
        self.assertEqual(seen["body_sha256"], hashlib.sha256(b"hello world").hexdigest())
        names = [k.lower() for k, v in seen["headers"]]
        self.assertNotIn("content-length", names)
        self.assertEqual([v for k, v in seen["headers"] if k.lower() == "transfer-encoding"], ["chunked"])

    async def test_first_chunk_before_last(self):
        proto = await connect_raw(self.relay_port,
                                  b"GET /t1/chunks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await eventually(lambda: b"first chunk" in proto.received)
        self.assertNotIn(b"last chunk", bytes(proto.received))
        self.app.release_chunks()
        raw = await proto.done
        self.assertEqual(dechunk(split_response(raw)[2]), b"first chunk\nlast chunk\n")

    async def test_slow_app_within_timeout(self):
        """A local app taking 30 s still answers (the older PipeGate cut it at 5 s)."""
        response, body = await request(self.agent, b"GET", self.base + "/t1/slow/30")
        self.assertEqual((response.code, body), (200, b"late answer"))

    test_slow_app_within_timeout.timeout = 60

    async def test_slow_consumer_bounded(self):
        """A caller that stops reading stalls the app; nothing buffers the whole body."""
        size = 64 * 1024 * 1024
        proto = await connect_raw(self.relay_port,
                                  b"GET /t1/big/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        proto.transport.pauseProducing()
        last = -1
        while last != self.app.produced:  # wait until the app is held back
            last = self.app.produced
            await task.deferLater(reactor, 0.3, lambda: None)
        self.assertLess(self.app.produced, size // 2)
        stream = next(iter(self.connector.links[0].session.streams.values()))
        relay_stream = next(iter(self.relay.tunnels["t1"].links[0].streams.values()))
        # The window may have grown before the caller stopped, never beyond --max-window.
        window = relay_stream.flow.recv.window
        self.assertLessEqual(window, frames.MAX_WINDOW)
        self.assertLessEqual(stream.flow.send.window, window)
        self.assertLessEqual(stream.flow.send.queued, 65536)
        # The relay holds back credit while the caller is not reading.
        self.assertTrue(relay_stream._paused)
        self.assertLessEqual(relay_stream.flow.recv.ungranted, window)
        proto.transport.resumeProducing()
        raw = await proto.done
        status, headers, body = split_response(raw)
        if (b"transfer-encoding", b"chunked") in headers:
            body = dechunk(body)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(pattern(size)).digest())

    test_slow_consumer_bounded.timeout = 120

    async def test_websocket_passthrough(self):
        factory, proto = await ws_connect(self.loop, self.relay_port, "/t1/ws/chat")
        await factory.opened
        for text in (b"one", b"two"):
            factory.waiter = defer.Deferred()
            proto.sendMessage(text)
            self.assertEqual(await factory.waiter, b"echo:" + text)
        self.assertEqual(self.app.seen[-1]["uri"], "/ws/chat")

    async def test_multiple_connectors_share_load(self):
        second_app = TestApp()
        second_port = await self.loop.app(second_app)
        await self.loop.connector(self.relay_port, second_port, "t1",
                                         token=token_for("t1", shared=True))
        for i in range(10):
            response, _ = await request(self.agent, b"GET", self.base + f"/t1/r/{i}")
            self.assertEqual(response.code, 200)
        self.assertEqual((len(self.app.seen), len(second_app.seen)), (5, 5))

    async def test_one_connector_leaving_fails_only_its_requests(self):
        second_app = TestApp()
        second_port = await self.loop.app(second_app)
        second = await self.loop.connector(self.relay_port, second_port, "t1",
                                                 token=token_for("t1", shared=True))
        calls = {name: defer.Deferred.fromCoroutine(request(self.agent, b"GET", self.base + "/t1/hang?" + name))
                 for name in ("a", "b")}
        await eventually(lambda: len(self.app.hanging) == 1 and len(second_app.hanging) == 1)
        # The two requests race to the relay: look up which connector got which.
        kept = self.app.hanging[0].uri.rsplit(b"?", 1)[1].decode()
        d1, d2 = calls[kept], calls["b" if kept == "a" else "a"]
        await second.stopService()
        response, body = await d2
        self.assertEqual(response.code, 502)
        self.assertFalse(d1.called)
        self.app.hanging[0].write(b"survivor")
        self.app.hanging[0].finish()
        response, body = await d1
        self.assertEqual((response.code, body), (200, b"survivor"))
        response, _ = await request(self.agent, b"GET", self.base + "/t1/after")
        self.assertEqual(response.code, 200)


class StatusCodes(unittest.TestCase):
    """Every error status the relay documents, each caused for real."""

    async def setUp(self):
        self.loop = Loopback(self)
        self.app = TestApp()
        self.app_port = await self.loop.app(self.app)
        self.agent = self.loop.agent()

    async def start(self, **config):
        self.relay, self.relay_port = await self.loop.relay(**config)
        self.base = f"http://127.0.0.1:{self.relay_port.getHost().port}"

    async def test_unknown_tunnel_404(self):
        await self.start()
        for path in ("/nobody/x", "/", "/..%2f/x", "/a.b/x"):
            response, body = await request(self.agent, b"GET", self.base + path)
            self.assertEqual(response.code, 404, path)
        response, body = await request(self.agent, b"GET", self.base + "/nobody/x")
        self.assertEqual(body, b"tunnel offline\n")

    async def test_healthz(self):
        await self.start()
        response, body = await request(self.agent, b"GET", self.base + "/healthz")
        self.assertEqual((response.code, json.loads(body)), (200, {"status": "ok"}))

    async def test_app_unreachable_502(self):
        await self.start()
        closed = await self.loop.app()
        url = f"http://127.0.0.1:{closed.getHost().port}"
        await closed.stopListening()
        self.loop.ports.remove(closed)
        await self.loop.connector(self.relay_port, url, "t1")
        response, body = await request(self.agent, b"GET", self.base + "/t1/x")
        self.assertEqual(response.code, 502)
        self.assertIn(b"unreachable", body)
        response, body = await request(self.agent, b"GET", self.base + "/t1/again")
        self.assertEqual(response.code, 502)

    async def test_connector_lost_mid_request_502(self):
        await self.start()
        connector = await self.loop.connector(self.relay_port, self.app_port, "t1")
        d = defer.Deferred.fromCoroutine(request(self.agent, b"GET", self.base + "/t1/hang"))
        await eventually(lambda: self.app.hanging)
        for link in list(connector.links):
            link.transport.abortConnection()
        response, body = await d
        self.assertEqual(response.code, 502)

    async def test_timeout_504(self):
        await self.start(request_timeout=0.5)
        await self.loop.connector(self.relay_port, self.app_port, "t1")
        started = reactor.seconds()
        response, body = await request(self.agent, b"GET", self.base + "/t1/hang")
        self.assertEqual(response.code, 504)
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        await eventually(lambda: self.app.hanging and self.app.hanging[0]._disconnected)

    async def test_in_flight_limit_503(self):
        await self.start(max_in_flight=2, caller_share=100)
        await self.loop.connector(self.relay_port, self.app_port, "t1")
        held = [defer.Deferred.fromCoroutine(request(self.agent, b"GET", self.base + "/t1/hang"))
                for _ in range(2)]
        await eventually(lambda: len(self.app.hanging) == 2)
        response, body = await request(self.agent, b"GET", self.base + "/t1/x")
        self.assertEqual(response.code, 503)
        for r in self.app.hanging:
            r.finish()
        for d in held:
            response, _ = await d
            self.assertEqual(response.code, 200)

    async def test_body_too_large_413(self):
        await self.start(max_body_bytes=1000)
        await self.loop.connector(self.relay_port, self.app_port, "t1")
        response, body = await request(self.agent, b"POST", self.base + "/t1/echo", body=b"x" * 1001)
        self.assertEqual(response.code, 413)
        raw = await raw_request(
            self.relay_port,
            b"POST /t1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"200\r\n" + b"y" * 512 + b"\r\n" + b"400\r\n" + b"z" * 1024 + b"\r\n")
        self.assertIn(b" 413 ", split_response(raw)[0])
        self.assertEqual([s for s in self.app.seen if s["uri"] == "/echo"], [])
        response, body = await request(self.agent, b"POST", self.base + "/t1/echo", body=b"x" * 1000)
        self.assertEqual((response.code, body), (200, b"x" * 1000))

    async def test_expect_continue_over_the_limit_gets_413_without_100(self):
        # Issue 18 item 9: Twisted sent "100 Continue" and then the relay said 413, so the
        # client sent the body the relay had refused.  Now the 413 comes first and alone.
        await self.start(max_body_bytes=1000)
        await self.loop.connector(self.relay_port, self.app_port, "t1")
        raw = await raw_request(self.relay_port, b"POST /t1/echo HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertNotIn(b"100 Continue", raw)
        # Within the limit, the client is still invited to send its body.
        proto = await connect_raw(self.relay_port, b"POST /t1/echo HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        await eventually(lambda: b"100 Continue" in proto.received)
        proto.transport.write(b"hello")
        raw = await proto.done
        self.assertIn(b"HTTP/1.1 200 ", raw)
        self.assertTrue(raw.endswith(b"hello"), raw)

    async def test_offline_grace(self):
        await self.start(offline_grace=10)
        d = defer.Deferred.fromCoroutine(
            request(self.agent, b"POST", self.base + "/t1/echo", body=b"queued body"))
        await eventually(lambda: "t1" in self.relay.tunnels and self.relay.tunnels["t1"].waiting)
        await self.loop.connector(self.relay_port, self.app_port, "t1")
        response, body = await d
        self.assertEqual((response.code, body), (200, b"queued body"))

    async def test_offline_grace_expires_404(self):
        await self.start(offline_grace=0.3)
        response, body = await request(self.agent, b"GET", self.base + "/t1/x")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.relay.tunnels, {})

    async def test_shutdown_answers_in_flight_503(self):
        # Stopping drains first; a request still without a response at the drain timeout gets 503.
        await self.start(drain_timeout=0.2)
        await self.loop.connector(self.relay_port, self.app_port, "t1")
        d = defer.Deferred.fromCoroutine(request(self.agent, b"GET", self.base + "/t1/hang"))
        await eventually(lambda: self.app.hanging)
        stopped = self.relay.stopService()
        response, body = await d
        self.assertEqual(response.code, 503)
        self.assertEqual(body, b"relay shutting down: drain timeout\n")
        await stopped
        self.assertEqual(self.relay.stats.get("drain_cut"), 1)

    async def test_caller_gone_cancels_upstream(self):
        await self.start()
        await self.loop.connector(self.relay_port, self.app_port, "t1")
        proto = await connect_raw(self.relay_port, b"GET /t1/hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: self.app.hanging)
        proto.transport.abortConnection()
        await eventually(lambda: self.app.hanging[0]._disconnected)
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 0)


class DomainRouting(unittest.TestCase):
    async def test_host_header_routes(self):
        loop = Loopback(self)
        app = TestApp()
        app_port = await loop.app(app)
        relay, relay_port = await loop.relay(domain="tunnels.example")
        await loop.connector(relay_port, app_port, "t1")
        raw = await raw_request(relay_port, b"GET /some/path?q=1 HTTP/1.1\r\n"
                                b"Host: t1.tunnels.example:8000\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 200 ", split_response(raw)[0])
        self.assertEqual(app.seen[-1]["uri"], "/some/path?q=1")
        names = [k.lower() for k, v in app.seen[-1]["headers"]]
        self.assertNotIn("x-forwarded-prefix", names)
        # Issue 18 item 8: a fully qualified name (trailing dot) is the same host; it used
        # to fall through to path routing (404 for /some/path).
        raw = await raw_request(relay_port, b"GET /dotted?q=2 HTTP/1.1\r\n"
                                b"Host: T1.tunnels.example.:8000\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 200 ", split_response(raw)[0])
        self.assertEqual(app.seen[-1]["uri"], "/dotted?q=2")
        raw = await raw_request(relay_port, b"GET /t1/p HTTP/1.1\r\n"
                                b"Host: t1.tunnels.example.\r\nConnection: close\r\n\r\n")
        self.assertEqual(app.seen[-1]["uri"], "/t1/p")
        # path routing still works next to it
        agent = loop.agent()
        response, body = await request(agent, b"GET", f"http://127.0.0.1:{relay_port.getHost().port}/t1/p")
        self.assertEqual(json.loads(body)["uri"], "/p")


class Reconnect(unittest.TestCase):
    async def test_relay_restart(self):
        loop = Loopback(self)
        app_port = await loop.app()
        relay, relay_port = await loop.relay()
        number = relay_port.getHost().port
        connector = await loop.connector(relay_port, app_port, "t1")
        relay.stopService()
        await relay_port.stopListening()
        loop.ports.remove(relay_port)
        await loop.drop_connections()
        await eventually(lambda: not connector.links)
        relay2, relay_port2 = await loop.relay(port=number)
        await connector.online
        agent = loop.agent()
        response, body = await request(agent, b"GET", f"http://127.0.0.1:{number}/t1/back")
        self.assertEqual(json.loads(body)["uri"], "/back")


class BadConnectors(unittest.TestCase):
    """Malformed frames close one link; other tunnels keep running."""

    async def test_garbage_frame_closes_only_that_link(self):
        from tests.support import token_for

        loop = Loopback(self)
        app_port = await loop.app()
        relay, relay_port = await loop.relay()
        await loop.connector(relay_port, app_port, "good")
        factory, proto = await ws_connect(
            loop, relay_port, "/evil", protocols=[frames.SUBPROTOCOL],
            headers={"Authorization": "Bearer " + token_for("evil")})
        await factory.opened
        await eventually(lambda: "evil" in relay.tunnels)
        proto.sendMessage(b"\xff\x00\x00\x00\x01garbage", isBinary=True)
        await eventually(lambda: factory.closed)
        self.assertEqual(factory.closed[0][0], 4002)
        self.assertNotIn("evil", relay.tunnels)
        agent = loop.agent()
        response, body = await request(agent, b"GET", f"http://127.0.0.1:{relay_port.getHost().port}/good/ok")
        self.assertEqual(response.code, 200)
        self.flushLoggedErrors()

    async def test_window_violation_closes_link(self):
        from tests.support import token_for

        loop = Loopback(self)
        relay, relay_port = await loop.relay()
        factory, proto = await ws_connect(
            loop, relay_port, "/evil", protocols=[frames.SUBPROTOCOL],
            headers={"Authorization": "Bearer " + token_for("evil")})
        await factory.opened
        caller = await connect_raw(relay_port, b"GET /evil/x HTTP/1.1\r\nHost: x\r\n\r\n")
        caller.transport.pauseProducing()  # the caller reads nothing: the relay must stop crediting
        await eventually(lambda: factory.messages)
        head = frames.decode(factory.messages[0])
        proto.sendMessage(frames.encode(frames.ResponseHead(head.stream, 200, b"OK", ())), isBinary=True)
        chunk = frames.encode(frames.Data(head.stream, b"x" * 65536))
        sent = 0
        while "evil" in relay.tunnels and sent < 1000:  # ignores WINDOW frames entirely
            for _ in range(16):
                proto.sendMessage(chunk, isBinary=True)
            sent += 16
            await task.deferLater(reactor, 0.01, lambda: None)
        await eventually(lambda: "evil" not in relay.tunnels, timeout=30)
        await eventually(lambda: factory.closed, timeout=30)
        self.assertEqual(factory.closed[0][0], 4002)
        caller.transport.resumeProducing()
        raw = await caller.done
        self.assertNotIn(b"0\r\n\r\n", raw[-5:])  # cut off, never a clean end


class Logins(unittest.TestCase):
    """The relay refuses bad logins over HTTP before any upgrade, with the reason."""

    async def test_refusals(self):
        from tests.support import token_for

        loop = Loopback(self)
        relay, relay_port = await loop.relay()
        cases = [
            ("/t2", {"Authorization": "Bearer " + token_for("t1")}, "403"),
            ("/t1", {}, "401"),
            ("/t1", {"Authorization": "Bearer garbage"}, "401"),
            ("/?token=garbage", {}, "401"),
        ]
        for path, headers, status in cases:
            factory, proto = await ws_connect(loop, relay_port, path, protocols=[frames.SUBPROTOCOL],
                                              headers=headers)
            with self.assertRaises(Exception):
                await factory.opened
            self.assertIn(status, proto.http_status_line)
        self.assertEqual(relay.tunnels, {})
        factory, proto = await ws_connect(loop, relay_port, "/?token=" + token_for("t3"),
                                          protocols=[frames.SUBPROTOCOL])
        await factory.opened
        await eventually(lambda: "t3" in relay.tunnels)


class EdgeCases(unittest.TestCase):
    """Regressions found while documenting the relay."""

    async def setUp(self):
        self.loop = Loopback(self)
        self.app = TestApp()
        self.app_port = await self.loop.app(self.app)

    async def test_oversized_head_431_releases_slot(self):
        relay, port = await self.loop.relay(max_in_flight=1)
        await self.loop.connector(port, self.app_port, "t1")
        for _ in range(3):
            raw = await raw_request(port, b"X" * 300 + b" /t1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertIn(b" 431 ", split_response(raw)[0])
        raw = await raw_request(port, b"GET /t1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b" 200 ", split_response(raw)[0])

    async def test_slow_upload_is_not_a_timeout(self):
        relay, port = await self.loop.relay(request_timeout=0.5)
        await self.loop.connector(port, self.app_port, "t1")
        proto = await connect_raw(port, b"POST /t1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n"
                                        b"Connection: close\r\n\r\n")
        for piece in (b"ab", b"cd", b"ef", b"gh"):  # 1.2 s in all, never 0.5 s of silence
            await task.deferLater(reactor, 0.3, lambda: None)
            proto.transport.write(piece)
        status, headers, body = split_response(await proto.done)
        self.assertIn(b" 200 ", status)
        self.assertEqual(body, b"abcdefgh")

    async def test_domain_hosts_reach_the_apps_healthz_and_ignore_case(self):
        relay, port = await self.loop.relay(domain="example.test")
        await self.loop.connector(port, self.app_port, "MyApp")
        raw = await raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: myapp.example.test\r\n"
                                      b"Connection: close\r\n\r\n")
        self.assertIn(b" 200 ", split_response(raw)[0])
        self.assertEqual(self.app.seen[-1]["uri"], "/healthz")
        raw = await raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        self.assertEqual(json.loads(split_response(raw)[2]), {"status": "ok"})
        self.assertEqual(len(self.app.seen), 1)

    async def test_absolute_form_target(self):
        relay, port = await self.loop.relay()
        await self.loop.connector(port, self.app_port, "t1")
        raw = await raw_request(port, b"GET http://relay.example/t1/abs?q=1 HTTP/1.1\r\nHost: relay.example\r\n"
                                      b"Connection: close\r\n\r\n")
        self.assertIn(b" 200 ", split_response(raw)[0])
        self.assertEqual(self.app.seen[-1]["uri"], "/abs?q=1")

    async def test_login_under_a_path_prefix(self):
        from tests.support import token_for

        relay, port = await self.loop.relay()
        factory, proto = await ws_connect(self.loop, port, "/prefix/t1", protocols=[frames.SUBPROTOCOL],
                                          headers={"Authorization": "Bearer " + token_for("t1")})
        await factory.opened
        await eventually(lambda: "t1" in relay.tunnels)


class RelayPolicy(unittest.TestCase):
    """The relay applies the ingress policy and per-tunnel rates to public callers."""

    async def test_denied_caller_gets_403(self):
        from pipegate.core.policydoc import load_policy

        loop = Loopback(self)
        app_port = await loop.app()
        policy = load_policy(['{"ips": {"127.0.0.1": {"allow": false}}}'])[0]
        relay, port = await loop.relay(policy=policy)
        await loop.connector(port, app_port, "t1")
        raw = await raw_request(port, b"GET /t1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = split_response(raw)
        self.assertIn(b" 403 ", status)
        self.assertEqual(body, b"forbidden by ingress policy\n")
        self.assertEqual(relay.tunnels["t1"].in_flight, 0)

    async def _behind_proxy(self, trusted: str):
        from pipegate.http.forwarded import parse_trusted_proxies
        from pipegate.core.policydoc import load_policy
        from twisted.logger import globalLogPublisher

        loop = Loopback(self)
        self.app = TestApp()
        app_port = await loop.app(self.app)
        policy = load_policy(['{"ips": {"203.0.113.7": {"allow": false}}}'])[0]
        relay, self.port = await loop.relay(policy=policy, access_log=True,
                                            trusted_proxies=parse_trusted_proxies(trusted))
        await loop.connector(self.port, app_port, "t1")
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def _get(self, forwarded_for: bytes, proto: bytes = b"https"):
        raw = await raw_request(self.port, b"GET /t1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                b"X-Forwarded-For: " + forwarded_for + b"\r\n"
                                b"X-Forwarded-Proto: " + proto + b"\r\n\r\n")
        status, _, body = split_response(raw)
        return int(status.split()[1]), body

    def _forwarded(self) -> tuple[str, str]:
        headers = dict((k.lower(), v) for k, v in self.app.seen[-1]["headers"])
        return headers["x-forwarded-for"], headers["x-forwarded-proto"]

    def _access_lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if "GET /t1/x" in formatEvent(e)]

    async def test_behind_a_trusted_proxy_the_forwarded_caller_counts(self):
        # The relay's TCP peer is 127.0.0.1, the "proxy"; it appended the caller's address.
        await self._behind_proxy("127.0.0.0/8")
        code, body = await self._get(b"203.0.113.7")
        self.assertEqual((code, body), (403, b"forbidden by ingress policy\n"))
        self.assertEqual(self.app.seen, [])
        # What the caller claims left of the proxy's entry is not believed, either way round.
        self.assertEqual((await self._get(b"198.51.100.1, 203.0.113.7"))[0], 403)
        code, _ = await self._get(b"203.0.113.7, 198.51.100.1")
        self.assertEqual(code, 200)
        # The app gets the whole chain with the relay's own hop appended, and the proxy's scheme.
        self.assertEqual(self._forwarded(), ("203.0.113.7, 198.51.100.1, 127.0.0.1", "https"))
        await eventually(lambda: len(self._access_lines()) == 3)
        self.assertEqual([line.split()[0] for line in self._access_lines()],
                         ['"203.0.113.7"', '"203.0.113.7"', '"198.51.100.1"'])

    async def test_forwarding_headers_from_an_untrusted_peer_count_for_nothing(self):
        await self._behind_proxy("192.0.2.0/24")
        code, _ = await self._get(b"203.0.113.7")
        self.assertEqual(code, 200)
        self.assertEqual(self._forwarded(), ("203.0.113.7, 127.0.0.1", "http"))
        await eventually(lambda: len(self._access_lines()) == 1)
        self.assertEqual(self._access_lines()[0].split()[0], '"127.0.0.1"')

    async def test_tunnel_rate_slows_a_download(self):
        loop = Loopback(self)
        app = TestApp()
        app_port = await loop.app(app)
        relay, port = await loop.relay(tunnel_rate=1_000_000)  # 1 MB/s, 1 MB burst
        await loop.connector(port, app_port, "t1")
        started = reactor.seconds()
        proto = await connect_raw(port, b"GET /t1/big/3000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await proto.done
        status, headers, body = split_response(raw)
        if (b"transfer-encoding", b"chunked") in headers:
            body = dechunk(body)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(pattern(3_000_000)).digest())
        # (3 MB - 1 MB burst - one 256 KiB window already granted) at 1 MB/s
        self.assertGreaterEqual(reactor.seconds() - started, 1.7)
        self.assertEqual(len(relay.pool), 0)

    test_tunnel_rate_slows_a_download.timeout = 60


class LoginFailures(unittest.TestCase):
    """
    Issue 18 items 4 and 6: a connector whose login fails after TCP connected retried
    every 0.5-1 s for ever and said nothing.  Now every failed attempt grows the delay
    (Redial) and logs one line with the reason, asserted here through a log observer.
    """

    async def failures(self, url: str, count: int = 3, same: bool = True):
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        from pipegate.core.redial import Redial
        from pipegate.http.connector import Connector
        from pipegate.http.target import ConnectorConfig, Target
        from tests.support import token_for

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connector = Connector(reactor, ConnectorConfig(Target.parse("http://127.0.0.1:9")), url,
                              token_for("t1"), "t1", retry_policy=Redial(initial=0.05, rng=lambda: 1.0))
        connector.startService()
        self.addCleanup(lambda: connector.running and connector.stopService())

        def mine():
            return [e for e in events if e.get("url") == connector.display_url and "why" in e]
        await eventually(lambda: len(mine()) >= count, timeout=20)
        await connector.stopService()
        got = mine()
        self.assertEqual([e["delay"] for e in got[:count]], [0.05, 0.1, 0.2][:count])
        self.assertEqual(connector.links, [])
        whys = {e["why"] for e in got}
        if not same:
            return whys
        self.assertEqual(len(whys), 1, whys)
        return whys.pop()

    async def test_not_a_relay_404(self):
        from twisted.web import resource, server

        loop = Loopback(self)
        port = await loop.listen(server.Site(resource.NoResource()))
        why = await self.failures(f"ws://127.0.0.1:{port.getHost().port}/t1")
        self.assertEqual(why, "the server answered HTTP 404 Not Found to the login "
                              "(is SERVER_URL a PipeGate relay, ws(s)://host[:port]/<connection-id>?)")

    async def test_wss_to_a_plain_port(self):
        loop = Loopback(self)
        relay, port = await loop.relay(idle_timeout=0.2)
        # Depending on timing the relay answers the ClientHello with a 400 (OpenSSL: "wrong
        # version number") or its idle timeout closes first: each line names the fix.
        whys = await self.failures(f"wss://127.0.0.1:{port.getHost().port}/t1", count=2, same=False)
        for why in whys:
            self.assertIn("a plain port needs ws://, not wss://", why)
        self.assertEqual(relay.tunnels, {})

    async def test_connection_refused(self):
        from tests.support import free_port

        why = await self.failures(f"ws://127.0.0.1:{free_port()}/t1")
        self.assertEqual(why, "cannot connect: connection refused")

    async def test_dns_name_not_found(self):
        why = await self.failures("ws://no-such-host.invalid/t1", count=2)
        self.assertTrue(why.startswith("cannot connect: DNS name not found"), why)
        self.assertIn("no-such-host.invalid", why)

    def test_timed_out(self):
        # A connect timeout takes 30 s on the wire; the same line, from the same code path.
        from twisted.internet import error
        from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
        from twisted.logger import globalLogPublisher
        from twisted.python.failure import Failure

        from pipegate.core.redial import Redial
        from pipegate.http.connector import Connector
        from pipegate.http.target import ConnectorConfig, Target
        from tests.support import token_for

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        connector = Connector(MemoryReactorClock(), ConnectorConfig(Target.parse("http://127.0.0.1:9")),
                              "ws://relay.example/t1", token_for("t1"), "t1",
                              retry_policy=Redial(rng=lambda: 1.0))
        connector.connect_failed(Failure(error.TimeoutError()))
        self.assertEqual(connector._next_attempt(1), 1.0)
        self.assertEqual(events[-1]["why"], "cannot connect: timed out")
        self.assertEqual(connector.stats.get("admission_failures", "connect"), 1)
