"""
PROXY protocol from the provider, checked by a real consumer: the provider sends its
header to an HAProxy frontend with accept-proxy; HAProxy passes the client address it
understood to a backend with send-proxy(-v2), where this test reads it.
"""

from __future__ import annotations

from twisted.internet import endpoints, reactor


from pipegate.ports.services import Service
from tests.test_ports_e2e import PortPlane
from tests.support import free_port
from tests import test_proxyprotocol as consumer


class ProviderProxyProtocol(PortPlane):
    timeout = 60
    start_haproxy = consumer.HAProxyTests.start_haproxy
    close_reader = consumer.HAProxyTests.close_reader

    async def check(self, version: str):
        await self.start_haproxy()
        gw, mux = await self.gateway()
        gate = free_port()
        self.provider(mux, [Service(gate, "127.0.0.1", self.front[version], proxy_protocol=version)])
        await self.open_tcp_gate(gw, gate)
        data = b"hello real consumer"
        client = consumer.Client(data, len(data))
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gate), client)
        echoed = await client.echoed
        client.transport.loseConnection()
        await client.lost
        self.assertEqual(echoed, data)
        [(source, destination)] = self.readers[version].headers
        self.assertEqual((source.host, source.port), ("127.0.0.1", client.local_port))
        self.assertEqual(destination.port, gate)

    async def test_v1(self):
        await self.check("v1")

    async def test_v2(self):
        await self.check("v2")

    def test_udp_refused_at_parse(self):
        from pipegate.ports.services import ServiceError, parse_services
        self.assertRaises(ServiceError, parse_services,
                          [{"gatePort": 1, "serviceHost": "h", "servicePort": 1, "protocol": "udp",
                            "proxyProtocol": "v2"}], "x")

