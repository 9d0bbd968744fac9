"""
The inspector's page in a real headless Chromium (Debian's C{chromium}, driven by
Playwright for Python): it loads, shows a request that goes through the tunnel
without a reload, opens it, replays it as it was and edited, and shows a hostile
header as text.  PIPEGATE_UPDATE_SCREENSHOT=1 makes its screenshot docs/images/inspector.png (README).

Playwright's sync API runs in a worker thread (deferToThread) while the reactor
thread serves the relay, the connector, the app and the inspector; the thread
makes its own HTTP requests to the tunnel with urllib, so nothing in it touches
the reactor.
"""

from __future__ import annotations

import json
import os
import urllib.request

from twisted.internet import threads
from twisted.trial import unittest

from tests.support import debian_tool
from tests.test_inspect_e2e import start_inspected

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The README's picture: rewritten only when PIPEGATE_UPDATE_SCREENSHOT=1 (a test run
# leaves the checkout as it was); otherwise the screenshot goes to the test's temp dir.
README_SCREENSHOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "docs", "images", "inspector.png")
HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1">'
TIMEOUT_MS = 20_000


def sync_playwright(testcase):
    """Playwright's sync API; missing, the test skips, except under CI=true (a failure)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            testcase.fail("playwright is required when CI=true but is not installed")
        raise unittest.SkipTest("playwright is not installed (pip install -e '.[test]')")
    return sync_playwright


def send(url: str, body: bytes | None = None, headers: dict | None = None) -> int:
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def drive(playwright, chromium: str, ui: str, public: str, screenshot: str) -> dict:
    """The browser's part, in a worker thread; returns what it saw."""
    seen = {}
    with playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(ui + "/")
            page.wait_for_selector("body[data-ready='1']")
            page.wait_for_selector("#live:not(.off)")
            seen["rows_at_load"] = page.locator("#rows tr").count()
            # Requests through the tunnel while the page is open: they appear live.
            send(public + "/", None)
            send(public + "/status/404")
            webhook = json.dumps({"type": "payment_intent.succeeded", "data": {"amount": 2000,
                                                                               "currency": "eur"}})
            seen["webhook_status"] = send(public + "/hooks/stripe?attempt=1", webhook.encode(),
                                          {"Content-Type": "application/json", "X-Evil": HOSTILE})
            row = page.locator("#rows tr", has_text="/hooks/stripe?attempt=1")
            row.wait_for()
            page.locator("#rows tr", has_text="/hooks/stripe").locator("td.s2").wait_for()
            row.click()
            page.wait_for_selector("#request pre.json")
            seen["title"] = page.inner_text("#title")
            seen["request_json"] = page.inner_text("#request pre.json")
            seen["header_text"] = page.inner_text("#request table.headers")
            seen["injected_img"] = page.locator("#request img").count()
            seen["pwned"] = page.locator("body[data-pwned]").count()
            seen["response_status"] = page.inner_text("#response p")
            # Replay as recorded.
            page.click("#replay")
            page.locator("#rows tr", has_text="replay of #").first.wait_for()
            # (The page's CSP forbids eval, so no wait_for_function: locators only.)
            page.locator("#meta", has_text=f"replay of {seen['title'].split()[0]}").wait_for()
            seen["replay_title"] = page.inner_text("#title")
            seen["replay_meta"] = page.inner_text("#meta")
            # Edit and replay: another path.
            page.click("#edit")
            page.fill("#ed-path", "/hooks/stripe?attempt=2")
            page.click("#ed-send")
            page.locator("#rows tr", has_text="/hooks/stripe?attempt=2").wait_for()
            page.locator("#rows tr", has_text="/hooks/stripe?attempt=2").locator("td.s2").wait_for()
            seen["rows"] = page.locator("#rows tr").count()
            seen["editor_hidden"] = page.locator("#editor").is_hidden()
            # Form data as fields, binary as size and hex.
            send(public + "/login", b"user=ann&note=hi+there%21", {"Content-Type": "application/x-www-form-urlencoded"})
            send(public + "/upload", bytes(range(256)) * 4, {"Content-Type": "application/octet-stream"})
            for path, selector, key in (("/login", "#request table.form", "form"),
                                        ("/upload", "#request pre.hex", "hex")):
                page.locator("#rows tr", has_text=path).locator("td.s2").wait_for()
                page.locator("#rows tr", has_text=path).click()
                page.locator("#title", has_text=path).wait_for()
                page.wait_for_selector(selector)
                seen[key] = page.inner_text(selector)
                seen[key + "_note"] = page.locator("#request .body .note").first.inner_text()
            # The screenshot for the README: the original webhook opened.
            page.locator("#rows tr", has_text="/hooks/stripe?attempt=1", has_not_text="replay of").click()
            page.locator("#title", has_text=seen["title"]).wait_for()
            page.wait_for_selector("#request pre.json")
            os.makedirs(os.path.dirname(screenshot), exist_ok=True)
            page.screenshot(path=screenshot)
        finally:
            browser.close()
    return seen


class InspectorPage(unittest.TestCase):
    timeout = 120

    async def test_page_shows_requests_live_and_replays_them(self):
        chromium = debian_tool(self, "chromium", "/usr/bin/chromium")
        playwright = sync_playwright(self)
        await start_inspected(self)
        screenshot = README_SCREENSHOT if os.environ.get("PIPEGATE_UPDATE_SCREENSHOT") == "1" else \
            os.path.abspath(os.path.join(self.mktemp(), "inspector.png"))
        seen = await threads.deferToThread(drive, playwright, chromium, self.ui, self.base, screenshot)

        self.assertEqual(seen["rows_at_load"], 0)
        self.assertEqual(seen["webhook_status"], 200)
        self.assertRegex(seen["title"], r"^#\d+ POST /hooks/stripe\?attempt=1$")
        # JSON is pretty-printed, the hostile header is text, and nothing ran.
        self.assertIn('"amount": 2000', seen["request_json"])
        self.assertIn(HOSTILE, seen["header_text"])
        self.assertEqual((seen["injected_img"], seen["pwned"]), (0, 0))
        self.assertTrue(seen["response_status"].startswith("200"), seen["response_status"])
        original = seen["title"].split()[0].lstrip("#")
        self.assertIn(f"replay of #{original}", seen["replay_meta"])
        self.assertEqual(seen["rows"], 5)
        self.assertEqual([line.split("\t") for line in seen["form"].splitlines()],
                         [["user", "ann"], ["note", "hi there!"]])
        self.assertEqual(seen["hex_note"], "1024 bytes")
        self.assertTrue(seen["hex"].startswith("00000000  00 01 02 03"), seen["hex"][:60])
        self.assertTrue(seen["editor_hidden"])
        # What the app received: the webhook, its replay and the edited replay.
        hooks = [(s["method"], s["uri"]) for s in self.app.seen if s["uri"].startswith("/hooks/")]
        self.assertEqual(hooks, [("POST", "/hooks/stripe?attempt=1")] * 2 + [("POST", "/hooks/stripe?attempt=2")])
        # The replay replays the webhook; the edit replays the replay (the entry then shown).
        [edited, replay] = [e for e in self.recorder.newest_first() if e.replay_of is not None]
        self.assertEqual((replay.replay_of, replay.path), (original, b"/hooks/stripe?attempt=1"))
        self.assertEqual((edited.replay_of, edited.path), (replay.id, b"/hooks/stripe?attempt=2"))
        with open(screenshot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
