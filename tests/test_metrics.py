"""
/metrics and /status: the pure parts (Stats, collectors, the status table), then the
listener on real loopback sockets with real traffic through a relay and a gateway,
scraped before and after, and `pipegate status URL` as a real process.
"""

from __future__ import annotations

import json
import sys

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import endpoints, reactor
from twisted.trial import unittest
from twisted.web import server

from pipegate.metrics import (
    ServiceCollector, gateway_collector, provider_collector, registry_for, relay_collector,
)
from pipegate.ports.services import Service
from pipegate.stats import Stats
from pipegate.status import OpsResource, format_status, gateway_status, provider_status, relay_status
from tests.support import Loopback, eventually, free_port, request, token_for
from tests.test_ports_e2e import Client, PortPlane
from tests.test_processes import child_env, spawn


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class StatsTests(unittest.TestCase):
    def test_counts_by_label(self):
        stats = Stats()
        stats.inc("bytes", "up", 10)
        stats.inc("bytes", "up", 5)
        stats.inc("bytes", "down", 1)
        stats.inc("policy_denials")
        self.assertEqual(stats.by_label("bytes"), {"up": 15, "down": 1})
        self.assertEqual(stats.get("policy_denials"), 1)
        self.assertEqual(stats.get("reconnects"), 0)

    def test_unknown_counter_is_refused(self):
        self.assertRaises(KeyError, Stats().inc, "bogus")

    def test_collector_names_and_units(self):
        stats = Stats()
        stats.inc("requests", "200", 3)
        stats.inc("throttled_seconds", "down", 0.5)
        collector = ServiceCollector(stats, ("requests", "throttled_seconds", "reconnects"),
                                     lambda: [("tunnels", "t", None, {"": 2})],
                                     extra=lambda: {("throttled_seconds", "down"): 0.25})
        from prometheus_client.exposition import generate_latest

        got = samples(generate_latest(registry_for(collector)).decode())
        self.assertEqual(got[("pipegate_requests_total", (("code", "200"),))], 3)
        self.assertEqual(got[("pipegate_throttled_seconds_total", (("direction", "down"),))], 0.75)
        self.assertEqual(got[("pipegate_reconnects_total", ())], 0)
        self.assertEqual(got[("pipegate_tunnels", ())], 2)

    def test_format_status_tables(self):
        text = format_status({"service": "relay", "draining": False,
                              "tunnels": [{"id": "abc", "connectors": 2}, {"id": "longer-id", "connectors": 10}],
                              "empty": []})
        lines = text.splitlines()
        self.assertIn("service: relay", lines)
        self.assertIn("draining: no", lines)
        self.assertIn("tunnels (2):", lines)
        header = next(line for line in lines if "CONNECTORS" in line)
        row = next(line for line in lines if "longer-id" in line)
        self.assertEqual(header.index("CONNECTORS"), row.index("10"))
        self.assertIn("  (none)", lines)


async def get(agent, url: str):
    response, body = await request(agent, b"GET", url)
    return response.code, body


async def ops_listener(testcase, loop, collector, status) -> str:
    site = server.Site(OpsResource(collector, status))
    site.noisy = False
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    loop.ports.append(port)
    return f"http://127.0.0.1:{port.getHost().port}"


class RelayMetrics(unittest.TestCase):
    async def setUp(self):
        self.loop = Loopback(self)
        self.app_port = await self.loop.app()
        self.relay, self.relay_port = await self.loop.relay()
        self.base = f"http://127.0.0.1:{self.relay_port.getHost().port}"
        self.ops = await ops_listener(self, self.loop, relay_collector(self.relay),
                                      lambda: relay_status(self.relay))
        self.agent = self.loop.agent()

    async def scrape(self) -> dict:
        code, body = await get(self.agent, self.ops + "/metrics")
        self.assertEqual(code, 200)
        return samples(body.decode())

    async def test_counters_move_with_traffic(self):
        before = await self.scrape()
        self.assertEqual(before[("pipegate_tunnels", ())], 0)
        await self.loop.connector(self.relay_port, self.app_port, "t1")
        for _ in range(3):
            response, body = await request(self.agent, b"POST", self.base + "/t1/echo", body=b"x" * 1000)
            self.assertEqual(response.code, 200)
        response, _ = await request(self.agent, b"GET", self.base + "/t1/status/404")
        self.assertEqual(response.code, 404)
        response, _ = await request(self.agent, b"GET", self.base + "/nope/x")  # tunnel offline
        self.assertEqual(response.code, 404)
        after = await self.scrape()
        self.assertEqual(after[("pipegate_tunnels", ())], 1)
        self.assertEqual(after[("pipegate_connectors", ())], 1)
        code = lambda c: ("pipegate_requests_total", (("code", c),))  # noqa: E731
        self.assertEqual(after[code("200")] - before.get(code("200"), 0), 3)
        self.assertEqual(after[code("404")] - before.get(code("404"), 0), 2)
        up = ("pipegate_bytes_total", (("direction", "up"),))
        down = ("pipegate_bytes_total", (("direction", "down"),))
        self.assertGreaterEqual(after[up] - before.get(up, 0), 3000)
        self.assertGreaterEqual(after[down] - before.get(down, 0), 3000)

    async def test_admission_failures_by_reason(self):
        from tests.support import ws_connect

        factory, _ = await ws_connect(self.loop, self.relay_port, "/t9", protocols=["pipegate.v1"],
                                      headers={"Authorization": "Bearer not-a-jwt"})
        failure = await self.assertFailure(factory.opened, Exception)
        self.assertIn("401", str(failure))
        await eventually(lambda: self.relay.stats.by_label("admission_failures"))
        after = await self.scrape()
        self.assertEqual(after[("pipegate_admission_failures_total", (("reason", "bad_token"),))], 1)

    async def test_status_shows_live_tunnels(self):
        token = token_for("t1")   # one token, two connectors (the same jti may share a tunnel)
        await self.loop.connector(self.relay_port, self.app_port, "t1", token=token)
        await self.loop.connector(self.relay_port, self.app_port, "t1", token=token)
        await self.loop.connector(self.relay_port, self.app_port, "t2")
        hang = request(self.agent, b"GET", self.base + "/t2/hang")
        from twisted.internet import defer
        pending = defer.Deferred.fromCoroutine(hang)
        await eventually(lambda: self.relay.tunnels["t2"].in_flight == 1)
        code, body = await get(self.agent, self.ops + "/status")
        self.assertEqual(code, 200)
        status = json.loads(body)
        self.assertEqual(status["service"], "relay")
        self.assertEqual(status["tunnels"], [
            {"id": "t1", "connectors": 2, "in_flight": 0, "waiting": 0, "refused_full": 0},
            {"id": "t2", "connectors": 1, "in_flight": 1, "waiting": 0, "refused_full": 0},
        ])
        # pipegate status URL, as a real process, while the relay serves
        child = spawn(self, [sys.executable, "-m", "pipegate", "status", self.ops], child_env())
        self.assertEqual(await child.ended, 0, child.output)
        out = child.output.decode()
        self.assertIn("tunnels (2):", out)
        row = next(line.split() for line in out.splitlines() if line.strip().startswith("t2"))
        self.assertEqual(row, ["t2", "1", "1", "0", "0"])
        for link in self.relay.tunnels["t2"].links:
            link.go_away("test over")
        await pending

    async def test_unknown_path_is_404(self):
        code, _ = await get(self.agent, self.ops + "/other")
        self.assertEqual(code, 404)

    async def test_status_command_reports_unreachable(self):
        port = free_port()
        child = spawn(self, [sys.executable, "-m", "pipegate", "status", f"http://127.0.0.1:{port}"],
                      child_env())
        self.assertEqual(await child.ended, 1)
        self.assertIn(b"pipegate status:", child.output)

    async def test_status_command_on_something_else_is_one_line(self):
        # `pipegate status` pointed at a port that is not a --metrics listener (an SSH or
        # echo server) printed a 30-line http.client traceback; `host:port` without
        # http:// said "unknown url type".
        from twisted.internet.protocol import Factory, Protocol

        class Banner(Protocol):
            def connectionMade(self):
                self.transport.write(b"SSH-2.0-OpenSSH_9.2\r\n")
                self.transport.loseConnection()

        port = await Loopback(self).listen(Factory.forProtocol(Banner))
        child = spawn(self, [sys.executable, "-m", "pipegate", "status", f"http://127.0.0.1:{port.getHost().port}"],
                      child_env())
        self.assertEqual(await child.ended, 1)
        out = child.output.decode()
        self.assertNotIn("Traceback", out)
        self.assertEqual(out.count("\n"), 1, out)
        self.assertIn("not an HTTP answer (is this a --metrics listener?)", out)
        child = spawn(self, [sys.executable, "-m", "pipegate", "status", self.ops.split("//", 1)[1]], child_env())
        self.assertEqual(await child.ended, 0, child.output)
        self.assertIn(b"tunnels (", child.output)


class RelayShapingMetrics(unittest.TestCase):
    async def test_policy_denials_and_throttled_seconds(self):
        from pipegate.core.policydoc import load_policy

        loop = Loopback(self)
        app_port = await loop.app()
        policy = load_policy(['{"ips": {"127.0.0.2": {"allow": false}}}'])[0]
        relay, port = await loop.relay(policy=policy, tunnel_rate=500_000)  # 0.5 MB/s, 0.5 MB burst
        await loop.connector(port, app_port, "t1")
        ops = await ops_listener(self, loop, relay_collector(relay), lambda: relay_status(relay))
        agent = loop.agent()
        base = f"http://127.0.0.1:{port.getHost().port}"
        response, body = await request(agent, b"GET", base + "/t1/big/1500000")
        self.assertEqual(len(body), 1_500_000)
        # A caller from 127.0.0.2 is refused by the policy.
        from tests.support import RawHTTP

        raw = RawHTTP(b"GET /t1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port, bindAddress=("127.0.0.2", 0)), raw)
        self.assertIn(b" 403 ", await raw.done)
        code, text = await get(agent, ops + "/metrics")
        got = samples(text.decode())
        self.assertEqual(got[("pipegate_policy_denials_total", ())], 1)
        self.assertEqual(got[("pipegate_requests_total", (("code", "403"),))], 1)
        # (1.5 MB - 0.5 MB burst) at 0.5 MB/s, less one 256 KiB window granted ahead: > 1 s of pauses
        self.assertGreater(got[("pipegate_throttled_seconds_total", (("direction", "down"),))], 1.0)


class ConnectorMetrics(unittest.TestCase):
    async def test_connector_listener(self):
        from pipegate.metrics import connector_collector
        from pipegate.status import connector_status

        loop = Loopback(self)
        app_port = await loop.app()
        relay, port = await loop.relay()
        connector = await loop.connector(port, app_port, "t1")
        ops = await ops_listener(self, loop, connector_collector(connector), lambda: connector_status(connector))
        agent = loop.agent()
        code, text = await get(agent, ops + "/metrics")
        got = samples(text.decode())
        self.assertEqual(got[("pipegate_relay_links", ())], 1)
        self.assertEqual(got[("pipegate_reconnects_total", ())], 0)
        for link in relay.tunnels["t1"].links:
            link.transport.abortConnection()  # the link drops; the connector comes back
        await eventually(lambda: connector.stats.get("reconnects") == 1)
        code, body = await get(agent, ops + "/status")
        status = json.loads(body)
        self.assertEqual((status["service"], status["tunnel"], len(status["links"])), ("connector", "t1", 1))


class GatewayMetrics(PortPlane):
    async def setUp(self):
        super().setUp()
        self.backend = await self.backend_echo()
        self.gate = free_port()
        self.gw, self.mux = await self.gateway()
        self.prov = self.provider(self.mux, [Service(self.gate, "127.0.0.1", self.backend.getHost().port)])
        await self.open_tcp_gate(self.gw, self.gate)
        self.loop = Loopback(self)
        self.agent = self.loop.agent()
        self.ops = await ops_listener(self, self.loop, gateway_collector(self.gw), lambda: gateway_status(self.gw))
        self.prov_ops = await ops_listener(self, self.loop, provider_collector(self.prov),
                                           lambda: provider_status(self.prov))

    async def scrape(self, url) -> dict:
        code, body = await get(self.agent, url + "/metrics")
        self.assertEqual(code, 200)
        return samples(body.decode())

    async def test_counters_and_gauges_move(self):
        before = await self.scrape(self.ops)
        self.assertEqual(before[("pipegate_gates", (("protocol", "tcp"),))], 1)
        self.assertEqual(before[("pipegate_links", (("role", "provider"),))], 1)
        client = await self.connect(self.gate)
        client.transport.write(b"x" * 5000)
        await eventually(lambda: len(client.received) >= 5000)
        during = await self.scrape(self.ops)
        self.assertEqual(during[("pipegate_channels", (("protocol", "tcp"),))], 1)
        client.transport.loseWriteConnection()
        await client.closed
        after = await self.scrape(self.ops)
        up = ("pipegate_bytes_total", (("direction", "up"),))
        down = ("pipegate_bytes_total", (("direction", "down"),))
        self.assertGreaterEqual(after[up] - before.get(up, 0), 5000)
        self.assertGreaterEqual(after[down] - before.get(down, 0), 5000)
        opens = ("pipegate_channel_opens_total", (("result", "ok"),))
        self.assertEqual(after[opens] - before.get(opens, 0), 1)
        prov = await self.scrape(self.prov_ops)
        self.assertGreaterEqual(prov[("pipegate_bytes_total", (("direction", "up"),))], 5000)
        self.assertEqual(prov[("pipegate_services", ())], 1)

    async def test_status_shows_peers_routes_gates(self):
        client = await self.connect(self.gate)
        client.transport.write(b"hi")
        await eventually(lambda: len(client.received) >= 2)
        code, body = await get(self.agent, self.ops + "/status")
        status = json.loads(body)
        self.assertEqual(status["service"], "gateway")
        self.assertEqual([p["role"] for p in status["peers"]], ["provider"])
        self.assertEqual(status["routes"][0]["gate"], f"{self.gate}/tcp")
        self.assertEqual(status["routes"][0]["service"], f"127.0.0.1:{self.backend.getHost().port}")
        self.assertEqual(status["gates"], [{"gate": f"{self.gate}/tcp", "providers": 1, "channels": 1}])
        code, body = await get(self.agent, self.prov_ops + "/status")
        status = json.loads(body)
        self.assertEqual(status["services"][0]["gate"], f"{self.gate}/tcp")
        self.assertEqual([(link["role"], link["channels"]) for link in status["links"]], [("gateway", 1)])
        child = spawn(self, [sys.executable, "-m", "pipegate", "status", self.ops + "/status"], child_env())
        self.assertEqual(await child.ended, 0, child.output)
        self.assertIn(f"{self.gate}/tcp".encode(), child.output)
        self.assertIn(b"peers (1):", child.output)

    async def test_wrong_secret_counts_an_admission_failure(self):
        other = "ab" * 32
        self.provider(self.mux, [], secret=bytes.fromhex(other))
        await eventually(lambda: self.gw.stats.by_label("admission_failures"))
        after = await self.scrape(self.ops)
        failures = sum(v for (name, _), v in after.items() if name == "pipegate_admission_failures_total")
        self.assertGreaterEqual(failures, 1)
        self.assertEqual(after[("pipegate_links", (("role", "provider"),))], 1)



class GatewayShapingMetrics(PortPlane):
    async def test_policy_denials_and_throttled_seconds(self):
        from pipegate.core.policydoc import load_policy

        backend = await self.backend_echo()
        gate = free_port()
        doc = {"defaults": {"bandwidthLimit": {"mbps": 4, "burstMbps": 4}},  # 0.5 MB/s, 0.5 MB burst
               "ips": {"127.0.0.2": {"allow": False}}}
        gw, mux = await self.gateway(policy=load_policy([json.dumps(doc)])[0])
        self.provider(mux, [Service(gate, "127.0.0.1", backend.getHost().port)])
        await self.open_tcp_gate(gw, gate)
        loop = Loopback(self)
        ops = await ops_listener(self, loop, gateway_collector(gw), lambda: gateway_status(gw))
        client = await self.connect(gate)
        client.transport.write(b"y" * 1_500_000)
        await eventually(lambda: len(client.received) >= 1_500_000, timeout=30)
        # Live connection: its pauses so far are already in the scrape.
        got = samples((await get(loop.agent(), ops + "/metrics"))[1].decode())
        self.assertGreater(got[("pipegate_throttled_seconds_total", (("direction", "up"),))], 0.5)
        refused = Client()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", gate, bindAddress=("127.0.0.2", 0)), refused)
        await refused.closed
        client.transport.loseWriteConnection()
        await client.closed
        got = samples((await get(loop.agent(), ops + "/metrics"))[1].decode())
        self.assertEqual(got[("pipegate_policy_denials_total", ())], 1)
        self.assertGreater(got[("pipegate_throttled_seconds_total", (("direction", "up"),))], 0.5)
        self.assertGreater(got[("pipegate_throttled_seconds_total", (("direction", "down"),))], 0.5)

    test_policy_denials_and_throttled_seconds.timeout = 60
