"""
Docker mode against hostile containers (issue 17 item 6), end to end: a provider and a
gateway built by their tap modules, the Engine API double on a real UNIX socket, real
backends and clients through the gates.  A container that shows up later cannot take
another's gate port or alias, whatever its name sorts as; one container cannot announce
thousands of ports; the gateway opens only the port ranges its operator allows.
"""

from __future__ import annotations

import json

from twisted.internet import protocol, reactor, task

from pipegate.ports.docker.containers import CLAIM_GRACE_REFRESHES, discover
from pipegate.ports.gateway import parse_port_ranges
from pipegate.tap import gateway as gateway_tap
from pipegate.tap import provider as provider_tap
from tests.support import eventually, free_port, free_ports
from tests.test_docker_discovery import NETWORK, make_container
from tests.test_docker_e2e import SECRET_HEX, DockerPlane


class Answer(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(self.factory.answer)


class HostileContainers(DockerPlane):

    async def setUp(self):
        await super().setUp()
        self.gw, self.mux = await self.gateway()

    def provider(self, *extra: str):
        argv = ["--router", SECRET_HEX, "--connect", f"tcp:127.0.0.1:{self.mux.getHost().port}",
                "--ping-interval", "0.5", "--ping-deadline", "2", "--docker", self.double.endpoint,
                "--refresh", "0.2", *extra]
        return self.start(provider_tap, argv)

    async def answering(self, answer: bytes) -> int:
        factory = protocol.Factory.forProtocol(Answer)
        factory.noisy = False
        factory.answer = answer
        return (await self.listen_tcp(factory)).getHost().port

    async def ask(self, gate: int) -> bytes:
        client = await self.connect(gate)
        client.transport.write(b"?")
        await eventually(lambda: client.received)
        client.transport.loseConnection()
        return bytes(client.received)

    async def test_a_later_container_cannot_take_a_gate_whatever_its_name(self):
        owner_port, thief_port = await self.answering(b"owner"), await self.answering(b"thief")
        gate = free_port()
        self.provider()
        owner = self.engine.container("zz-owner", aliases=["localhost"],
                                      labels={"pipegate.EXPOSE": f"{owner_port}:{gate}"})
        self.engine.run(owner)
        await self.open_tcp_gate(self.gw, gate)
        self.assertEqual(await self.ask(gate), b"owner")
        # "aa-thief" sorts first by name and claims the same gate port.
        thief = self.engine.container("aa-thief", aliases=["127.0.0.1"],
                                      labels={"pipegate.EXPOSE": f"{thief_port}:{gate}"})
        self.engine.run(thief)
        await eventually(lambda: self.logged(f"gate port {gate}/tcp of container aa-thief"))
        await task.deferLater(reactor, 0.6, lambda: None)   # several refreshes
        self.assertEqual(await self.ask(gate), b"owner")
        self.assertTrue(self.logged("is already taken by container zz-owner"))
        # When the owner goes, the next claimant gets the gate.
        self.engine.stop(owner)
        await eventually(lambda: self.gw.routes and any(
            r.service_port == thief_port for rs in self.gw.routes.values() for r in rs))
        self.assertEqual(await self.ask(gate), b"thief")

    async def test_a_later_container_cannot_take_an_alias(self):
        # Docker's DNS would spread "web.test" over both containers: the thief's services
        # under that name are refused.  (Nothing here resolves web.test: only routes count.)
        gate, thief_gate = free_ports(2)
        self.provider()
        owner = self.engine.container("zz-owner", aliases=["web.test"], labels={"pipegate.EXPOSE": f"80:{gate}"})
        self.engine.run(owner)
        await self.open_tcp_gate(self.gw, gate)
        thief = self.engine.container("aa-thief", aliases=["web.test"],
                                      labels={"pipegate.EXPOSE": f"81:{thief_gate}"})
        self.engine.run(thief)
        await eventually(lambda: self.logged("alias web.test of container aa-thief"))
        await task.deferLater(reactor, 0.6, lambda: None)
        self.assertNotIn((thief_gate, "tcp"), self.gw.gates)
        self.assertIn((gate, "tcp"), self.gw.gates)
        self.assertTrue(self.logged("is already used by container zz-owner"))
        # "localhost" and addresses are no DNS names: containers may share them (ports still may not).
        other = self.engine.container("other", aliases=["localhost"], labels={"pipegate.EXPOSE": f"80:{thief_gate}"})
        self.engine.run(other)
        await self.open_tcp_gate(self.gw, thief_gate)

    async def test_ports_per_container_are_capped(self):
        gates = free_ports(50)
        top = self.provider("--docker-max-ports", "5")
        label = ",".join(f"{self.echo_port}:{g}" if i == 0 else f"{20000 + i}:{g}" for i, g in enumerate(gates))
        self.engine.run(self.engine.container("greedy", aliases=["localhost"], labels={"pipegate.EXPOSE": label}))
        await eventually(lambda: self.logged("container greedy offers 50 ports, more than --docker-max-ports (5)"))
        await eventually(lambda: len(self.gw.gates) == 5)
        await task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(len(self.gw.gates), 5)
        provider = next(s for s in top if hasattr(s, "services") and hasattr(s, "backends"))
        self.assertEqual(len(provider.services), 5)


class GatePorts(DockerPlane):

    async def test_announced_routes_open_only_allowed_ports(self):
        allowed, forbidden = free_ports(2)
        gw, mux = await self.gateway(gate_ports=parse_port_ranges(f"{allowed}"))
        services = [{"gatePort": allowed, "serviceHost": "127.0.0.1", "servicePort": self.echo_port},
                    {"gatePort": forbidden, "serviceHost": "127.0.0.1", "servicePort": self.echo_port}]
        self.start(provider_tap, [
            "--router", SECRET_HEX, "--connect", f"tcp:127.0.0.1:{mux.getHost().port}",
            "--services", json.dumps(services)])
        await self.open_tcp_gate(gw, allowed)
        await eventually(lambda: self.logged(f"ignoring route {forbidden}/tcp"))
        self.assertNotIn((forbidden, "tcp"), gw.gates)
        self.assertEqual(await self.echo_through(allowed), b"pingbye")

    def test_option(self):
        options = gateway_tap.Options()
        options.environ = {"PIPEGATE_GATE_PORTS": "80,443, 1024-65535"}
        options.parseOptions(["--router", SECRET_HEX, "--mux", "tcp:0"])
        self.assertEqual(options["gate-ports"], ((80, 80), (443, 443), (1024, 65535)))
        options = gateway_tap.Options()
        options.environ = {}
        options.parseOptions(["--router", SECRET_HEX, "--mux", "tcp:0"])
        self.assertIsNone(options["gate-ports"])
        for bad in ("22-21", "0", "http", "1-70000"):
            with self.assertRaises(Exception) as e:
                parse_port_ranges(bad)
            self.assertIn(repr(bad), str(e.exception))


class FirstClaim(DockerPlane):
    """L{discover} itself: claims held across refreshes, creation order among newcomers."""

    def test_claims_survive_refreshes_and_beat_names_and_ages(self):
        old = make_container("zz-old", labels={"pipegate.EXPOSE": "80:8080"}, aliases=("old",))
        new = make_container("aa-new", labels={"pipegate.EXPOSE": "81:8080"}, aliases=("new",))
        old[0]["Created"], new[0]["Created"] = 100, 200
        claims: dict = {}
        first, messages = self.discover_with(claims, old, new)
        self.assertEqual([s.service_host for s in first], ["old"])
        self.assertIn("already taken by container zz-old", messages[0])
        # A newer claimant that sorts first by name and by age is still refused: the claim holds.
        new[0]["Created"] = 50
        again, _ = self.discover_with(claims, new, old)
        self.assertEqual([s.service_host for s in again], ["old"])
        # Without the claim, the older container wins.
        fresh, _ = self.discover_with({}, new, old)
        self.assertEqual([s.service_host for s in fresh], ["new"])

    def test_a_recreated_owner_keeps_its_claims(self):
        """
        Issue 17 review: claims followed the container id, so an owner recreated (docker
        compose up: a new id, created later) lost its gate port and alias to an older squatter.
        """
        def owner(created, generation):
            listing, inspect = make_container("zz-owner", labels={"pipegate.EXPOSE": "80:8080"}, aliases=("web",))
            listing["Id"] = inspect["Id"] = f"{generation:064x}"
            listing["Created"] = created
            return listing, inspect
        thief = make_container("aa-thief", labels={"pipegate.EXPOSE": "81:8080"}, aliases=("thief",))
        thief[0]["Created"] = 200
        claims: dict = {}
        first, _ = self.discover_with(claims, owner(100, 1), thief)
        self.assertEqual([(s.service_host, s.service_port) for s in first], [("web", 80)])
        # Recreated: a new id, created after the thief.  The owner keeps port and alias.
        again, messages = self.discover_with(claims, owner(300, 2), thief)
        self.assertEqual([(s.service_host, s.service_port) for s in again], [("web", 80)])
        self.assertTrue(any("already taken by container zz-owner" in m for m in messages), messages)
        # A refresh while the owner is away (between remove and create) hands nothing over...
        away, messages = self.discover_with(claims, thief)
        self.assertEqual(away, [])
        self.assertTrue(any("held for container zz-owner, gone since 1 refresh(es)" in m for m in messages),
                        messages)
        back, _ = self.discover_with(claims, owner(400, 3), thief)
        self.assertEqual([(s.service_host, s.service_port) for s in back], [("web", 80)])
        # ... but an owner gone for good releases them after CLAIM_GRACE_REFRESHES refreshes.
        for _ in range(CLAIM_GRACE_REFRESHES):
            self.assertEqual(self.discover_with(claims, thief)[0], [])
        taken, _ = self.discover_with(claims, thief)
        self.assertEqual([(s.service_host, s.service_port) for s in taken], [("thief", 81)])

    def discover_with(self, claims, *containers):
        messages: list[str] = []
        listings = [listing for listing, _ in containers]
        inspects = {inspect["Id"]: inspect for _, inspect in containers}
        return discover(listings, inspects, NETWORK, messages.append, claims), messages

