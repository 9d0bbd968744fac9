"""
Tunnel identity and visitor policy against real relays and connectors on loopback:
revocation (file change, SIGHUP, while connected), the ownership rule (409, shared tokens),
case-insensitive ids, basic auth and IP rules enforced at the relay.
"""

from __future__ import annotations

import base64
import json
import os
import signal

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer, reactor
from twisted.trial import unittest

from pipegate import auth
from pipegate.http import frames
from pipegate.http.revocation import RevocationWatcher
from pipegate.http.visitors import VisitorPolicy
from tests.support import (
    SECRET, SETTINGS, Loopback, TestApp, eventually, raw_request, request, split_response, token_for,
)
from tests.support import free_port
from tests.test_processes import TWISTD, child_env, spawn


def jti_of(token: str) -> str:
    return auth.verify_claims(SETTINGS, token, reactor.seconds()).jti


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def get(port, path: str, source: str = "127.0.0.1", headers: dict | None = None):
    lines = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{lines}\r\n".encode(),
                       source=source)


class Revocation(unittest.TestCase):
    async def setUp(self):
        self.loop = Loopback(self)
        self.app_port = await self.loop.app()
        self.relay, self.port = await self.loop.relay()
        self.path = self.mktemp()
        self.write("# nothing revoked yet\n")
        self.watcher = RevocationWatcher(self.path, reactor, self.relay.tunnels.set_revocations, interval=0.1)
        self.watcher.load()
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)
        self.fatal: list[str] = []

    def write(self, text: str) -> None:
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.replace(self.path + ".new", self.path)   # a new inode: the stat differs

    async def connect(self, token: str, tunnel: str = "t1", wait: bool = True):
        return await self.loop.connector(self.port, self.app_port, tunnel, token=token, wait=wait,
                                         on_fatal=self.fatal.append)

    async def test_revoked_token_is_cut_off_while_connected_and_refused_after(self):
        token = token_for("t1")
        other = await self.connect(token_for("t2"), "t2")
        connector = await self.connect(token)
        response, _ = await request(self.loop.agent(), b"GET", f"http://127.0.0.1:{self.port.getHost().port}/t1/x")
        self.assertEqual(response.code, 200)
        self.write(f"# revoked\n{jti_of(token).upper()}   # case does not matter\nnot valid entry\n")
        await eventually(lambda: self.fatal)
        self.assertIn("401 token revoked", self.fatal[0])
        self.assertEqual(connector.links, [])
        raw = await get(self.port, "/t1/x")
        self.assertEqual(split_response(raw)[0].split(b" ")[1], b"404")
        # The other tunnel is untouched.
        self.assertEqual(len(other.links), 1)
        self.assertEqual(self.relay.stats.get("admission_failures", "revoked"), 1)

    async def test_a_connector_that_said_goaway_is_still_cut_when_revoked(self):
        # A connector finishing its requests after GOAWAY must not outlive its revocation.
        token = token_for("t1")
        connector = await self.connect(token)
        link = connector.links[0]
        slow = defer.ensureDeferred(get(self.port, "/t1/slow/30"))
        await eventually(lambda: self.relay.tunnels["t1"].in_flight == 1)
        link.send(frames.GoAway(b"stopping"))
        await eventually(lambda: not self.relay.tunnels.get("t1") or not self.relay.tunnels["t1"].links)
        self.write(f"{jti_of(token)}\n")
        raw = await slow
        self.assertEqual(split_response(raw)[0].split(b" ")[1], b"503")
        self.assertIn(b"token revoked", raw)

    async def test_revoking_a_connection_id(self):
        await self.connect(token_for("t1", shared=True))
        self.write("T1\n")
        await eventually(lambda: self.fatal)
        self.assertNotIn("t1", self.relay.tunnels)
        # A fresh token for the same id is refused too; taking the line out admits it again.
        self.fatal.clear()
        await self.connect(token_for("t1"), wait=False)
        await eventually(lambda: self.fatal)
        self.write("")
        await eventually(lambda: not self.relay.tunnels.revocations.entries)
        await self.connect(token_for("t1"))


class Ownership(unittest.TestCase):
    async def setUp(self):
        self.loop = Loopback(self)
        self.app, self.app2 = TestApp(), TestApp()
        self.app_port = await self.loop.app(self.app)
        self.app2_port = await self.loop.app(self.app2)
        self.relay, self.port = await self.loop.relay()
        self.agent = self.loop.agent()
        self.fatal: list[str] = []

    async def test_unshared_second_token_gets_409_and_retries_until_the_tunnel_is_free(self):
        first = await self.loop.connector(self.port, self.app_port, "t1")
        second = await self.loop.connector(self.port, self.app2_port, "t1", token=token_for("t1"),
                                           wait=False, on_fatal=self.fatal.append)
        await eventually(lambda: self.relay.stats.get("admission_failures", "conflict") >= 2)
        self.assertEqual(self.fatal, [])
        self.assertTrue(second.running)
        # The relay counts a refusal before its 409 reaches the connector: wait for that too.
        await eventually(lambda: second.stats.get("admission_failures", "conflict") >= 2)
        for i in range(4):
            response, _ = await request(self.agent, b"GET", f"http://127.0.0.1:{self.port.getHost().port}/t1/{i}")
            self.assertEqual(response.code, 200)
        self.assertEqual((len(self.app.seen), len(self.app2.seen)), (4, 0))
        await first.stopService()
        await second.online
        response, _ = await request(self.agent, b"GET", f"http://127.0.0.1:{self.port.getHost().port}/t1/after")
        self.assertEqual(self.app2.seen[-1]["uri"], "/after")

    async def test_shared_tokens_spread_load_and_one_shared_is_not_enough(self):
        await self.loop.connector(self.port, self.app_port, "t1", token=token_for("t1", shared=True))
        await self.loop.connector(self.port, self.app2_port, "t1", token=token_for("t1", shared=True))
        for i in range(10):
            response, _ = await request(self.agent, b"GET", f"http://127.0.0.1:{self.port.getHost().port}/t1/{i}")
            self.assertEqual(response.code, 200)
        self.assertEqual((len(self.app.seen), len(self.app2.seen)), (5, 5))
        await self.loop.connector(self.port, self.app2_port, "t2")
        await self.loop.connector(self.port, self.app2_port, "t2", token=token_for("t2", shared=True), wait=False)
        await eventually(lambda: self.relay.stats.get("admission_failures", "conflict") >= 1)
        self.assertEqual(len(self.relay.tunnels["t2"].links), 1)

    async def test_ids_are_case_insensitive(self):
        await self.loop.connector(self.port, self.app_port, "MyApp")
        self.assertEqual(list(self.relay.tunnels), ["myapp"])
        for path in ("/myapp/a", "/MYAPP/b", "/MyApp/c"):
            response, _ = await request(self.agent, b"GET", f"http://127.0.0.1:{self.port.getHost().port}{path}")
            self.assertEqual(response.code, 200, path)
        self.assertEqual([s["uri"] for s in self.app.seen], ["/a", "/b", "/c"])
        # A token for "myapp" names the same tunnel, so the ownership rule refuses it.
        await self.loop.connector(self.port, self.app2_port, "myapp", wait=False)
        await eventually(lambda: self.relay.stats.get("admission_failures", "conflict") >= 1)
        self.assertEqual(len(self.relay.tunnels["myapp"].links), 1)


class Visitors(unittest.TestCase):
    async def setUp(self):
        self.loop = Loopback(self)
        self.app = TestApp()
        self.app_port = await self.loop.app(self.app)
        self.relay, self.port = await self.loop.relay()
        self.agent = self.loop.agent()

    def policy(self, *credentials, allow=(), deny=(), tunnel="t1"):
        return VisitorPolicy.from_options(tunnel, credentials, allow, deny)

    async def test_basic_auth(self):
        await self.loop.connector(self.port, self.app_port, "t1",
                                  visitor_policy=self.policy("ann:correct horse", "bob:pw"))
        status, headers, body = split_response(await get(self.port, "/t1/x"))
        self.assertIn(b" 401 ", status)
        self.assertIn((b"www-authenticate", b'Basic realm="t1", charset="UTF-8"'), headers)
        status, _, _ = split_response(await get(self.port, "/t1/x", headers=basic("ann", "wrong")))
        self.assertIn(b" 401 ", status)
        self.assertEqual(self.app.seen, [])
        status, _, _ = split_response(await get(self.port, "/t1/x", headers=basic("ann", "correct horse")))
        self.assertIn(b" 200 ", status)
        response, _ = await request(self.agent, b"GET", f"http://127.0.0.1:{self.port.getHost().port}/t1/y",
                                    headers=basic("bob", "pw"))
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.app.seen), 2)
        for seen in self.app.seen:
            self.assertNotIn("authorization", [k.lower() for k, v in seen["headers"]])
        by_outcome = self.relay.stats.by_label("caller_decisions")
        self.assertEqual(by_outcome, {"t1,visitor_no_credentials": 1, "t1,visitor_bad_credentials": 1,
                                      "t1,visitor_allowed": 2})

    async def test_password_guessing_is_throttled_per_tunnel(self):
        from pipegate.http.visitors import HASH_BURST

        await self.loop.connector(self.port, self.app_port, "t1", visitor_policy=self.policy("ann:pw"))
        status, _, _ = split_response(await get(self.port, "/t1/x", headers=basic("ann", "pw")))
        self.assertIn(b" 200 ", status)
        codes = []
        # The budget refills at HASH_RATE a second while we guess; 10 x the burst is far beyond it.
        while b"429" not in codes and len(codes) < 10 * HASH_BURST:
            status, headers, _ = split_response(await get(self.port, "/t1/x", headers=basic("ann", f"guess{len(codes)}")))
            codes.append(status.split(b" ")[1])
        self.assertEqual(set(codes[:int(HASH_BURST) - 1]), {b"401"})
        self.assertEqual(codes[-1], b"429")
        self.assertIn((b"retry-after", b"1"), headers)
        self.assertIn(b"429 Too Many Requests", status)
        # Credentials the relay already checked still pass.
        status, _, _ = split_response(await get(self.port, "/t1/x", headers=basic("ann", "pw")))
        self.assertIn(b" 200 ", status)

    async def test_without_basic_auth_the_app_keeps_authorization(self):
        await self.loop.connector(self.port, self.app_port, "t1", visitor_policy=self.policy(allow=["127.0.0.1"]))
        status, _, _ = split_response(await get(self.port, "/t1/x", headers={"Authorization": "Bearer app-token"}))
        self.assertIn(b" 200 ", status)
        self.assertIn(["Authorization", "Bearer app-token"], self.app.seen[-1]["headers"])

    async def test_allow_and_deny_by_source_address_before_credentials(self):
        await self.loop.connector(self.port, self.app_port, "t1",
                                  visitor_policy=self.policy("ann:pw", allow=["127.0.0.0/8"], deny=["127.0.0.2"]))
        status, _, _ = split_response(await get(self.port, "/t1/x", "127.0.0.2", basic("ann", "pw")))
        self.assertIn(b" 403 ", status)
        status, _, _ = split_response(await get(self.port, "/t1/x", "127.0.0.1", basic("ann", "pw")))
        self.assertIn(b" 200 ", status)
        self.assertEqual(len(self.app.seen), 1)

    async def test_allow_only_127_0_0_2(self):
        await self.loop.connector(self.port, self.app_port, "t1", visitor_policy=self.policy(allow=["127.0.0.2/32"]))
        status, _, _ = split_response(await get(self.port, "/t1/x", "127.0.0.1"))
        self.assertIn(b" 403 ", status)
        status, _, _ = split_response(await get(self.port, "/t1/x", "127.0.0.2"))
        self.assertIn(b" 200 ", status)

    async def test_behind_a_trusted_proxy_the_forwarded_caller_counts(self):
        from pipegate.http.forwarded import parse_trusted_proxies

        relay, port = await self.loop.relay(trusted_proxies=parse_trusted_proxies("127.0.0.1"))
        await self.loop.connector(port, self.app_port, "t1", visitor_policy=self.policy(deny=["203.0.113.0/24"]))
        status, _, _ = split_response(await get(port, "/t1/x", "127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}))
        self.assertIn(b" 403 ", status)
        status, _, _ = split_response(await get(port, "/t1/x", "127.0.0.1", {"X-Forwarded-For": "198.51.100.1"}))
        self.assertIn(b" 200 ", status)
        # From a peer that is not a trusted proxy, X-Forwarded-For counts for nothing.
        status, _, _ = split_response(await get(port, "/t1/x", "127.0.0.2", {"X-Forwarded-For": "203.0.113.9"}))
        self.assertIn(b" 200 ", status)

    async def test_ingress_policy_applies_first(self):
        from pipegate.core.policydoc import load_policy

        relay, port = await self.loop.relay(policy=load_policy(
            [json.dumps({"ips": {"127.0.0.3": {"allow": False}}})])[0])
        await self.loop.connector(port, self.app_port, "t1", visitor_policy=self.policy("ann:pw"))
        status, _, _ = split_response(await get(port, "/t1/x", "127.0.0.3", basic("ann", "pw")))
        self.assertIn(b" 403 ", status)
        status, _, _ = split_response(await get(port, "/t1/x", "127.0.0.1"))
        self.assertIn(b" 401 ", status)
        self.assertEqual(relay.stats.by_label("caller_decisions"),
                         {"t1,ingress_denied": 1, "t1,visitor_no_credentials": 1})

    async def test_mismatched_policies_are_refused(self):
        token = token_for("t1")
        await self.loop.connector(self.port, self.app_port, "t1", token=token,
                                  visitor_policy=self.policy("ann:pw"))
        await self.loop.connector(self.port, self.app_port, "t1", token=token,
                                  visitor_policy=self.policy("ann:other"), wait=False)
        await self.loop.connector(self.port, self.app_port, "t1", token=token, wait=False)
        await eventually(lambda: self.relay.stats.get("admission_failures", "conflict") >= 2)
        # The same policy (hashes equal across connectors) joins.
        await self.loop.connector(self.port, self.app_port, "t1", token=token,
                                  visitor_policy=self.policy("ann:pw"))
        self.assertEqual(len(self.relay.tunnels["t1"].links), 2)

    async def test_waiting_requests_are_checked_when_the_connector_logs_in(self):
        relay, port = await self.loop.relay(offline_grace=30)
        waiting = defer.Deferred.fromCoroutine(get(port, "/t1/x"))
        await eventually(lambda: "t1" in relay.tunnels and relay.tunnels["t1"].waiting)
        await self.loop.connector(port, self.app_port, "t1", visitor_policy=self.policy("ann:pw"))
        status, _, _ = split_response(await waiting)
        self.assertIn(b" 401 ", status)
        self.assertEqual(self.app.seen, [])

    async def test_connector_refuses_a_relay_that_ignores_the_policy(self):
        """A relay from before visitor policies (here: a bare pipegate.v1 WebSocket server)."""
        factory = WebSocketServerFactory()
        factory.protocol = WebSocketServerProtocol

        def on_connect(self, request):
            return "pipegate.v1"
        factory.protocol = type("OldRelay", (WebSocketServerProtocol,), {"onConnect": on_connect})
        old = await self.loop.listen(factory)
        fatal = []
        connector = await self.loop.connector(old, self.app_port, "t1", visitor_policy=self.policy("ann:pw"),
                                              wait=False, on_fatal=fatal.append)
        await eventually(lambda: fatal)
        self.assertIn("does not enforce visitor policies", fatal[0])
        self.assertEqual(connector.links, [])


class RelayProcess(unittest.TestCase):
    """twistd pipegate-server --revoked FILE --access-log: SIGHUP re-reads the file; decisions are logged."""

    timeout = 120

    async def test_file_change_sighup_and_access_log(self):
        loop = Loopback(self)
        app_port = await loop.app()
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("# empty\n")
        port = free_port()
        root = os.path.dirname(os.path.dirname(os.path.abspath(auth.__file__)))
        relay = spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-server", "--listen",
                                      f"tcp:{port}:interface=127.0.0.1", "--access-log"],
                      child_env(PIPEGATE_JWT_SECRET=SECRET, PIPEGATE_REVOKED=path, PYTHONPATH=root))
        await eventually(lambda: b"starting on" in relay.output, timeout=60)
        fatal1, fatal2 = [], []
        token1, token2 = token_for("t1"), token_for("t2")
        await loop.connector(port, app_port, "t1", token=token1,
                             visitor_policy=VisitorPolicy.from_options("t1", ["ann:pw"]), on_fatal=fatal1.append)
        await loop.connector(port, app_port, "t2", token=token2, on_fatal=fatal2.append)
        status, _, _ = split_response(await get(port, "/t1/x"))
        self.assertIn(b" 401 ", status)
        await eventually(lambda: b'"visitor_no_credentials"' in relay.output)
        # A change to the file alone (the relay polls its stat) cuts t2 off.
        with open(path, "a") as f:
            f.write(jti_of(token2) + "  # t2's token\n")
        await eventually(lambda: fatal2, timeout=30)
        self.assertIn("revoked", fatal2[0])
        self.assertEqual(fatal1, [])
        self.assertIn(b"1 entries", relay.output)
        # SIGHUP reads the file even when it did not change ...
        self.assertNotIn(b"(unchanged)", relay.output)
        relay.transport.signalProcess(signal.SIGHUP)
        await eventually(lambda: b"(unchanged)" in relay.output)
        # ... and a change with it.
        with open(path, "a") as f:
            f.write(jti_of(token1) + "\n")
        relay.transport.signalProcess(signal.SIGHUP)
        await eventually(lambda: fatal1, timeout=30)
        self.assertIn(b"disconnecting a connector of tunnel t1: token revoked", relay.output)


class ConnectorProcesses(unittest.TestCase):
    """twistd pipegate-client with --basic-auth (from the variable), --deny, and a 409 it survives."""

    timeout = 120

    async def setUp(self):
        self.loop = Loopback(self)
        self.app = TestApp()
        self.app_port = await self.loop.app(self.app)
        self.relay, self.port = await self.loop.relay()
        root = os.path.dirname(os.path.dirname(os.path.abspath(auth.__file__)))
        self.env = dict(PYTHONPATH=root)   # this checkout's code in the child (it runs in _trial_temp)

    def client(self, token: str, *args: str, **env: str):
        return spawn(self, TWISTD + ["-n", "--pidfile=", "pipegate-client", "--token", token, *args,
                                     f"http://127.0.0.1:{self.app_port.getHost().port}",
                                     f"ws://127.0.0.1:{self.port.getHost().port}/t1"],
                     child_env(**self.env, **env))

    async def test_policy_from_the_command_line_and_a_second_token(self):
        first = self.client(token_for("t1"), "--deny", "127.0.0.2",
                            PIPEGATE_BASIC_AUTH="ann:first-password bob:second")
        await eventually(lambda: b"tunnel t1 online" in first.output, timeout=60)
        self.assertNotIn(b"first-password", first.output)
        status, headers, _ = split_response(await get(self.port, "/t1/x"))
        self.assertIn(b" 401 ", status)
        status, _, _ = split_response(await get(self.port, "/t1/x", "127.0.0.2", basic("bob", "second")))
        self.assertIn(b" 403 ", status)
        status, _, _ = split_response(await get(self.port, "/t1/x", "127.0.0.1", basic("bob", "second")))
        self.assertIn(b" 200 ", status)
        self.assertNotIn("authorization", [k.lower() for k, v in self.app.seen[-1]["headers"]])
        second = self.client(token_for("t1"), PIPEGATE_BASIC_AUTH="ann:first-password bob:second")
        await eventually(lambda: b"(409 tunnel already served by another token" in second.output, timeout=60)
        await eventually(lambda: second.output.count(b"409") >= 2, timeout=60)   # it retries
        self.assertFalse(second.ended.called)
        self.assertEqual(len(self.relay.tunnels["t1"].links), 1)


class Attacks(unittest.TestCase):
    """What a stranger can try against the login and the visitor policy."""

    async def setUp(self):
        self.loop = Loopback(self)
        self.app = TestApp()
        self.app_port = await self.loop.app(self.app)

    def login(self, port, token: str, policy: str) -> bytes:
        return get(port, "/t1", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Protocol": "pipegate.v1", "Authorization": "Bearer " + token,
            "PipeGate-Visitor-Policy": policy})

    async def test_malformed_or_oversized_policy_is_refused_and_others_keep_running(self):
        relay, port = await self.loop.relay()
        await self.loop.connector(port, self.app_port, "t2")
        for policy in ('{"basic":[["ann","nothex"]]}', "not json",
                       json.dumps({"deny": [f"10.0.{i // 256}.{i % 256}" for i in range(300)]}),
                       "[" * 8000):   # nesting that overflows the JSON decoder's stack
            status, _, _ = split_response(await self.login(port, token_for("t1"), policy))
            self.assertIn(b" 400 bad PipeGate-Visitor-Policy", status)
        self.assertEqual(relay.stats.get("admission_failures", "bad_policy"), 4)
        self.assertNotIn("t1", relay.tunnels)
        status, _, _ = split_response(await get(port, "/t2/x"))
        self.assertIn(b" 200 ", status)

    async def test_made_up_ids_add_no_metric_series(self):
        from pipegate.core.policydoc import load_policy

        relay, port = await self.loop.relay(offline_grace=0.05, policy=load_policy(
            [json.dumps({"ips": {"127.0.0.1": {"allow": False}}})])[0])
        for i in range(5):
            status, _, _ = split_response(await get(port, f"/made-up-{i}/x"))
            self.assertIn(b" 403 ", status)
        self.assertEqual(relay.stats.by_label("caller_decisions"), {"(offline),ingress_denied": 5})


class PolicyChange(unittest.TestCase):
    async def test_a_new_connector_set_brings_its_own_policy(self):
        """
        When the last connector leaves, its policy goes with it, even while the tunnel lives on
        (a request still finishing on a link that said GOAWAY); the next connector's applies.
        """
        loop = Loopback(self)
        app = TestApp()
        app_port = await loop.app(app)
        relay, port = await loop.relay(offline_grace=30)
        first = await loop.connector(port, app_port, "t1",
                                     visitor_policy=VisitorPolicy.from_options("t1", ["ann:pw"]))
        hanging = defer.Deferred.fromCoroutine(get(port, "/t1/hang", headers=basic("ann", "pw")))
        await eventually(lambda: app.hanging)
        first.links[0].send(frames.GoAway(b"leaving"))   # no new requests for it; the one in flight runs on
        await eventually(lambda: not relay.tunnels["t1"].links)
        self.assertEqual(relay.tunnels["t1"].in_flight, 1)
        waiting = defer.Deferred.fromCoroutine(get(port, "/t1/x", headers={"Authorization": "Bearer app"}))
        await eventually(lambda: relay.tunnels["t1"].waiting)
        await loop.connector(port, app_port, "t1", token=token_for("t1"))   # no policy now
        status, _, _ = split_response(await waiting)
        self.assertIn(b" 200 ", status)
        self.assertIn(["Authorization", "Bearer app"], app.seen[-1]["headers"])
        app.hanging[0].finish()
        await hanging
