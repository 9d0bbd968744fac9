"""
The request inspector against a real relay, connector and app on 127.0.0.1: recording,
caps and truncation, replay (with overrides, and with the relay gone), the live feed
and its bounds, clearing, upgraded connections, and the guard against other origins.
"""

from __future__ import annotations

import base64
import hashlib
import json

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pipegate.http.inspect.recorder import Recorder
from pipegate.http.inspect.web import Inspector, inspector_url
from tests.support import (
    Loopback, TestApp, connect_raw, eventually, pattern, raw_request, request, split_response, ws_connect,
)


async def start_inspected(testcase, max_entries=500, body_bytes=65_536):
    """App, relay, an inspected connector for tunnel t1, and the inspector's listener."""
    loop = testcase.loop = Loopback(testcase)
    testcase.app = TestApp()
    testcase.app_port = await loop.app(testcase.app)
    testcase.relay, testcase.relay_port = await loop.relay()
    testcase.recorder = Recorder(reactor, max_entries, body_bytes)
    testcase.connector = await loop.connector(testcase.relay_port, testcase.app_port, "t1",
                                              observer=testcase.recorder)
    testcase.inspector = Inspector(testcase.recorder, testcase.connector.agent,
                                   testcase.connector.config.target, reactor)
    testcase.inspector.startService()
    loop.services.append(testcase.inspector)
    testcase.inspector_port = await loop.listen(testcase.inspector.site)
    testcase.ui = inspector_url(testcase.inspector_port).rstrip("/")
    testcase.base = f"http://127.0.0.1:{testcase.relay_port.getHost().port}/t1"
    testcase.agent = loop.agent()


class InspectorAPI(unittest.TestCase):
    async def setUp(self):
        await start_inspected(self, max_entries=4, body_bytes=1024)

    async def api(self, method: bytes, path: str, document=None, headers=None):
        body = None if document is None else json.dumps(document).encode()
        hdrs = dict(headers or {})
        if body is not None:
            hdrs[b"content-type"] = b"application/json"
        response, data = await request(self.agent, method, self.ui + path, hdrs, body)
        return response.code, json.loads(data) if data else None

    async def done(self, count: int) -> list[dict]:
        """The list once C{count} entries are there and have all ended."""
        await eventually(lambda: len(self.recorder.entries) >= count
                         and all(e.done for e in self.recorder.entries.values()))
        code, document = await self.api(b"GET", "/api/requests")
        self.assertEqual(code, 200)
        return document["requests"]

    async def test_requests_are_recorded_newest_first_with_details(self):
        await request(self.agent, b"GET", self.base + "/api/x?a=1&b=2")
        body = json.dumps({"event": "payment.succeeded"}).encode()
        response, answer = await request(self.agent, b"POST", self.base + "/echo",
                                         {b"content-type": b"application/json", b"x-dup": [b"1", b"2"]}, body)
        self.assertEqual(answer, body)
        entries = await self.done(2)
        self.assertEqual([(e["method"], e["path"], e["status"]) for e in entries],
                         [("POST", "/echo", 200), ("GET", "/api/x?a=1&b=2", 200)])
        newest = entries[0]
        self.assertIsInstance(newest["id"], str)
        self.assertIsNone(newest["replay_of"])
        self.assertGreaterEqual(newest["duration_ms"], 0)
        self.assertLess(abs(newest["started"] - reactor.seconds()), 30)
        code, detail = await self.api(b"GET", f"/api/requests/{newest['id']}")
        self.assertEqual(code, 200)
        req, resp = detail["request"], detail["response"]
        self.assertEqual(base64.b64decode(req["body"]), body)
        self.assertEqual((req["body_size"], req["body_truncated"]), (len(body), False))
        self.assertEqual([v for n, v in req["headers"] if n.lower() == "x-dup"], ["1", "2"])
        self.assertIn(["X-Forwarded-For", "127.0.0.1"], req["headers"])
        # The headers shown are those the app received.
        seen = self.app.seen[-1]["headers"]
        for name, value in req["headers"]:
            self.assertIn([name, value], seen)
        self.assertEqual(base64.b64decode(resp["body"]), body)
        self.assertIn(["Content-Type", "application/octet-stream"], resp["headers"])
        self.assertEqual(resp["body_size"], len(body))

    async def test_bounds_oldest_dropped_and_bodies_truncated_while_streaming_in_full(self):
        for i in range(5):
            await request(self.agent, b"GET", self.base + f"/n/{i}")
        payload = pattern(3 * 1024 * 1024)
        response, answer = await request(self.agent, b"POST", self.base + "/echo", body=payload)
        # The caller and the app got every byte; the inspector kept 1024 of each body.
        self.assertEqual(hashlib.sha256(answer).digest(), hashlib.sha256(payload).digest())
        self.assertEqual(self.app.seen[-1]["body_len"], len(payload))
        entries = await self.done(4)
        self.assertEqual([e["path"] for e in entries], ["/echo", "/n/4", "/n/3", "/n/2"])
        self.assertLessEqual(len(self.recorder.entries), 4)
        code, detail = await self.api(b"GET", f"/api/requests/{entries[0]['id']}")
        for part in (detail["request"], detail["response"]):
            self.assertEqual(base64.b64decode(part["body"]), payload[:1024])
            self.assertEqual((part["body_size"], part["body_truncated"]), (len(payload), True))
        code, _ = await self.api(b"GET", "/api/requests/1")
        self.assertEqual(code, 404)
        # A truncated body cannot be replayed as it was, but can with a new one.
        code, answer = await self.api(b"POST", f"/api/requests/{entries[0]['id']}/replay", {})
        self.assertEqual(code, 409)
        self.assertIn("1024", answer["error"])

    async def test_replay_as_recorded_and_with_overrides(self):
        await request(self.agent, b"POST", self.base + "/echo?v=1", {b"content-type": b"text/plain"}, b"hello")
        [original] = await self.done(1)
        correlation = [v for n, v in self.app.seen[-1]["headers"] if n.lower() == "x-pipegate-correlation-id"]

        code, entry = await self.api(b"POST", f"/api/requests/{original['id']}/replay")
        self.assertEqual(code, 201)
        self.assertEqual((entry["replay_of"], entry["method"], entry["path"], entry["status"]),
                         (original["id"], "POST", "/echo?v=1", 200))
        self.assertEqual(base64.b64decode(entry["response"]["body"]), b"hello")
        seen = self.app.seen[-1]
        self.assertEqual((seen["method"], seen["uri"], seen["body_len"]), ("POST", "/echo?v=1", 5))
        self.assertIn(["Content-Type", "text/plain"], seen["headers"])
        fresh = [v for n, v in seen["headers"] if n.lower() == "x-pipegate-correlation-id"]
        self.assertEqual(len(fresh), 1)
        self.assertNotEqual(fresh, correlation)

        code, entry = await self.api(b"POST", f"/api/requests/{original['id']}/replay", {
            "method": "PUT", "path": "/headers?x=2", "headers": [["X-Test", "yes"], ["X-Test", "again"]],
            "body": base64.b64encode(b"changed body").decode()})
        self.assertEqual(code, 201)
        seen = self.app.seen[-1]
        self.assertEqual((seen["method"], seen["uri"], seen["body_len"]), ("PUT", "/headers?x=2", 12))
        self.assertEqual([v for n, v in seen["headers"] if n == "X-Test"], ["yes", "again"])
        self.assertEqual(json.loads(base64.b64decode(entry["response"]["body"]))["uri"], "/headers?x=2")
        self.assertEqual(entry["request"]["headers"], [["X-Test", "yes"], ["X-Test", "again"]])
        listed = await self.done(3)
        self.assertEqual([e["replay_of"] for e in listed], [original["id"], original["id"], None])

        for path, document, code_wanted in [
            ("/api/requests/999/replay", {}, 404),
            (f"/api/requests/{original['id']}/replay", {"method": "BAD METHOD"}, 400),
            (f"/api/requests/{original['id']}/replay", {"body": "not base64!"}, 400),
        ]:
            code, answer = await self.api(b"POST", path, document)
            self.assertEqual(code, code_wanted, answer)
        response, data = await request(self.agent, b"POST", self.ui + f"/api/requests/{original['id']}/replay",
                                       {b"content-type": b"application/json"}, b"{nope")
        self.assertEqual(response.code, 400)
        for method, path, code_wanted in [
            (b"POST", f"/api/requests/{original['id']}", 405),          # replay only at .../replay
            (b"POST", f"/api/requests/{original['id']}/", 405),
            (b"GET", f"/api/requests/{original['id']}/replay", 405),
            (b"POST", f"/api/requests/{original['id']}/replay/again", 404),
            (b"GET", f"/api/requests/{original['id']}/", 200),
        ]:
            response, _ = await request(self.agent, method, self.ui + path, {}, None)
            self.assertEqual(response.code, code_wanted, (method, path))
        self.assertEqual(len(self.recorder.entries), 3)  # refused replays leave no entry

    async def test_replay_goes_straight_to_the_app_without_the_relay(self):
        await request(self.agent, b"GET", self.base + "/who")
        [original] = await self.done(1)
        relay = self.loop.services.pop(self.loop.services.index(self.relay))
        await relay.stopService()
        await self.relay_port.stopListening()
        self.loop.ports.remove(self.relay_port)
        await eventually(lambda: not self.connector.links)
        code, entry = await self.api(b"POST", f"/api/requests/{original['id']}/replay")
        self.assertEqual((code, entry["status"]), (201, 200))
        self.assertEqual(json.loads(base64.b64decode(entry["response"]["body"]))["uri"], "/who")

    async def test_replay_to_an_app_that_is_down_is_recorded_as_failed(self):
        await request(self.agent, b"GET", self.base + "/who")
        [original] = await self.done(1)
        await self.app_port.stopListening()
        self.loop.ports.remove(self.app_port)
        await self.connector.pool.closeCachedConnections()
        code, entry = await self.api(b"POST", f"/api/requests/{original['id']}/replay")
        self.assertEqual(code, 201)
        self.assertIsNone(entry["status"])
        self.assertIn("the local app failed", entry["error"])

    async def test_replays_at_once_are_bounded_and_each_times_out(self):
        self.inspector.replayer.max_running = 1
        self.inspector.replayer.timeout = 0.5
        await request(self.agent, b"GET", self.base + "/app/ok")
        [original] = await self.done(1)
        hanging = defer.ensureDeferred(self.api(b"POST", f"/api/requests/{original['id']}/replay",
                                                {"path": "/hang"}))
        await eventually(lambda: self.app.hanging)
        code, answer = await self.api(b"POST", f"/api/requests/{original['id']}/replay", {})
        self.assertEqual((code, answer), (429, {"error": "1 replays are already running"}))
        code, entry = await hanging
        self.assertEqual(code, 201)
        self.assertEqual((entry["path"], entry["status"], entry["error"]),
                         ("/hang", None, "no complete answer within 0.5 s"))
        self.assertEqual(self.inspector.replayer.running, set())
        # Timed out in the middle of the body: what came is kept, the error says why.
        code, entry = await self.api(b"POST", f"/api/requests/{original['id']}/replay", {"path": "/chunks"})
        self.assertEqual((code, entry["status"], entry["error"]), (201, 200, "no complete answer within 0.5 s"))
        self.assertEqual(base64.b64decode(entry["response"]["body"]), b"first chunk\n")
        code, entry = await self.api(b"POST", f"/api/requests/{original['id']}/replay", {})
        self.assertEqual((code, entry["status"], entry["error"]), (201, 200, None))

    async def test_clear(self):
        await request(self.agent, b"GET", self.base + "/a")
        [entry] = await self.done(1)
        code, document = await self.api(b"DELETE", "/api/requests")
        self.assertEqual((code, document), (200, {"requests": []}))
        code, document = await self.api(b"GET", "/api/requests")
        self.assertEqual(document, {"requests": []})
        code, _ = await self.api(b"GET", f"/api/requests/{entry['id']}")
        self.assertEqual(code, 404)

    async def test_live_feed(self):
        feed = await connect_raw(self.inspector_port, b"GET /api/feed HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await eventually(lambda: b"retry:" in feed.received)
        self.assertIn(b"content-type: text/event-stream", bytes(feed.received).lower())
        await request(self.agent, b"GET", self.base + "/live?x=1")

        def events():
            out = []
            for block in bytes(feed.received).split(b"\n\n"):
                lines = dict(line.split(b": ", 1) for line in block.split(b"\n")
                             if line.startswith((b"event: ", b"data: ")))
                if b"event" in lines:
                    out.append((lines[b"event"].decode(), json.loads(lines[b"data"])))
            return out

        await eventually(lambda: len(events()) >= 2)
        (kind1, started), (kind2, ended) = events()[:2]
        self.assertEqual((kind1, started["path"], started["status"]), ("request", "/live?x=1", None))
        self.assertEqual((kind2, ended["id"], ended["status"]), ("request", started["id"], 200))
        await self.api(b"DELETE", "/api/requests")
        await eventually(lambda: events()[-1][0] == "clear")
        feed.transport.loseConnection()
        await feed.done
        await eventually(lambda: not self.inspector.feed.clients)

    async def test_feed_clients_are_bounded_and_slow_ones_dropped(self):
        self.inspector.feed.max_clients = 2
        self.inspector.feed.max_backlog = 64 * 1024
        # A client that never reads.
        slow = await connect_raw(self.inspector_port, b"GET /api/feed HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        slow.transport.pauseProducing()
        other = await connect_raw(self.inspector_port, b"GET /api/feed HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await eventually(lambda: len(self.inspector.feed.clients) == 2)
        raw = await raw_request(self.inspector_port, b"GET /api/feed HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                     b"Connection: close\r\n\r\n")
        self.assertEqual(split_response(raw)[0], b"HTTP/1.1 503 Service Unavailable")
        other.transport.loseConnection()
        await other.done
        # Events beyond what loopback socket buffers hold (up to 128 MiB): the slow client goes.
        for i in range(2048):
            self.recorder.add(b"GET", b"/" + b"x" * 65_536, [])
            if not self.inspector.feed.clients:
                break
        await eventually(lambda: not self.inspector.feed.clients)
        slow.transport.resumeProducing()  # to read the end of the connection
        await slow.done
        self.assertLess(i, 2047)

    async def test_upgraded_connection_is_one_entry(self):
        factory, proto = await ws_connect(self.loop, self.relay_port, "/t1/ws/chat")
        await factory.opened
        waiter = factory.waiter = defer.Deferred()
        proto.sendMessage(b"hello there")
        self.assertEqual(await waiter, b"echo:hello there")
        proto.sendClose()
        await eventually(lambda: factory.closed)
        [entry] = await self.done(1)
        self.assertEqual((entry["method"], entry["path"], entry["status"], entry["upgrade"]),
                         ("GET", "/ws/chat", 101, True))
        self.assertGreater(entry["bytes_to_app"], len(b"hello there"))
        self.assertGreater(entry["bytes_from_app"], len(b"echo:hello there"))
        self.assertGreaterEqual(entry["duration_ms"], 0)
        code, detail = await self.api(b"GET", f"/api/requests/{entry['id']}")
        self.assertIn("websocket", [v.lower() for n, v in detail["request"]["headers"] if n.lower() == "upgrade"])
        self.assertIn(["Upgrade", "WebSocket"], detail["response"]["headers"])
        code, answer = await self.api(b"POST", f"/api/requests/{entry['id']}/replay", {})
        self.assertEqual(code, 409)

    async def test_other_origins_and_hostnames_are_refused(self):
        await request(self.agent, b"GET", self.base + "/secret")
        [entry] = await self.done(1)
        seen = len(self.app.seen)
        # DNS rebinding: a page on evil.example whose name now points at 127.0.0.1.
        code, answer = await self.api(b"GET", "/api/requests", headers={b"host": b"evil.example:4040"})
        self.assertEqual(code, 403)
        # Cross-site form post / fetch from another page.
        for headers in ({b"origin": b"http://evil.example"}, {b"sec-fetch-site": b"cross-site"}):
            code, answer = await self.api(b"POST", f"/api/requests/{entry['id']}/replay", {}, headers)
            self.assertEqual(code, 403)
            code, answer = await self.api(b"DELETE", "/api/requests", headers=headers)
            self.assertEqual(code, 403)
        self.assertEqual(len(self.app.seen), seen)
        self.assertEqual(len(self.recorder.entries), 1)
        # The page itself, same-origin, with its security headers.
        response, page = await request(self.agent, b"GET", self.ui + "/")
        self.assertEqual(response.code, 200)
        self.assertIn(b"<title>PipeGate inspector</title>", page)
        self.assertIn(b"script-src 'self'", response.headers.getRawHeaders(b"content-security-policy")[0])
        response, script = await request(self.agent, b"GET", self.ui + "/inspector.js")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/javascript; charset=utf-8"])
        self.assertIn(b"EventSource", script)

    async def test_oversized_api_body_is_413_and_not_kept(self):
        await request(self.agent, b"GET", self.base + "/a")
        [entry] = await self.done(1)
        response, data = await request(self.agent, b"POST", self.ui + f"/api/requests/{entry['id']}/replay",
                                       {b"content-type": b"application/json"}, b" " * (17 * 1024 * 1024))
        self.assertEqual(response.code, 413)
        self.assertEqual(len(self.recorder.entries), 1)
