"""
Scale-out of the HTTP plane on a real HAProxy (docs/deployment.md, "Scale-out"):
two real relays behind HAProxy hashing the connection id consistently, twenty real
connectors logging in through HAProxy, and public callers for every id reaching their
own connector through HAProxy too, by path and, with C{--domain}, by Host header.

Without haproxy these tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import hashlib
import json
import os

from twisted.internet import reactor
from twisted.trial import unittest

from pipegate.http.connector import Connector
from pipegate.http.target import ConnectorConfig, Target
from tests.support import Loopback, TestApp, free_port, pattern, request, token_for
from tests.test_proxyprotocol import haproxy_or_skip, start_haproxy

DOMAIN = "tunnels.test"

# The two backends of docs/deployment.md ("Scale-out"), with test addresses and timeouts.
CONFIG = """\
global
    maxconn 512

defaults
    mode http
    timeout connect 5s
    timeout client  65s
    timeout server  330s
    timeout tunnel  1h

frontend by_path
    bind 127.0.0.1:{front_path}
    default_backend relays_by_path

frontend by_host
    bind 127.0.0.1:{front_host}
    default_backend relays_by_host

backend relays_by_path
    balance uri path-only depth 1
    hash-type consistent
    option httpchk
    http-check send meth GET uri /healthz
    default-server check on-marked-down shutdown-sessions
    server relay1 127.0.0.1:{relay1}
    server relay2 127.0.0.1:{relay2}

backend relays_by_host
    acl on_subdomain req.hdr(host),field(1,:),lower -m end .{domain}
    http-request set-var(txn.tunnel) req.hdr(host),field(1,:),lower,field(1,.) if on_subdomain
    http-request set-var(txn.tunnel) path,field(2,/),lower if !on_subdomain
    balance hash var(txn.tunnel)
    hash-type consistent
    option httpchk
    http-check send meth GET uri /healthz
    default-server check on-marked-down shutdown-sessions
    server relay1 127.0.0.1:{relay1}
    server relay2 127.0.0.1:{relay2}
"""

IDS = [f"app-{i:02d}" for i in range(20)]


class SharedApp(TestApp):
    """The local app of every connector: connector i serves /c<i>/...; the app answers
    as L{TestApp} for the rest of the path and names the connector in C{x-connector}."""

    def render(self, request):
        first, _, rest = request.uri[1:].partition(b"/")
        request.setHeader(b"x-connector", first)
        request.uri = b"/" + rest
        request.path = request.uri.split(b"?")[0]
        return super().render(request)


class ScaleOutTests(unittest.TestCase):

    timeout = 120

    async def setUp(self):
        path = haproxy_or_skip(self)
        self.loop = Loopback(self)
        self.app = SharedApp()
        self.app_port = await self.loop.app(self.app)
        self.relays = []
        ports = []
        for _ in range(2):
            relay, listening = await self.loop.relay(domain=DOMAIN)
            self.relays.append(relay)
            ports.append(listening.getHost().port)
        self.relay_ports = ports
        self.front = {"path": free_port(), "host": free_port()}
        directory = self.mktemp()
        os.makedirs(directory)
        config = os.path.join(directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(CONFIG.format(front_path=self.front["path"], front_host=self.front["host"],
                                  relay1=ports[0], relay2=ports[1], domain=DOMAIN))
        check = await _run(path, ["-c", "-f", config])
        self.assertEqual(check[0], 0, check[1])
        await start_haproxy(self, path, config, self.front.values())
        self.agent = self.loop.agent()

    async def connect_all(self, front: str) -> None:
        """One connector per id, dialling HAProxy (not a relay) and serving /c<i> of the app."""
        app = self.app_port.getHost().port
        for i, tunnel_id in enumerate(IDS):
            connector = Connector(
                reactor, ConnectorConfig(Target.parse(f"http://127.0.0.1:{app}/c{i}")),
                f"ws://127.0.0.1:{self.front[front]}", token_for(tunnel_id), tunnel_id,
                retry_policy=lambda attempt: 0.1)
            connector.startService()
            self.loop.services.append(connector)
            await connector.online

    def assert_partitioned(self) -> None:
        """Every id is online on exactly one relay, and both relays carry some."""
        held = [set(relay.tunnels) for relay in self.relays]
        self.assertEqual(held[0] & held[1], set())
        self.assertEqual(held[0] | held[1], set(IDS))
        self.assertTrue(held[0] and held[1], held)

    async def assert_reaches(self, url: str, i: int, headers: dict | None = None) -> None:
        response, body = await request(self.agent, b"GET", url, headers)
        self.assertEqual(response.code, 200, (url, body))
        self.assertEqual(response.headers.getRawHeaders(b"x-connector"), [f"c{i}".encode()])
        self.assertEqual(json.loads(body)["uri"], f"/hello?i={i}")

    async def test_path_routing(self):
        """Logins at /<id> and callers at /<id>/... hash to the same relay."""
        await self.connect_all("path")
        self.assert_partitioned()
        base = f"http://127.0.0.1:{self.front['path']}"
        for i, tunnel_id in enumerate(IDS):
            await self.assert_reaches(f"{base}/{tunnel_id}/hello?i={i}", i)
        # Bodies both ways through HAProxy, a relay and a connector.
        for i in (3, 7, 15):
            payload = pattern(1024 * 1024, seed=i)
            response, body = await request(self.agent, b"POST", f"{base}/{IDS[i]}/echo", {}, payload)
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders(b"x-connector"), [f"c{i}".encode()])
            self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(payload).digest())
        # An id nobody serves gets the relay's own answer, whichever relay that is.
        response, _ = await request(self.agent, b"GET", f"{base}/nobody-here/x")
        self.assertEqual(response.code, 404)

    async def test_host_routing(self):
        """With --domain: Host <id>.<domain> and /<id> hash to the relay holding the login."""
        await self.connect_all("host")
        self.assert_partitioned()
        base = f"http://127.0.0.1:{self.front['host']}"
        for i, tunnel_id in enumerate(IDS):
            await self.assert_reaches(f"{base}/hello?i={i}", i,
                                      {b"host": f"{tunnel_id.upper()}.{DOMAIN}:8080".encode()})
            await self.assert_reaches(f"{base}/{tunnel_id}/hello?i={i}", i)

    async def test_relays_share_nothing(self):
        """The partition is HAProxy's doing: a relay asked directly knows only its own ids."""
        await self.connect_all("path")
        for relay, port in zip(self.relays, self.relay_ports):
            for tunnel_id in IDS:
                response, _ = await request(self.agent, b"GET", f"http://127.0.0.1:{port}/{tunnel_id}/hello")
                self.assertEqual(response.code, 200 if tunnel_id in relay.tunnels else 404)


async def _run(path: str, args: list[str]) -> tuple[int, str]:
    from twisted.internet.utils import getProcessOutputAndValue

    out, err, code = await getProcessOutputAndValue(path, args, env=dict(os.environ))
    return code, (out + err).decode(errors="replace")
