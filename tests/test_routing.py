"""
How a public request names its tunnel (pipegate/http/routing.py): pure functions, no reactor.
"""

from __future__ import annotations

from twisted.trial import unittest

from pipegate.http.routing import (
    Redirect, Route, directory_redirect, domain_label, host_refusal, is_health, route,
)


def by_path(uri: bytes, method: bytes = b"GET", upgrade: bool = False, host: bytes | None = b"relay"):
    return route(uri, host, method, upgrade, None)


class PathRouting(unittest.TestCase):
    def test_the_first_segment_names_the_tunnel_and_is_cut_off(self):
        self.assertEqual(by_path(b"/app/a/b?x=1&y"), Route("app", b"/a/b?x=1&y", b"/app"))

    def test_ids_are_case_insensitive_and_the_prefix_keeps_the_callers_spelling(self):
        self.assertEqual(by_path(b"/MyApp/x"), Route("myapp", b"/x", b"/MyApp"))

    def test_the_rest_of_the_target_stays_byte_exact(self):
        self.assertEqual(by_path(b"/app/%2F..//caf\xc3\xa9?q=%20#f"),
                         Route("app", b"/%2F..//caf\xc3\xa9?q=%20#f", b"/app"))

    def test_id_with_trailing_slash_is_the_apps_root(self):
        self.assertEqual(by_path(b"/app/"), Route("app", b"/", b"/app"))
        self.assertEqual(by_path(b"/app/?q=1"), Route("app", b"/?q=1", b"/app"))

    def test_a_bare_id_redirects_to_its_directory_keeping_the_query(self):
        self.assertEqual(by_path(b"/app"), Redirect(b"/app/"))
        self.assertEqual(by_path(b"/app?q=1", method=b"HEAD"), Redirect(b"/app/?q=1"))
        self.assertEqual(by_path(b"/App?"), Redirect(b"/App/?"))

    def test_no_redirect_for_other_methods_or_upgrades(self):
        # A redirect would drop a POST's body, and a WebSocket client does not follow one.
        self.assertEqual(by_path(b"/app", method=b"POST"), Route("app", b"/", b"/app"))
        self.assertEqual(by_path(b"/app?q", upgrade=True), Route("app", b"/?q", b"/app"))

    def test_absolute_form_keeps_the_origin_form_part(self):
        self.assertEqual(by_path(b"http://relay.example/app/x?y"), Route("app", b"/x?y", b"/app"))
        self.assertEqual(by_path(b"HTTPS://relay.example/app/"), Route("app", b"/", b"/app"))
        # No path after the authority: the query alone, from the root.
        self.assertEqual(by_path(b"http://relay.example?x", method=b"POST"), "unknown tunnel")

    def test_bad_targets(self):
        self.assertEqual(by_path(b"*", method=b"OPTIONS"), "bad request target")
        self.assertEqual(by_path(b"app/x"), "bad request target")

    def test_ids_that_are_not_connection_ids_are_unknown(self):
        for uri in (b"/", b"/?x", b"//x", b"/caf\xc3\xa9/x", b"/a%2Fb/x", b"/" + b"a" * 65 + b"/", b"/healthz/x"):
            self.assertEqual(by_path(uri), "unknown tunnel", uri)


class HostRouting(unittest.TestCase):
    def test_the_first_label_names_the_tunnel_and_the_target_is_whole(self):
        self.assertEqual(route(b"/x/y?z", b"app.tunnels.example", b"GET", False, "tunnels.example"),
                         Route("app", b"/x/y?z", b""))

    def test_port_case_and_trailing_dot_do_not_matter(self):
        for host in (b"App.Tunnels.Example:8443", b"app.tunnels.example.", b"app.tunnels.example.:80"):
            self.assertEqual(domain_label(host, "tunnels.example"), "app", host)
        self.assertEqual(domain_label(b"app.tunnels.example", "Tunnels.Example"), "app")

    def test_other_hosts_route_by_path(self):
        for host in (b"tunnels.example", b"apptunnels.example", b"app.other.example", b"[::1]:8000", b"", None):
            self.assertIsNone(domain_label(host, "tunnels.example"), host)
        self.assertEqual(route(b"/app/x", b"tunnels.example", b"GET", False, "tunnels.example"),
                         Route("app", b"/x", b"/app"))

    def test_without_a_domain_the_host_is_ignored(self):
        self.assertIsNone(domain_label(b"app.tunnels.example", None))
        self.assertEqual(route(b"/x", b"app.tunnels.example", b"GET", False, None), Redirect(b"/x/"))

    def test_a_label_that_is_not_a_connection_id_is_unknown(self):
        self.assertEqual(route(b"/", b"-ab.tunnels.example", b"GET", False, "tunnels.example"), "unknown tunnel")
        self.assertEqual(route(b"/", b"healthz.tunnels.example", b"GET", False, "tunnels.example"), "unknown tunnel")
        self.assertEqual(route(b"/", b"a.b.tunnels.example", b"GET", False, "tunnels.example"), "unknown tunnel")

    def test_no_redirect_on_a_host_name(self):
        self.assertEqual(route(b"/app", b"t1.tunnels.example", b"GET", False, "tunnels.example"),
                         Route("t1", b"/app", b""))


class Health(unittest.TestCase):
    def test_healthz_is_the_relays_own(self):
        self.assertTrue(is_health(b"/healthz", b"relay", None))
        self.assertTrue(is_health(b"/healthz?probe=1", b"tunnels.example", "tunnels.example"))
        self.assertFalse(is_health(b"/healthz/", b"relay", None))
        self.assertFalse(is_health(b"/app/healthz", b"relay", None))

    def test_except_on_a_tunnels_host_name(self):
        self.assertFalse(is_health(b"/healthz", b"app.tunnels.example", "tunnels.example"))


class DirectoryRedirect(unittest.TestCase):
    def test_only_get_and_head_without_a_slash_or_upgrade(self):
        self.assertEqual(directory_redirect(b"a", b"", b"?", b"q", b"GET", False), Redirect(b"/a/?q"))
        self.assertIsNone(directory_redirect(b"a", b"/", b"", b"", b"GET", False))
        self.assertIsNone(directory_redirect(b"a", b"", b"", b"", b"PUT", False))
        self.assertIsNone(directory_redirect(b"a", b"", b"", b"", b"GET", True))


class AmbiguousHosts(unittest.TestCase):
    """host_refusal: a request whose tunnel a proxy in front could read differently."""

    def test_more_than_one_host_line(self):
        for domain in (None, "example.test"):
            self.assertEqual(host_refusal(b"/x", [b"t1.example.test", b"t2.example.test"], domain),
                             "more than one Host header")
            self.assertEqual(host_refusal(b"/x", [b"a", b"a"], domain), "more than one Host header")

    def test_absolute_form_must_name_the_host_with_a_domain(self):
        refusal = "the request target and Host name different hosts"
        self.assertEqual(host_refusal(b"http://t2.example.test/x", [b"t1.example.test"], "example.test"), refusal)
        self.assertEqual(host_refusal(b"http://t2.example.test?q", [], "example.test"), refusal)
        self.assertIsNone(host_refusal(b"HTTP://T2.example.test:80/x", [b"t2.EXAMPLE.test:80"], "example.test"))
        # Without --domain the host names no tunnel: only the path does.
        self.assertIsNone(host_refusal(b"http://relay.example/app/x", [b"relay"], None))

    def test_one_host_and_an_origin_form_target(self):
        self.assertIsNone(host_refusal(b"/x", [b"t1.example.test"], "example.test"))
        self.assertIsNone(host_refusal(b"/x", [], None))
