"""
The real peers the docs tell users to put next to PipeGate, configured as the docs print them:

- nginx terminating TLS in front of the relay, with the server block of docs/deployment.md
  §3.2 as printed (only its ports, certificate paths and upstream substituted): a connector
  logs in through it over wss://, callers' requests and a public WebSocket get through, and
  the app sees the caller in X-Forwarded-For;
- nginx behind a gate, with the two server blocks of docs/configuration.md §8: with
  C{proxy_protocol} the app behind it sees the gate client's address, and without it the
  resolver URL nginx builds from its own variables names the gate client (§8.11);
- redis-server through a TCP gate: redis-cli, redis-benchmark with pipelining, a 4 MiB value
  and pub/sub pushes on an otherwise idle connection.

Callers connect from 127.0.0.2; the relay, nginx and the provider talk over 127.0.0.1.
Without nginx or redis these tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, endpoints, reactor, ssl, utils
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from pipegate.http.connector import Connector
from pipegate.http.forwarded import parse_trusted_proxies
from pipegate.http.target import ConnectorConfig, Target
from pipegate.ports.services import Service
from tests.support import (
    Loopback, PeerProcess, RawHTTP, TestApp, WSClient, debian_tool, eventually, pattern, split_response,
    start_peer, token_for,
)
from tests.test_ports_e2e import PortPlane
from tests.support import free_port
from tests.test_tls import make_ca_and_cert

CALLER = "127.0.0.2"
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def nginx_block(document: str, marker: str) -> str:
    """The first ```nginx block of C{docs/document} that contains C{marker}."""
    with open(os.path.join(DOCS, document)) as f:
        text = f.read()
    for block in re.findall(r"```nginx\n(.*?)```", text, re.S):
        if marker in block:
            return block
    raise AssertionError(f"no nginx block with {marker!r} in docs/{document}")


def substitute(block: str, replacements: dict[str, str]) -> str:
    """Replace each line fragment exactly once: a doc that changes fails here, not silently."""
    for old, new in replacements.items():
        assert block.count(old) == 1, f"{old!r} is not in the documented block once:\n{block}"
        block = block.replace(old, new)
    return block


async def start_nginx(case: unittest.TestCase, server_block: str, ports) -> PeerProcess:
    """Run a foreground nginx whose http {} context holds C{server_block}."""
    path = debian_tool(case, "nginx", "/usr/sbin/nginx")
    directory = FilePath(case.mktemp())
    directory.makedirs()
    os.chmod(directory.path, 0o777)   # nginx's workers run as nobody when the test runs as root
    temp = {kind: directory.child(kind).path for kind in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    config = directory.child("nginx.conf")
    config.setContent(f"""
daemon off;
worker_processes 1;
pid {directory.child("nginx.pid").path};
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
{server_block}
}}
""".encode())
    return await start_peer(case, [path, "-e", "stderr", "-p", directory.path, "-c", config.path], ports)


async def tls_exchange(port: int, payload: bytes, trust, source: str = CALLER) -> bytes:
    """Send C{payload} over TLS (verifying "localhost") from C{source}; all that comes back."""
    proto = RawHTTP(payload)
    endpoint = endpoints.wrapClientTLS(
        ssl.optionsForClientTLS("localhost", trustRoot=trust),
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0)))
    await endpoints.connectProtocol(endpoint, proto)
    return await proto.done


class NginxInFrontOfTheRelay(unittest.TestCase):
    """docs/deployment.md §3.2, "Behind nginx (or another TLS proxy)", as printed."""

    async def setUp(self):
        directory = FilePath(self.mktemp())
        directory.makedirs()
        key, cert, self.ca = make_ca_and_cert(directory)
        with open(self.ca, "rb") as f:
            self.trust = ssl.Certificate.loadPEM(f.read())
        self.loop = Loopback(self)
        self.app = TestApp()
        app_port = await self.loop.app(self.app)
        # The documented relay.env: PIPEGATE_TRUSTED_PROXY=127.0.0.1,::1
        _, relay_port = await self.loop.relay(trusted_proxies=parse_trusted_proxies("127.0.0.1,::1"))
        self.front = free_port()
        block = substitute(nginx_block("deployment.md", "proxy_set_header Upgrade $http_upgrade;"), {
            "listen 443 ssl;": f"listen 127.0.0.1:{self.front} ssl;",
            "listen [::]:443 ssl;": "",
            "/etc/letsencrypt/live/relay.example.com/fullchain.pem": cert,
            "/etc/letsencrypt/live/relay.example.com/privkey.pem": key,
            "proxy_pass http://127.0.0.1:8000;": f"proxy_pass http://127.0.0.1:{relay_port.getHost().port};",
        })
        self.nginx = await start_nginx(self, block, [self.front])
        # The connector logs in through nginx, as in a deployment: wss:// and a WebSocket upgrade.
        self.connector = Connector(
            reactor, ConnectorConfig(Target.parse(f"http://127.0.0.1:{app_port.getHost().port}")),
            f"wss://localhost:{self.front}", token_for("t1"), "t1", ca_file=self.ca,
            retry_policy=lambda attempt: 0.2)
        self.connector.startService()
        self.loop.services.append(self.connector)
        # A documented block that breaks the WebSocket upgrade (its Connection header, say)
        # leaves the connector redialling: a failure naming it, not the 120 s test timeout.
        try:
            await eventually(lambda: self.connector.online is None, timeout=20)   # (None once fired)
        except AssertionError:
            self.fail(f"the connector did not log in through nginx within 20 s: {self.nginx.output.decode()}")

    async def test_a_caller_is_seen_through_nginx(self):
        raw = await tls_exchange(self.front, b"GET /t1/who?x=1 HTTP/1.1\r\nHost: relay.example.com\r\n"
                                             b"Connection: close\r\n\r\n", self.trust)
        status, _, body = split_response(raw)
        self.assertIn(b" 200 ", status)
        seen = json.loads(body)
        headers = {k.lower(): v for k, v in seen["headers"]}
        self.assertEqual(seen["uri"], "/who?x=1")
        # As the section says: the caller appended by nginx, then the relay's TCP peer (nginx).
        self.assertEqual(headers["x-forwarded-for"], f"{CALLER}, 127.0.0.1")
        self.assertEqual(headers["x-forwarded-proto"], "https")

    async def test_an_upload_bigger_than_nginx_default_streams_through(self):
        body = pattern(3 * 1024 * 1024)   # nginx's default client_max_body_size is 1 MB
        raw = await tls_exchange(self.front, b"POST /t1/echo HTTP/1.1\r\nHost: relay.example.com\r\n"
                                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                                 + body, self.trust)
        status, headers, echoed = split_response(raw)
        self.assertIn(b" 200 ", status)
        self.assertEqual(dict(headers)[b"x-body-sha256"], hashlib.sha256(body).hexdigest().encode())

    async def test_a_public_websocket_gets_through(self):
        factory = WebSocketClientFactory(f"wss://localhost:{self.front}/t1/ws")
        factory.protocol = WSClient
        factory.opened, factory.messages, factory.closed, factory.waiter = defer.Deferred(), [], [], None
        endpoint = endpoints.wrapClientTLS(
            ssl.optionsForClientTLS("localhost", trustRoot=self.trust),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.front, bindAddress=(CALLER, 0)))
        proto = await endpoint.connect(factory)
        self.addCleanup(lambda: proto.transport.abortConnection() if proto.transport.connected else None)
        client = await factory.opened
        factory.waiter = defer.Deferred()
        client.sendMessage(b"through nginx", isBinary=True)
        self.assertEqual(await factory.waiter, b"echo:through nginx")


class NginxBehindAGate(PortPlane):
    """docs/configuration.md, PROXY protocol: nginx with proxy_protocol as the gate's service."""

    async def test_the_app_behind_nginx_sees_the_gate_client(self):
        loop = Loopback(self)
        app = TestApp()
        app_port = await loop.app(app)
        nginx_port = free_port()
        block = substitute(nginx_block("configuration.md", "real_ip_header proxy_protocol;"), {
            "listen 127.0.0.1:8080 proxy_protocol;": f"listen 127.0.0.1:{nginx_port} proxy_protocol;",
            "proxy_pass http://127.0.0.1:3000;": f"proxy_pass http://127.0.0.1:{app_port.getHost().port};",
        })
        await start_nginx(self, block, [nginx_port])
        gw, mux = await self.gateway()
        gate = free_port()
        self.provider(mux, [Service(gate, "127.0.0.1", nginx_port, proxy_protocol="v1")])
        await self.open_tcp_gate(gw, gate)
        proto = RawHTTP(b"GET /who HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate, bindAddress=(CALLER, 0)), proto)
        status, _, body = split_response(await proto.done)
        self.assertIn(b" 200 ", status)
        headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
        self.assertEqual((headers["x-real-ip"], headers["x-forwarded-for"]), (CALLER, CALLER))


    async def test_the_resolve_url_nginx_hands_the_app_names_the_gate_client(self):
        # §8.11: nginx fills in the lookup URL from its own variables; the app GETs it with the
        # resolver's basic auth while the client's connection is open.
        import base64

        from twisted.web import server

        from pipegate.ports.resolver import Records, ResolverResource
        from tests.support import request

        loop = Loopback(self)
        app = TestApp()
        app_port = await loop.app(app)
        records = Records()
        resolver = await loop.listen(server.Site(ResolverResource(records, ("pg", "s3cret"))))
        nginx_port = free_port()
        block = substitute(nginx_block("configuration.md", "X-PipeGate-Resolve"), {
            "listen 127.0.0.1:8080;": f"listen 127.0.0.1:{nginx_port};",
            "proxy_pass http://127.0.0.1:3000;": f"proxy_pass http://127.0.0.1:{app_port.getHost().port};",
            "http://127.0.0.1:8081/resolve": f"http://127.0.0.1:{resolver.getHost().port}/resolve",
        })
        await start_nginx(self, block, [nginx_port])
        gw, mux = await self.gateway()
        gate = free_port()
        self.provider(mux, [Service(gate, "127.0.0.1", nginx_port)]).records = records
        await self.open_tcp_gate(gw, gate)
        proto = RawHTTP(b"GET /who HTTP/1.1\r\nHost: app\r\n\r\n")   # keep-alive: the channel stays
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate, bindAddress=(CALLER, 0)), proto)
        self.cleanups.append(lambda: proto.transport.abortConnection() if proto.transport.connected else None)
        await eventually(lambda: app.seen)
        url = {k.lower(): v for k, v in app.seen[0]["headers"]}["x-pipegate-resolve"]
        response, body = await request(loop.agent(), b"GET", url,
                                       {b"authorization": b"Basic " + base64.b64encode(b"pg:s3cret")})
        self.assertEqual(response.code, 200, body)
        record = json.loads(body)
        self.assertEqual((record["source"]["ip"], record["source"]["port"], record["gatePort"]),
                         (CALLER, proto.transport.getHost().port, gate))


class RedisThroughAGate(PortPlane):
    """redis-server as a gate's service, driven by redis's own clients."""

    timeout = 60

    async def setUp(self):
        super().setUp()
        server = debian_tool(self, "redis-server", "/usr/bin/redis-server")
        self.cli = debian_tool(self, "redis-cli", "/usr/bin/redis-cli")
        self.redis_port = free_port()
        await start_peer(self, [server, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--logfile", ""], [self.redis_port])
        gw, mux = await self.gateway()
        self.gate = free_port()
        self.provider(mux, [Service(self.gate, "127.0.0.1", self.redis_port)])
        await self.open_tcp_gate(gw, self.gate)

    async def redis_cli(self, port: int, *args: str) -> bytes:
        out, err, code = await utils.getProcessOutputAndValue(self.cli, ["-h", "127.0.0.1", "-p", str(port), *args])
        self.assertEqual(code, 0, err)
        return out.strip()

    async def test_commands_and_pipelined_load(self):
        self.assertEqual(await self.redis_cli(self.gate, "PING"), b"PONG")
        self.assertEqual(await self.redis_cli(self.gate, "SET", "greeting", "through the gate"), b"OK")
        self.assertEqual(await self.redis_cli(self.redis_port, "GET", "greeting"), b"through the gate")
        before = await self.commands_processed()
        bench = debian_tool(self, "redis-benchmark", "/usr/bin/redis-benchmark")
        out, err, code = await utils.getProcessOutputAndValue(
            bench, ["-h", "127.0.0.1", "-p", str(self.gate), "-n", "5000", "-c", "20", "-P", "16",
                    "-t", "set,get", "-q"])
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"SET:", out)
        self.assertIn(b"GET:", out)
        # Every command of both tests reached redis (the clients also send a CONFIG GET or two).
        self.assertGreaterEqual(await self.commands_processed() - before, 10_000)

    async def commands_processed(self) -> int:
        info = await self.redis_cli(self.redis_port, "INFO", "stats")
        return int(re.search(rb"total_commands_processed:(\d+)", info).group(1))

    async def resp(self, payload: bytes, expect: int) -> tuple[RawHTTP, bytes]:
        """Send RESP bytes through the gate; wait for C{expect} bytes back (the connection stays open)."""
        proto = RawHTTP(payload)
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate), proto)
        self.cleanups.append(lambda: proto.transport.abortConnection() if proto.transport.connected else None)
        await eventually(lambda: len(proto.received) >= expect, timeout=20)
        return proto, bytes(proto.received)

    async def test_a_4_mib_value_both_ways(self):
        value = pattern(4 * 1024 * 1024)
        command = b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s\r\n*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" % (len(value), value)
        expected = b"+OK\r\n$%d\r\n%s\r\n" % (len(value), value)
        _, received = await self.resp(command, len(expected))
        self.assertEqual(hashlib.sha256(received).hexdigest(), hashlib.sha256(expected).hexdigest())

    async def test_pubsub_pushes_reach_an_idle_subscriber(self):
        subscribe = b"*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nnews\r\n"
        confirmation = b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
        subscriber, received = await self.resp(subscribe, len(confirmation))
        self.assertEqual(received, confirmation)
        self.assertEqual(await self.redis_cli(self.gate, "PUBLISH", "news", "hello"), b"1")
        push = b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
        await eventually(lambda: bytes(subscriber.received) == confirmation + push)
