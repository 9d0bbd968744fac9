"""
Unit tests of the inspector's sans-IO parts: the recorder's ring and caps, the frame
adapter the connector feeds, replay request building, and the request guard.
"""

from __future__ import annotations

import base64

from twisted.internet import task
from twisted.trial import unittest
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from pipegate.http import frames
from pipegate.http.inspect.recorder import Capture, Recorder
from pipegate.http.inspect.replay import ReplayError, build_request
from pipegate.http.inspect.web import is_loopback_endpoint, refusal


def head(stream=1, method=b"POST", target=b"/hook?x=1", end=False, upgrade=False):
    return frames.RequestHead(stream, method, target, headers=((b"content-type", b"application/json"),),
                              end=end, upgrade=upgrade)


class CaptureTests(unittest.TestCase):
    def test_keeps_the_first_cap_bytes_and_counts_all(self):
        capture = Capture(2500)
        for i in range(10):
            capture.feed(bytes([i]) * 1000)
            self.assertLessEqual(len(capture.kept), 2500)
        self.assertEqual(capture.size, 10_000)
        self.assertEqual(bytes(capture.kept), b"\0" * 1000 + b"\1" * 1000 + b"\2" * 500)
        self.assertTrue(capture.truncated)

    def test_zero_cap_keeps_nothing(self):
        capture = Capture(0)
        capture.feed(b"abc")
        self.assertEqual((bytes(capture.kept), capture.size, capture.truncated), (b"", 3, True))

    def test_exactly_cap_is_not_truncated(self):
        capture = Capture(3)
        capture.feed(b"abc")
        self.assertFalse(capture.truncated)


class RecorderTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.recorder = Recorder(self.clock, max_entries=3, body_bytes=4)
        self.events = []
        self.recorder.listeners.append(lambda event, entry: self.events.append((event, entry and entry.id)))

    def test_ring_drops_the_oldest(self):
        for i in range(5):
            self.recorder.add(b"GET", b"/%d" % i, [])
        self.assertEqual([e.id for e in self.recorder.newest_first()], ["5", "4", "3"])
        self.assertIsNone(self.recorder.get("1"))
        self.assertEqual(self.recorder.get("4").path, b"/3")

    def test_ids_stay_unique_after_clear(self):
        self.recorder.add(b"GET", b"/", [])
        self.recorder.clear()
        self.assertEqual(self.recorder.newest_first(), [])
        self.assertEqual(self.recorder.add(b"GET", b"/", []).id, "2")
        self.assertEqual(self.events, [("request", "1"), ("clear", None), ("request", "2")])

    def test_a_stream_recorded_from_its_frames(self):
        headers = Headers()
        headers.addRawHeader(b"Content-Type", b"application/json")
        headers.addRawHeader(b"X-Dup", b"1")
        headers.addRawHeader(b"X-Dup", b"2")
        recording = self.recorder.begin(head(), b"/base/hook?x=1", headers)
        recording.received(frames.Data(1, b"{\"a\""))
        recording.received(frames.Data(1, b": 1}"))
        recording.received(frames.End(1))
        self.clock.advance(0.25)
        recording.sent(frames.ResponseHead(1, 201, b"Created", ((b"Content-Length", b"2"),)))
        recording.sent(frames.Data(1, b"ok"))
        recording.sent(frames.End(1))
        recording.closed()
        recording.closed()  # once only
        detail = self.recorder.get("1").detail()
        self.assertEqual(detail["method"], "POST")
        self.assertEqual(detail["path"], "/base/hook?x=1")
        self.assertEqual(detail["status"], 201)
        self.assertEqual(detail["duration_ms"], 250.0)
        self.assertEqual(detail["started"], 1_700_000_000)
        self.assertIsNone(detail["replay_of"])
        self.assertEqual(detail["request"]["headers"],
                         [["Content-Type", "application/json"], ["X-Dup", "1"], ["X-Dup", "2"]])
        self.assertEqual(base64.b64decode(detail["request"]["body"]), b"{\"a\"")
        self.assertEqual((detail["request"]["body_size"], detail["request"]["body_truncated"]), (8, True))
        self.assertEqual(base64.b64decode(detail["response"]["body"]), b"ok")
        self.assertEqual((detail["response"]["body_size"], detail["response"]["body_truncated"]), (2, False))
        self.assertEqual(detail["response"]["headers"], [["Content-Length", "2"]])
        self.assertEqual(self.events, [("request", "1"), ("request", "1")])

    def test_reset_by_the_connector_is_a_failure_with_its_code(self):
        recording = self.recorder.begin(head(end=True), b"/x", Headers())
        self.assertTrue(recording.entry.request.complete)
        recording.sent(frames.Reset(1, 502, b"local app unreachable: refused"))
        recording.closed()
        entry = self.recorder.get("1")
        self.assertEqual((entry.status, entry.error), (502, "local app unreachable: refused"))
        self.assertIsNotNone(entry.duration_ms)

    def test_caller_going_away_ends_the_entry(self):
        recording = self.recorder.begin(head(), b"/x", Headers())
        recording.received(frames.Reset(1, 499, b"client closed"))
        entry = self.recorder.get("1")
        self.assertIsNone(entry.status)
        self.assertIn("caller went away", entry.error)

    def test_upgraded_connection_shows_handshake_and_counts(self):
        recording = self.recorder.begin(head(method=b"GET", upgrade=True), b"/ws", Headers())
        up = b"\x81\x85maskedhello"
        handshake = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n\x81\x05hello")
        recording.received(frames.Data(1, up))
        recording.sent(frames.Data(1, handshake))
        recording.sent(frames.Data(1, b"\x81\x02hi"))
        self.clock.advance(3)
        recording.closed()
        detail = self.recorder.get("1").detail()
        self.assertTrue(detail["upgrade"])
        self.assertEqual((detail["status"], detail["response"]["reason"]), (101, "Switching Protocols"))
        self.assertEqual(detail["response"]["headers"], [["Upgrade", "websocket"], ["Connection", "Upgrade"]])
        self.assertEqual(detail["duration_ms"], 3000.0)
        self.assertEqual(detail["bytes_to_app"], len(up))
        self.assertEqual(detail["bytes_from_app"], len(handshake) + 4)
        self.assertEqual(detail["request"]["body"], "")
        self.assertEqual(detail["response"]["body"], "")

    def test_entry_dropped_from_the_ring_is_not_announced_again(self):
        recording = self.recorder.begin(head(), b"/x", Headers())
        for i in range(3):
            self.recorder.add(b"GET", b"/", [])
        self.events.clear()
        recording.closed()
        self.assertEqual(self.events, [])

    def test_at_least_one_entry(self):
        self.assertRaises(ValueError, Recorder, self.clock, max_entries=0)


class BuildReplayTests(unittest.TestCase):
    def setUp(self):
        self.recorder = Recorder(task.Clock(), body_bytes=10)
        self.entry = self.recorder.add(b"POST", b"/hook", [
            (b"Content-Type", b"text/plain"), (b"Content-Length", b"5"), (b"Connection", b"x-hop"),
            (b"X-Hop", b"1"), (b"X-Pipegate-Correlation-Id", b"a" * 32)])
        self.entry.request.feed(b"hello")
        self.entry.request.complete = True

    def test_as_recorded_with_a_fresh_correlation_id(self):
        method, path, headers, body = build_request(self.entry, {})
        self.assertEqual((method, path, body), (b"POST", b"/hook", b"hello"))
        names = [n.lower() for n, v in headers]
        self.assertEqual(names, [b"content-type", b"x-pipegate-correlation-id"])
        self.assertNotEqual(headers[1][1], b"a" * 32)
        self.assertRegex(headers[1][1].decode(), "^[0-9a-f]{32}$")

    def test_overrides(self):
        method, path, headers, body = build_request(self.entry, {
            "method": "PUT", "path": "/other?q=1", "headers": [["X-A", "1"], ["X-A", "2"]],
            "body": base64.b64encode(b"\0\1binary").decode()})
        self.assertEqual((method, path, headers, body),
                         (b"PUT", b"/other?q=1", [(b"X-A", b"1"), (b"X-A", b"2")], b"\0\1binary"))

    def test_bad_overrides_are_refused_with_the_field_named(self):
        cases = [
            ([], "JSON object"), ({"verb": "GET"}, "verb"), ({"method": "G ET"}, "method"),
            ({"method": 3}, "method"), ({"path": "nope"}, "path"), ({"path": "/a b"}, "path"),
            ({"headers": {"a": "b"}}, "headers"), ({"headers": [["X-A", "1\r\nX-B: 2"]]}, "line break"),
            ({"headers": [["X A", "1"]]}, "header name"), ({"body": "***"}, "base64"),
            ({"path": "/\u20ac"}, "Latin-1"),
        ]
        for overrides, words in cases:
            with self.assertRaises(ReplayError, msg=repr(overrides)) as caught:
                build_request(self.entry, overrides)
            self.assertEqual(caught.exception.code, 400)
            self.assertIn(words, str(caught.exception))

    def test_truncated_or_unfinished_body_needs_an_override(self):
        self.entry.request.feed(b" world, more than ten bytes")
        with self.assertRaises(ReplayError) as caught:
            build_request(self.entry, {})
        self.assertEqual(caught.exception.code, 409)
        self.assertEqual(build_request(self.entry, {"body": ""})[3], b"")
        self.entry.request = Capture(10)
        with self.assertRaises(ReplayError) as caught:
            build_request(self.entry, {})
        self.assertIn("not been received in full", str(caught.exception))

    def test_upgrades_are_not_replayed(self):
        entry = self.recorder.add(b"GET", b"/ws", [], upgrade=True)
        with self.assertRaises(ReplayError) as caught:
            build_request(entry, {})
        self.assertEqual(caught.exception.code, 409)


class GuardTests(unittest.TestCase):
    def request(self, **headers):
        request = DummyRequest([b""])
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
        return request

    def test_loopback_host_and_same_origin_pass(self):
        for host in ("127.0.0.1:4040", "localhost:4040", "[::1]:4040", "127.0.0.1", "192.168.1.5:4040"):
            self.assertIsNone(refusal(self.request(host=host)), host)
        self.assertIsNone(refusal(self.request(host="127.0.0.1:4040", origin="http://127.0.0.1:4040",
                                               sec_fetch_site="same-origin")))

    def test_dns_rebinding_and_cross_site_requests_are_refused(self):
        self.assertIn("Host", refusal(self.request(host="evil.example:4040")))
        self.assertIn("Host", refusal(self.request()))
        self.assertIn("cross-origin", refusal(self.request(host="127.0.0.1:4040", origin="http://evil.example")))
        self.assertIn("cross-origin", refusal(self.request(host="127.0.0.1:4040", origin="null")))
        self.assertIn("cross-site", refusal(self.request(host="127.0.0.1:4040", sec_fetch_site="cross-site")))

    def test_loopback_endpoints(self):
        self.assertTrue(is_loopback_endpoint("tcp:4040:interface=127.0.0.1"))
        self.assertTrue(is_loopback_endpoint(r"tcp:4040:interface=\:\:1"))
        self.assertTrue(is_loopback_endpoint("unix:/run/inspect.sock"))
        self.assertFalse(is_loopback_endpoint("tcp:4040"))
        self.assertFalse(is_loopback_endpoint("tcp:4040:interface=0.0.0.0"))

