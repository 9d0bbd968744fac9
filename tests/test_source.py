"""
Tests for L{pipegate.core.source}: where a C{--services}, C{--filter} or
C{--ingress-policy} document comes from (inline JSON, an http(s) URL through the
caller's fetch, a file), and how messages name it.
"""

from __future__ import annotations

import json

from twisted.python.filepath import FilePath
from twisted.trial import unittest

from pipegate.core.source import SourceError, load_source, source_label
from pipegate.ports.services import ServiceError, load_filters, load_services
from tests.test_services import HTTP_EXAMPLE, MINECRAFT_EXAMPLE


class LoadSourceTests(unittest.TestCase):

    def test_inline_list(self) -> None:
        self.assertEqual(load_source('  [{"gatePort": 1}]\n'), [{"gatePort": 1}])

    def test_inline_object(self) -> None:
        self.assertEqual(load_source('{"services": []}'), {"services": []})

    def test_file(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(json.dumps(MINECRAFT_EXAMPLE).encode())
        self.assertEqual(load_source(" " + path.path + " "), MINECRAFT_EXAMPLE)

    def test_url(self) -> None:
        calls = []

        def fetch(url: str) -> bytes:
            calls.append(url)
            return json.dumps(HTTP_EXAMPLE).encode()

        self.assertEqual(load_source(" https://example.invalid/s.json ", fetch), HTTP_EXAMPLE)
        self.assertEqual(load_source("http://example.invalid/s.json", fetch), HTTP_EXAMPLE)
        self.assertEqual(calls, ["https://example.invalid/s.json", "http://example.invalid/s.json"])

    def test_url_without_fetch(self) -> None:
        e = self.assertRaises(SourceError, load_source, "https://example.invalid/s.json")
        self.assertIn("https://example.invalid/s.json", str(e))
        self.assertIn("URLs need", str(e))

    def test_url_fetch_failure(self) -> None:
        def fetch(url: str) -> bytes:
            raise OSError("connection refused")

        e = self.assertRaises(SourceError, load_source, "http://example.invalid/s.json", fetch)
        self.assertEqual(str(e), "http://example.invalid/s.json: fetch failed: connection refused")

    def test_url_bad_json(self) -> None:
        e = self.assertRaises(SourceError, load_source, "http://example.invalid/s", lambda url: b"<html>")
        self.assertIn("http://example.invalid/s: invalid JSON at line 1 column 1", str(e))

    def test_url_credentials_hidden(self) -> None:
        e = self.assertRaises(SourceError, load_source, "https://user:secret@example.invalid/s.json")
        self.assertNotIn("secret", str(e))
        self.assertIn("example.invalid/s.json", str(e))

    def test_missing_file(self) -> None:
        path = self.mktemp()
        e = self.assertRaises(SourceError, load_source, path)
        self.assertEqual(str(e), f"{path}: no such file")

    def test_directory(self) -> None:
        path = FilePath(self.mktemp())
        path.createDirectory()
        e = self.assertRaises(SourceError, load_source, path.path)
        self.assertIn(path.path, str(e))

    def test_bad_json_file(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b'[\n  {"gatePort": 80,}\n]\n')
        e = self.assertRaises(SourceError, load_source, path.path)
        self.assertTrue(str(e).startswith(f"{path.path}: invalid JSON at line 2 column "), str(e))
        self.assertNotIn("\n", str(e))

    def test_bad_inline_json_truncated(self) -> None:
        text = '[{"gatePort": 8080, "serviceHost": "localhost", "servicePort": 8080,]'
        e = self.assertRaises(SourceError, load_source, text)
        message = str(e)
        self.assertIn("inline JSON '" + text[:40] + "...'", message)
        self.assertNotIn(text, message)
        self.assertIn("invalid JSON at line 1 column 69", message)

    def test_not_utf8(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b'["\xff"]')
        e = self.assertRaises(SourceError, load_source, path.path)
        self.assertIn(path.path, str(e))

    def test_empty(self) -> None:
        self.assertRaises(SourceError, load_source, "   ")

    def test_labels(self) -> None:
        self.assertEqual(source_label(" services.json "), "services.json")
        self.assertEqual(source_label("[1, 2]"), "inline JSON '[1, 2]'")
        self.assertEqual(source_label("[\n  1,\n  2\n]"), "inline JSON '[ 1, 2 ]'")
        self.assertEqual(source_label("https://a:b@h/x"), "https://***@h/x")
    def test_error_is_value_error(self) -> None:
        self.assertTrue(issubclass(SourceError, ValueError))


class ServiceLoadingTests(unittest.TestCase):
    """The services' loaders report a source that cannot be read as a L{ServiceError}."""

    def test_service_error_is_a_source_error(self) -> None:
        self.assertTrue(issubclass(ServiceError, SourceError))

    def test_unreadable_source_is_a_service_error(self) -> None:
        path = self.mktemp()
        for load in (load_services, load_filters):
            e = self.assertRaises(ServiceError, load, path)
            self.assertEqual(str(e), f"{path}: no such file")
            e = self.assertRaises(ServiceError, load, "[1,")
            self.assertTrue(str(e).startswith("inline JSON '[1,': invalid JSON at line 1"), str(e))
