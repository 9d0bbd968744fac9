"""
Ingress policy, shaping and /unlimited at a real gateway: real TLS links, real sockets.
Timing checks are lower bounds only.
"""

from __future__ import annotations

import hashlib
import json

from twisted.internet import protocol, reactor, task
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool

from pipegate.core.policy import EMPTY
from pipegate.core.policydoc import load_policy
from pipegate.ports.resolver import Records
from pipegate.ports.services import Service
from pipegate.ports.unlimited import UnlimitedGate, UnlimitedResource, make_token
from tests.support import eventually, free_port, pattern, request
from tests.test_ports_e2e import Echo, PortPlane


def policy(doc) -> object:
    return load_policy([json.dumps(doc)])[0]


class Sink(protocol.Protocol):
    """Counts what it receives; answers the byte count on EOF."""

    def connectionMade(self):
        self.factory.connections += 1
        self.received = 0

    def dataReceived(self, data):
        self.received += len(data)

    def readConnectionLost(self):
        self.transport.write(str(self.received).encode())
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


from zope.interface import implementer  # noqa: E402
from twisted.internet.interfaces import IHalfCloseableProtocol  # noqa: E402
Sink = implementer(IHalfCloseableProtocol)(Sink)


class Policy(PortPlane):
    async def start(self, operator=EMPTY, provider_policy=b"", backend_protocol=Echo):
        factory = protocol.Factory.forProtocol(backend_protocol)
        factory.noisy = False
        factory.connections = 0
        self.backend_factory = factory
        backend = await self.listen_tcp(factory)
        self.gw, mux = await self.gateway(policy=operator)
        self.gate = free_port()
        self.records = Records()
        prov = self.provider(mux, [Service(self.gate, "127.0.0.1", backend.getHost().port)],
                             policy=provider_policy)
        prov.records = self.records
        await self.open_tcp_gate(self.gw, self.gate)

    async def roundtrip(self, payload=b"ping") -> bytes:
        client = await self.connect(self.gate)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        return await client.closed

    async def test_deny_closes_before_any_provider_sees_it(self):
        await self.start(policy({"ips": {"127.0.0.1": {"allow": False}}}))
        self.assertEqual(await self.roundtrip(), b"")
        self.assertEqual(self.backend_factory.connections, 0)
        self.assertEqual(self.gw.denied, 1)

    async def test_first_match_wins_and_labels_reach_the_resolver(self):
        await self.start(policy({"ips": {"127.0.0.0/8": {"labels": ["trusted"]}, "*": {"allow": False}}}))
        client = await self.connect(self.gate)
        client.transport.write(b"x")
        await eventually(lambda: client.received == b"x")
        (record,) = self.records.all()
        self.assertEqual(record["ingressLabels"], ["trusted"])
        client.transport.loseConnection()

    async def test_provider_policy_is_shipped_and_operator_wins(self):
        deny = load_policy([json.dumps({"defaults": {"allow": False}})])[1]
        await self.start(provider_policy=deny)
        self.assertEqual(await self.roundtrip(), b"")
        self.gw.config = type(self.gw.config)(policy=policy({"ips": {"127.0.0.1": {"allow": True}}}))
        self.assertEqual(await self.roundtrip(b"now"), b"nowbye")

    async def test_shaped_upload_and_download(self):
        limit = {"defaults": {"bandwidthLimit": {"mbps": 8, "burstMbps": 8}}}  # 1 MB/s, 1 MB burst
        await self.start(policy(limit), backend_protocol=Sink)
        started = reactor.seconds()
        answer = await self.roundtrip(pattern(5_000_000))
        self.assertEqual(answer, b"5000000")
        self.assertGreaterEqual(reactor.seconds() - started, 3.5)

    test_shaped_upload_and_download.timeout = 60

    async def test_two_connections_from_one_ip_share_the_rate(self):
        limit = {"defaults": {"bandwidthLimit": {"mbps": 8, "burstMbps": 8, "direction": "upload"}}}
        await self.start(policy(limit), backend_protocol=Sink)
        started = reactor.seconds()
        from twisted.internet import defer
        answers = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self.roundtrip(pattern(2_500_000, seed=i))) for i in range(2)])
        self.assertEqual(answers, [b"2500000", b"2500000"])
        self.assertGreaterEqual(reactor.seconds() - started, 3.5)

    test_two_connections_from_one_ip_share_the_rate.timeout = 60

    async def test_shaped_download(self):
        limit = {"defaults": {"bandwidthLimit": {"mbps": 8, "burstMbps": 8, "direction": "download"}}}
        await self.start(policy(limit))
        payload = pattern(2_500_000)
        started = reactor.seconds()
        answer = await self.roundtrip(payload)  # echoed: 2.5 MB down at 1 MB/s after a 1 MB burst
        self.assertEqual(hashlib.sha256(answer).digest(), hashlib.sha256(payload + b"bye").digest())
        # (2.5 MB - 1 MB burst - one 256 KiB window already granted) at 1 MB/s
        self.assertGreaterEqual(reactor.seconds() - started, 1.2)

    test_shaped_download.timeout = 60


class Unlimited(Policy):
    async def test_unlimited_endpoint(self):
        limit = {"defaults": {"bandwidthLimit": {"mbps": 0.08}}}  # 10 kB/s: far too slow for 1 MB
        await self.start(policy(limit), backend_protocol=Sink)
        gate = UnlimitedGate("s3cret-s3cret")
        site = server.Site(UnlimitedResource(gate, self.gw.grants, reactor))
        site.noisy = False
        port = await self.listen_tcp(site)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.cleanups.append(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        url = f"http://127.0.0.1:{port.getHost().port}/unlimited"
        now = reactor.seconds() * 1000

        response, body = await request(agent, b"GET", url)
        self.assertEqual((response.code, json.loads(body)), (400, {"error": "missing_payload"}))
        response, body = await request(agent, b"GET", url + "?payload=" + make_token("s3cret-s3cret", "10.1.2.3", now))
        self.assertEqual((response.code, json.loads(body)["error"]), (403, "ip_mismatch"))
        response, body = await request(agent, b"GET", url + "?payload=" + make_token("wrong", "127.0.0.1", now))
        self.assertEqual((response.code, json.loads(body)), (403, {"error": "invalid_token"}))
        response, body = await request(agent, b"DELETE", url)
        self.assertEqual(response.code, 405)

        token = make_token("s3cret-s3cret", "127.0.0.1", now)
        response, body = await request(agent, b"POST", url, {b"content-type": b"application/json"},
                                       json.dumps({"payload": token}).encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["ip"], "127.0.0.1")
        response, body = await request(agent, b"GET", url + "?payload=" + token)
        self.assertEqual((response.code, json.loads(body)), (409, {"error": "replay_detected"}))

        answer = await self.roundtrip(pattern(1_000_000))  # would take ~100 s shaped
        self.assertEqual(answer, b"1000000")
        client = await self.connect(self.gate)
        client.transport.write(b"x")
        await eventually(lambda: self.records.all())
        self.assertEqual(self.records.all()[0]["ingressLabels"], ["gateway-unlimited"])
        client.transport.abortConnection()
        await task.deferLater(reactor, 0, lambda: None)

    test_unlimited_endpoint.timeout = 60


class UnlimitedTokenCommand(PortPlane):
    def test_pipegate_unlimited_token(self):
        import subprocess
        import sys

        from pipegate.ports.unlimited import decrypt_token

        out = subprocess.run([sys.executable, "-m", "pipegate", "unlimited-token", "--secret", "s3cret",
                              "--ip", "203.0.113.7"], capture_output=True, text=True, check=True).stdout
        payload = decrypt_token(out.strip(), "s3cret")
        self.assertEqual(payload["ip"], "203.0.113.7")
        self.assertLess(abs(payload["timestamp"] - reactor.seconds() * 1000), 60_000)
