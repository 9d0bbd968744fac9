"""The fingerprint resolver: a backend learns the real client of its connection."""

from __future__ import annotations

import base64
import json
import urllib.parse

from twisted.internet import endpoints, protocol, reactor
from twisted.web import server

from pipegate.ports.resolver import Records, ResolverResource
from pipegate.ports.services import Service
from tests.support import eventually, free_port, request
from tests.test_ports_e2e import Client, PortPlane


class Backend(protocol.Protocol):
    """Remembers its connections' address tuples (what nginx calls remote/server addr)."""

    def connectionMade(self):
        peer, host = self.transport.getPeer(), self.transport.getHost()
        self.factory.seen.append((peer.host, peer.port, host.host, host.port))

    def dataReceived(self, data):
        self.transport.write(data)


class Resolver(PortPlane):
    async def setUp(self):
        super().setUp()
        factory = protocol.Factory.forProtocol(Backend)
        factory.noisy = False
        factory.seen = []
        self.backend_factory = factory
        backend = await self.listen_tcp(factory)
        self.gw, mux = await self.gateway()
        self.gate = free_port()
        self.records = Records()
        site = server.Site(ResolverResource(self.records, ("admin", "s3cret")))
        site.noisy = False
        http_port = await self.listen_tcp(site)
        self.url = f"http://127.0.0.1:{http_port.getHost().port}"
        prov = self.provider(mux, [Service(self.gate, "127.0.0.1", backend.getHost().port)])
        prov.records = self.records
        await self.open_tcp_gate(self.gw, self.gate)
        from twisted.web.client import Agent, HTTPConnectionPool
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.cleanups.append(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)
        self.auth = {b"authorization": b"Basic " + base64.b64encode(b"admin:s3cret")}

    async def get(self, path, params=None, auth=True):
        query = "?" + urllib.parse.urlencode(params) if params else ""
        response, body = await request(self.agent, b"GET", self.url + path + query,
                                       self.auth if auth else None)
        return response.code, json.loads(body), response

    async def test_resolve_lifecycle(self):
        client = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate), client)
        client.transport.write(b"hi")
        await eventually(lambda: client.received == b"hi")
        remote_ip, remote_port, local_ip, local_port = self.backend_factory.seen[0]
        params = {"remote_addr": remote_ip, "remote_port": remote_port,
                  "server_addr": local_ip, "server_port": local_port}
        code, record, _ = await self.get("/resolve", params)
        self.assertEqual(code, 200)
        mine = client.transport.getHost()
        self.assertEqual(record["source"], {"ip": "127.0.0.1", "port": mine.port})
        self.assertEqual((record["protocol"], record["gatePort"]), ("tcp", self.gate))
        self.assertRegex(record["id"], "^[0-9a-f]{32}$")
        code, everything, _ = await self.get("/all")
        self.assertEqual((code, len(everything)), (200, 1))
        code, body, response = await self.get("/all", auth=False)
        self.assertEqual(code, 401)
        self.assertTrue(response.headers.getRawHeaders(b"www-authenticate"))
        code, body, _ = await self.get("/resolve", params, auth=False)
        self.assertEqual(code, 401)
        code, body, _ = await self.get("/resolve", {"remote_addr": remote_ip})
        self.assertEqual((code, body), (400, {"error": "missing_tuple_params"}))
        code, body, _ = await self.get("/resolve", dict(params, remote_port=1))
        self.assertEqual((code, body["error"]), (404, "not_found"))
        code, body, _ = await self.get("/health", auth=False)
        self.assertEqual((code, body), (200, {"ok": True}))
        client.transport.loseConnection()
        await client.closed
        await eventually(lambda: not self.records.all())
        code, body, _ = await self.get("/resolve", params)
        self.assertEqual(code, 404)



class ListingIsPrivate(Resolver):
    """/all lists client IPs: without basic auth it is off unless the operator opts in (issue 17 item 11)."""

    async def listing(self, open_listing: bool):
        site = server.Site(ResolverResource(self.records, None, open_listing))
        site.noisy = False
        port = await self.listen_tcp(site)
        response, body = await request(self.agent, b"GET", f"http://127.0.0.1:{port.getHost().port}/all")
        return response.code, json.loads(body)

    async def test_all_without_auth_needs_the_opt_in(self):
        client = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate), client)
        client.transport.write(b"hi")
        await eventually(lambda: client.received == b"hi")
        code, body = await self.listing(False)
        self.assertEqual(code, 403)
        self.assertEqual(body["error"], "listing_disabled")
        self.assertNotIn("127.0.0.1", json.dumps(body))
        code, body = await self.listing(True)
        self.assertEqual((code, body[0]["source"]["ip"]), (200, "127.0.0.1"))
        client.transport.loseConnection()
        await client.closed

    def test_provider_option(self):
        from pipegate.tap import provider as provider_tap

        options = provider_tap.Options()
        options.environ = {"PIPEGATE_RESOLVER_OPEN_LISTING": "true"}
        options.parseOptions(["--router", "ab" * 32, "--connect", "tcp:127.0.0.1:1"])
        self.assertTrue(options["resolver-open-listing"])
        options = provider_tap.Options()
        options.environ = {}
        options.parseOptions(["--router", "ab" * 32, "--connect", "tcp:127.0.0.1:1"])
        self.assertFalse(options["resolver-open-listing"])
