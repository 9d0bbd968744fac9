"""
Tests for header filtering (L{pipegate.http.pipe.filter_headers}) and for the connector's
path handling (L{safe_path}, L{Target}).
"""

from __future__ import annotations


from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from pipegate.http.target import ConnectorError, Target, safe_path
from pipegate.http.pipe import HOP_BY_HOP, filter_headers

HOP_NAMES = [b"Connection", b"Keep-Alive", b"Proxy-Connection", b"TE", b"Trailer",
             b"Transfer-Encoding", b"Upgrade", b"Proxy-Authorization", b"Proxy-Authenticate"]


class FilterHeadersTests(unittest.TestCase):

    def test_hop_by_hop_removed(self):
        for name in HOP_NAMES:
            for spelled in (name, name.lower(), name.upper()):
                raw = [(b"Accept", b"*/*"), (spelled, b"x"), (b"Host", b"h")]
                self.assertEqual(filter_headers(raw), ((b"Accept", b"*/*"), (b"Host", b"h")),
                                 spelled)

    def test_every_spec_hop_by_hop_header_known(self):
        self.assertTrue({n.lower() for n in HOP_NAMES} <= HOP_BY_HOP)

    def test_end_to_end_headers_kept(self):
        raw = [(b"Content-Length", b"5"), (b"Content-Encoding", b"gzip"),
               (b"Authorization", b"Bearer x"), (b"Cookie", b"a=1"), (b"X-Connection", b"y"),
               (b"Trailers-Not", b"z")]
        self.assertEqual(filter_headers(raw), tuple(raw))

    def test_headers_named_by_connection_removed(self):
        raw = [
            (b"Connection", b"close, X-Secret ,  x-other"),
            (b"X-Secret", b"1"),
            (b"Accept", b"*/*"),
            (b"X-OTHER", b"2"),
            (b"Connection", b"X-Third"),
            (b"x-third", b"3"),
            (b"X-Kept", b"4"),
        ]
        self.assertEqual(filter_headers(raw), ((b"Accept", b"*/*"), (b"X-Kept", b"4")))

    def test_connection_named_header_before_connection(self):
        raw = [(b"X-Early", b"1"), (b"Accept", b"a"), (b"connection", b"x-early")]
        self.assertEqual(filter_headers(raw), ((b"Accept", b"a"),))

    def test_empty_connection_tokens(self):
        raw = [(b"Connection", b", ,"), (b"Accept", b"a")]
        self.assertEqual(filter_headers(raw), ((b"Accept", b"a"),))

    def test_keep_upgrade(self):
        raw = [
            (b"Host", b"h"),
            (b"Connection", b"Upgrade, Keep-Alive, X-Hop"),
            (b"Upgrade", b"websocket"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Hop", b"1"),
            (b"Sec-WebSocket-Key", b"k"),
            (b"Transfer-Encoding", b"chunked"),
            (b"TE", b"trailers"),
        ]
        self.assertEqual(filter_headers(raw, keep_upgrade=True), (
            (b"Host", b"h"),
            (b"Connection", b"Upgrade, Keep-Alive, X-Hop"),
            (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Key", b"k"),
        ))
        self.assertEqual(filter_headers(raw), ((b"Host", b"h"), (b"Sec-WebSocket-Key", b"k")))

    def test_order_and_duplicates_kept(self):
        raw = [(b"Set-Cookie", b"a=1"), (b"X-A", b"1"), (b"Set-Cookie", b"b=2"),
               (b"x-a", b"2"), (b"Set-Cookie", b"a=1")]
        self.assertEqual(filter_headers(raw), tuple(raw))

    def test_value_lists_flattened_in_order(self):
        # the shape of twisted.web Headers.getAllRawHeaders()
        raw = [(b"Set-Cookie", [b"a=1", b"b=2"]), (b"Connection", [b"close"]),
               (b"Accept", [b"text/html", b"*/*"])]
        self.assertEqual(filter_headers(raw), (
            (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"),
            (b"Accept", b"text/html"), (b"Accept", b"*/*")))

    def test_connection_in_value_list(self):
        raw = [(b"Connection", [b"keep-alive", b"X-Gone"]), (b"X-Gone", [b"1"]),
               (b"X-Stay", [b"2"])]
        self.assertEqual(filter_headers(raw), ((b"X-Stay", b"2"),))

    def test_raw_bytes_untouched(self):
        raw = [(b"X-Bin", b"caf\xc3\xa9 \xff"), (b"X-Space", b"  padded  ")]
        self.assertEqual(filter_headers(raw), tuple(raw))

    def test_drop(self):
        raw = [(b"Host", b"h"), (b"Accept", b"a"), (b"X-Forwarded-For", b"1.2.3.4")]
        self.assertEqual(filter_headers(raw, drop=frozenset({b"host", b"x-forwarded-for"})),
                         ((b"Accept", b"a"),))

    def test_empty(self):
        self.assertEqual(filter_headers([]), ())
        self.assertEqual(filter_headers(()), ())


class SafePathTests(unittest.TestCase):

    def assertPaths(self, cases):
        for given_path, expected in cases:
            self.assertEqual(safe_path(given_path), expected, given_path)

    def test_root(self):
        self.assertPaths([(b"/", b"/"), (b"", b"/")])

    def test_plain(self):
        self.assertPaths([(b"/a", b"/a"), (b"/a/b/c", b"/a/b/c"), (b"/a//b", b"/a//b")])

    def test_trailing_slash_kept(self):
        self.assertPaths([(b"/a/", b"/a/"), (b"/a/b/", b"/a/b/")])

    def test_dot_segments(self):
        self.assertPaths([
            (b"/./a", b"/a"), (b"/a/./b", b"/a/b"), (b"/a/.", b"/a/"), (b"/.", b"/"),
            (b"/a/b/../c", b"/a/c"), (b"/a/..", b"/"), (b"/a/b/..", b"/a/"),
            (b"/a/../..", b"/"), (b"/a/b/../../c/", b"/c/"),
        ])

    def test_never_above_root(self):
        self.assertPaths([
            (b"/..", b"/"), (b"/../..", b"/"), (b"/../../x", b"/x"), (b"/../a/../../b", b"/b"),
            (b"/../../etc/passwd", b"/etc/passwd"),
        ])

    def test_percent_encoded_dots(self):
        self.assertPaths([
            (b"/%2e%2e/x", b"/x"), (b"/%2E%2E/x", b"/x"), (b"/.%2e/x", b"/x"),
            (b"/%2e./x", b"/x"), (b"/a/%2e%2e", b"/"), (b"/a/%2e/b", b"/a/b"),
            (b"/a/b/%2E%2e/c", b"/a/c"), (b"/%2e%2e/%2e%2e/etc", b"/etc"),
        ])

    def test_not_dot_segments(self):
        self.assertPaths([
            (b"/...", b"/..."), (b"/..a", b"/..a"), (b"/a..", b"/a.."), (b"/%2e%2e%2e", b"/%2e%2e%2e"),
            (b"/.hidden", b"/.hidden"), (b"/%252e%252e/x", b"/%252e%252e/x"),
        ])

    def test_escapes_kept_verbatim(self):
        self.assertPaths([
            (b"/a%2Fb", b"/a%2Fb"), (b"/a%2fb", b"/a%2fb"), (b"/a%3Fb", b"/a%3Fb"),
            (b"/a%23b", b"/a%23b"), (b"/100%25", b"/100%25"), (b"/%2F..%2F", b"/%2F..%2F"),
            (b"/..%2F..%2Fetc", b"/..%2F..%2Fetc"), (b"/caf%C3%A9", b"/caf%C3%A9"),
            (b"/caf\xc3\xa9", b"/caf\xc3\xa9"),
        ])

    @settings(deadline=None, max_examples=300)
    @given(st.lists(st.sampled_from(
        [b"", b".", b"..", b"%2e", b"%2E%2e", b".%2E", b"a", b"B", b"%2F", b"%25", b"..."]),
        max_size=10).map(lambda segments: b"/" + b"/".join(segments)))
    def test_result_has_no_dot_segments(self, path):
        result = safe_path(path)
        self.assertTrue(result.startswith(b"/"))
        for segment in result.split(b"/"):
            self.assertNotIn(segment.lower().replace(b"%2e", b"."), (b".", b".."), path)
        self.assertEqual(safe_path(result), result)


class TargetTests(unittest.TestCase):

    def test_path_join(self):
        t = Target.parse("http://127.0.0.1:9000/base")
        self.assertEqual(t.path(b"/../../x?q=1"), b"/base/x?q=1")
        self.assertEqual(t.path(b"/"), b"/base/")
        self.assertEqual(t.path(b"/x/"), b"/base/x/")
        self.assertEqual(t.path(b"/%2e%2e/%2E%2E/x"), b"/base/x")
        self.assertEqual(t.path(b"/a%2F..%2Fb%3F%23%25"), b"/base/a%2F..%2Fb%3F%23%25")

    def test_query_untouched(self):
        t = Target.parse("http://127.0.0.1:9000/base")
        self.assertEqual(t.path(b"/x?a=/../..&b=%2e%2e?c"), b"/base/x?a=/../..&b=%2e%2e?c")
        self.assertEqual(t.path(b"/../?"), b"/base/?")
        self.assertEqual(t.path(b"/a/..?q"), b"/base/?q")

    def test_no_base(self):
        t = Target.parse("http://127.0.0.1:3000")
        self.assertEqual(t.base, b"")
        self.assertEqual(t.path(b"/"), b"/")
        self.assertEqual(t.path(b"/../x?y"), b"/x?y")

    def test_base_trailing_slash_stripped(self):
        for url in ("http://h/base/", "http://h/base//", "http://h/base"):
            t = Target.parse(url)
            self.assertEqual(t.base, b"/base")
            self.assertEqual(t.path(b"/x"), b"/base/x")
        self.assertEqual(Target.parse("http://h/").base, b"")

    def test_parse(self):
        self.assertEqual(Target.parse("http://127.0.0.1:9000/base"),
                         Target(b"http", b"127.0.0.1", 9000, b"/base"))
        self.assertEqual(Target.parse("http://localhost"), Target(b"http", b"localhost", 80, b""))
        self.assertEqual(Target.parse("https://App.Example"),
                         Target(b"https", b"app.example", 443, b""))
        self.assertEqual(Target.parse("http://[::1]:8080/x"), Target(b"http", b"::1", 8080, b"/x"))

    def test_authority(self):
        self.assertEqual(Target.parse("http://h").authority, b"h")
        self.assertEqual(Target.parse("http://h:80").authority, b"h")
        self.assertEqual(Target.parse("http://h:443").authority, b"h:443")
        self.assertEqual(Target.parse("https://h:443").authority, b"h")
        self.assertEqual(Target.parse("https://h:80").authority, b"h:80")
        self.assertEqual(Target.parse("http://127.0.0.1:3000").authority, b"127.0.0.1:3000")
        self.assertEqual(Target.parse("http://[::1]:3000").authority, b"[::1]:3000")
        self.assertEqual(Target.parse("http://[::1]").authority, b"[::1]")

    def test_url(self):
        t = Target.parse("https://127.0.0.1:8443/app")
        self.assertEqual(t.url(b"/../a/b?c=d"), b"https://127.0.0.1:8443/app/a/b?c=d")
        self.assertEqual(Target.parse("http://h").url(b"/"), b"http://h/")

    def test_bad_urls(self):
        for url in ("ftp://h/", "ws://h/", "h:80", "http://", "http:///x", "", "//h/x"):
            e = self.assertRaises(ConnectorError, Target.parse, url)
            self.assertIn("TARGET_URL", str(e))

    @settings(deadline=None, max_examples=300)
    @given(st.binary(max_size=60))
    def test_path_stays_under_base(self, raw):
        t = Target.parse("http://127.0.0.1:9000/base")
        path, _, _ = t.path(b"/" + raw).partition(b"?")
        self.assertTrue(path.startswith(b"/base/"), path)
        rest = path[len(b"/base"):]
        self.assertNotIn(b"/../", rest.lower().replace(b"%2e", b".") + b"/")
