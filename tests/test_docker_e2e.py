"""
Docker mode end to end: a provider and a gateway built by their tap modules'
C{makeService} (so the option wiring is what runs), joined by a real TLS mux link,
against the Engine API double on a real UNIX socket; real backends, real clients
through the gates.  Containers that "run" in the double make gates open and close.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile

from twisted.internet import reactor, task

from pipegate.ports import forward
from pipegate.ports.docker.helperspec import helper_name, secret_free
from pipegate.tap import gateway as gateway_tap
from pipegate.tap import provider as provider_tap
from tests.docker_double import EngineDouble
from tests.support import eventually, free_port
from pipegate.ports.services import Service
from tests.test_ports_e2e import SECRET, PortPlane, UDPEcho
from tests.test_processes import TWISTD, child_env, spawn

SECRET_HEX = SECRET.hex()


class DockerPlane(PortPlane):
    timeout = 60

    async def setUp(self):
        super().setUp()
        directory = tempfile.mkdtemp(prefix="pg-docker-e2e-")
        self.cleanups.insert(0, lambda: shutil.rmtree(directory, True))
        self.double = EngineDouble(self, os.path.join(directory, "docker.sock"))
        self.cleanups.append(self.double.down)
        self.engine = self.double.engine
        await self.double.up()
        self.engine.add_image("app:1", [])
        self.engine.add_image("pipegate", [])
        self.echo = await self.backend_echo()
        self.echo_port = self.echo.getHost().port

    def start(self, tap, argv: list[str]):
        options = tap.Options()
        options.environ = {}
        options.parseOptions(argv)
        top = tap.makeService(options, reactor)
        top.startService()
        self.cleanups.append(top.stopService)
        return top

    def provider_service(self, mux, static: list[dict], refresh: float = 3600.0):
        return self.start(provider_tap, [
            "--router", SECRET_HEX, "--connect", f"tcp:127.0.0.1:{mux.getHost().port}",
            "--ping-interval", "0.5", "--ping-deadline", "2",
            "--services", json.dumps(static), "--docker", self.double.endpoint, "--refresh", str(refresh)])

    def run_container(self, name: str, gate: int, **kwargs):
        c = self.engine.container(name, image="app:1", aliases=["localhost"],
                                  labels={"pipegate.EXPOSE": f"{self.echo_port}:{gate}"}, **kwargs)
        self.engine.run(c)
        return c


class ProviderDockerTests(DockerPlane):

    async def setUp(self):
        await super().setUp()
        self.gw, self.mux = await self.gateway()
        self.static_gate = free_port()
        self.static = [{"gatePort": self.static_gate, "serviceHost": "127.0.0.1", "servicePort": self.echo_port}]

    async def test_container_opens_and_closes_a_gate_via_events(self):
        self.provider_service(self.mux, self.static)  # refresh every hour: only events can be this quick
        await self.open_tcp_gate(self.gw, self.static_gate)
        gate = free_port()
        c = self.run_container("web", gate)
        await self.open_tcp_gate(self.gw, gate)
        self.assertEqual(await self.echo_through(gate), b"pingbye")
        self.engine.stop(c)
        await eventually(lambda: (gate, "tcp") not in self.gw.gates)
        self.assertIn((self.static_gate, "tcp"), self.gw.gates)
        self.assertEqual(await self.echo_through(self.static_gate), b"pingbye")

    async def test_within_the_refresh_period_without_events(self):
        self.engine.events_status = 404  # an engine without /events: the period alone must do
        self.provider_service(self.mux, self.static, refresh=0.3)
        await self.open_tcp_gate(self.gw, self.static_gate)
        gate = free_port()
        c = self.run_container("web", gate)
        await self.open_tcp_gate(self.gw, gate)
        self.engine.stop(c)
        await eventually(lambda: (gate, "tcp") not in self.gw.gates)
        self.assertIn((self.static_gate, "tcp"), self.gw.gates)  # survived every refresh

    async def test_engine_down_file_services_keep_working(self):
        self.provider_service(self.mux, self.static, refresh=0.2)
        await self.open_tcp_gate(self.gw, self.static_gate)
        gate = free_port()
        self.run_container("web", gate)
        await self.open_tcp_gate(self.gw, gate)
        await self.double.down()
        await eventually(lambda: self.logged("cannot reach the engine"))
        await task.deferLater(reactor, 0.6, lambda: None)  # several failed refreshes
        errors = [e for e in self.events if "cannot reach the engine" in str(e.get("error", ""))]
        self.assertEqual(len(errors), 1, errors)
        self.assertEqual(await self.echo_through(self.static_gate), b"pingbye")
        self.assertIn((gate, "tcp"), self.gw.gates)  # last seen Docker services stay announced
        await self.double.up()
        gate2 = free_port()
        self.run_container("db", gate2)
        await self.open_tcp_gate(self.gw, gate2)
        self.assertTrue(self.logged("the engine answers again"))
        self.assertEqual(await self.echo_through(gate2), b"pingbye")

    async def test_engine_errors(self):
        self.engine.fail_status = 500
        self.provider_service(self.mux, self.static, refresh=0.2)
        await self.open_tcp_gate(self.gw, self.static_gate)
        await eventually(lambda: self.logged("simulated engine failure 500"))
        self.engine.fail_status = None
        gate = free_port()
        self.run_container("web", gate)
        await self.open_tcp_gate(self.gw, gate)


class GatewayHelperTests(DockerPlane):

    def gateway_service(self, mux_port: int):
        top = self.start(gateway_tap, [
            "--router", SECRET_HEX, "--mux", f"tcp:{mux_port}:interface=127.0.0.1",
            "--ping-interval", "0.5", "--ping-deadline", "2",
            "--docker", self.double.endpoint, "--network", "pipegate", "--image", "pipegate",
            "--helper-target", "127.0.0.1"])
        (gw,) = [s for s in top if type(s).__name__ == "Gateway"]
        (helpers,) = [s for s in top if type(s).__name__ == "HelperManager"]
        return top, gw, helpers

    async def test_helper_lifecycle_and_forwarding(self):
        mux_port = free_port()
        top, gw, helpers = self.gateway_service(mux_port)
        gate = free_port()
        prov = self.provider(_Port(mux_port), [])
        prov.set_services([Service(gate, "echo.hyper", 7, "tcp", ("docker",))])
        await eventually(lambda: "echo.hyper" in helpers.helpers)
        (helper,) = [c for c in self.engine.containers.values() if c.name == helper_name("echo.hyper")]
        await eventually(lambda: helper.status == "running")  # the double can start containers
        self.assertEqual(helper.networks["pipegate"]["Aliases"], ["echo.hyper"])
        self.assertEqual(helper.cmd, ["pipegate", "forward", "--to", "127.0.0.1", f"7/tcp={gate}"])
        for part in (helper.name, helper.labels, helper.env, helper.cmd, helper.hostname):
            self.assertTrue(secret_free(part, SECRET_HEX), part)

        # The helper's program, run here on loopback, reaches the service through the gate.
        self.assertEqual(prov.services[0].service_host, "echo.hyper")
        prov.set_services([Service(gate, "localhost", self.echo_port, "tcp", ("docker",)),
                           Service(free_port(), "echo.hyper", 7, "tcp", ("docker",))])
        await self.open_tcp_gate(gw, gate)
        spec = [f"{free_port()}/tcp={gate}"]
        ports = await forward.start(reactor, "127.0.0.1", [forward.parse_forward(s) for s in spec], "127.0.0.1")
        for p in ports:
            self.cleanups.append(p.stopListening)
        self.assertEqual(await self.echo_through(ports[0].getHost().port), b"pingbye")

        # Updated when its routes change, removed when they go.
        await eventually(lambda: [c.cmd[4:] for c in self.engine.containers.values()
                                  if c.name == helper_name("echo.hyper")] != [[f"7/tcp={gate}"]])
        prov.set_services([])
        await eventually(lambda: not helpers.helpers and not self.engine.containers)

        # And all removed when the gateway stops.
        prov.set_services([Service(gate, "a.hyper", 1, "tcp"), Service(free_port(), "b.hyper", 2, "udp")])
        await eventually(lambda: len(helpers.helpers) == 2)
        self.assertEqual(len(self.engine.containers), 2)
        await top.stopService()
        self.assertEqual(self.engine.containers, {})

    async def test_exposure_filters_and_addresses(self):
        mux_port = free_port()
        top = self.start(gateway_tap, [
            "--router", SECRET_HEX, "--mux", f"tcp:{mux_port}:interface=127.0.0.1",
            "--docker", self.double.endpoint, "--expose-only-published"])
        (helpers,) = [s for s in top if type(s).__name__ == "HelperManager"]
        prov = self.provider(_Port(mux_port), [
            Service(free_port(), "hidden.hyper", 80, "tcp", ("docker",)),
            Service(free_port(), "shown.hyper", 80, "tcp", ("docker", "published")),
            Service(free_port(), "127.0.0.1", 81, "tcp", ("published",)),
            Service(free_port(), "localhost", 82, "tcp", ("published",)),
        ])
        self.assertTrue(prov)
        await eventually(lambda: helpers.helpers)
        self.assertEqual(list(helpers.helpers), ["shown.hyper"])
        (helper,) = self.engine.containers.values()
        self.assertEqual(helper.cmd[3], "172.30.0.1")  # the network's gateway address by default
        self.assertTrue(self.logged("which helper containers cannot reach"))  # --listen 127.0.0.1

    async def test_start_failure_is_reported_and_helper_still_removed(self):
        self.engine.start_fails = True
        mux_port = free_port()
        top, gw, helpers = self.gateway_service(mux_port)
        self.provider(_Port(mux_port), [Service(free_port(), "db.hyper", 5432, "tcp")])
        await eventually(lambda: helpers.helpers)
        await eventually(lambda: self.logged("created but not started"))
        await top.stopService()
        self.assertEqual(self.engine.containers, {})


class _Port:
    """What PortPlane.provider needs of a listening port: its number."""

    def __init__(self, port: int) -> None:
        self.port = port

    def getHost(self):
        return self

    @property
    def host(self):
        return "127.0.0.1"


class ForwardTests(DockerPlane):

    def test_parse(self):
        self.assertEqual(forward.parse_forward("3306/TCP=13306"), forward.Forward(3306, "tcp", 13306))
        for bad in ("3306", "3306/sctp=1", "0/tcp=1", "1/tcp=70000", "a/tcp=1", ""):
            self.assertRaises(ValueError, forward.parse_forward, bad)

    async def test_udp(self):
        echo = UDPEcho()
        echo_port = reactor.listenUDP(0, echo, interface="127.0.0.1")
        self.cleanups.append(echo_port.stopListening)
        ports = await forward.start(reactor, "127.0.0.1",
                                    [forward.Forward(free_port(socket.SOCK_DGRAM), "udp", echo_port.getHost().port)],
                                    "127.0.0.1", idle_timeout=0.3)
        (port,) = ports
        self.cleanups.append(port.stopListening)
        self.cleanups.append(port.forwarder.stop)
        client = await self.udp_client()
        client.transport.write(b"one", ("127.0.0.1", port.getHost().port))
        await eventually(lambda: client.received == [b"one"])
        self.assertEqual(len(port.forwarder.flows), 1)
        await eventually(lambda: not port.forwarder.flows)  # idle flows are closed
        client.transport.write(b"two", ("127.0.0.1", port.getHost().port))
        await eventually(lambda: client.received == [b"one", b"two"])

    def test_main_rejects_bad_arguments(self):
        self.assertEqual(forward.main("gw", ["nonsense"]), 2)
        self.assertEqual(forward.main("gw", []), 2)



class Processes(DockerPlane):
    """twistd pipegate-provider / pipegate-gateway --docker as real processes; SIGTERM and SIGINT remove helpers."""

    async def test_sigterm(self):
        """A provider process discovers through DOCKER_HOST; the gateway process's helpers go on SIGTERM."""
        mux, gate = free_port(), free_port()
        gateway = spawn(self, TWISTD + [
            "-n", "--pidfile=", "pipegate-gateway", "--mux", f"tcp:{mux}:interface=127.0.0.1",
            "--docker", self.double.endpoint, "--helper-target", "127.0.0.1"], child_env(PIPEGATE_ROUTER=SECRET_HEX))
        provider = spawn(self, TWISTD + [
            "-n", "--pidfile=", "pipegate-provider", "--connect", f"tcp:127.0.0.1:{mux}", "--docker",
            "--services", json.dumps([{"gatePort": free_port(), "serviceHost": "files.hyper", "servicePort": 1}])],
            child_env(PIPEGATE_ROUTER=SECRET_HEX, DOCKER_HOST="unix://" + self.double.path))
        self.engine.add_network("pipegate")
        self.engine.run(self.engine.container("db", image="app:1", aliases=["db.hyper"],
                                              labels={"pipegate.EXPOSE": f"5432:{gate}"}))
        await eventually(lambda: b"gate %d/tcp open" % gate in gateway.output, timeout=30)
        helpers = {helper_name("db.hyper"), helper_name("files.hyper")}
        await eventually(lambda: {c.name for c in self.engine.containers.values() if c.status == "running"}
                         == helpers | {"db"}, timeout=30)
        gateway.transport.signalProcess(signal.SIGTERM)
        await gateway.ended
        self.assertEqual({c.name for c in self.engine.containers.values()}, {"db"})
        provider.transport.signalProcess(signal.SIGTERM)
        await provider.ended
        for process in (gateway, provider):
            self.assertIn(b"Main loop terminated", process.output)
            self.assertNotIn(b"Traceback", process.output)
            self.assertNotIn(SECRET_HEX.encode(), process.output)

    async def test_sigint(self):
        mux = free_port()
        gateway = spawn(self, TWISTD + [
            "-n", "--pidfile=", "pipegate-gateway", "--mux", f"tcp:{mux}:interface=127.0.0.1",
            "--docker", self.double.endpoint, "--helper-target", "127.0.0.1"], child_env(PIPEGATE_ROUTER=SECRET_HEX))
        self.provider(_Port(mux), [Service(free_port(), "cache.hyper", 6379, "tcp")])
        # Wait for the gateway to record the helper (its log line), not for the engine to hold it: a stop
        # between the two sweeps the helper as a stale one, and "gateway stopping" is never said.
        recorded = b"docker: helper %s for cache.hyper" % helper_name("cache.hyper").encode()
        await eventually(lambda: recorded in gateway.output, timeout=30)
        gateway.transport.signalProcess(signal.SIGINT)
        await gateway.ended
        self.assertEqual(self.engine.containers, {})
        self.assertIn(b"gateway stopping", gateway.output)
        self.assertNotIn(b"Traceback", gateway.output)


class HelperRepairTests(DockerPlane):

    async def test_stop_during_first_create_leaves_no_helper(self):
        """A stop while the first refresh's create is unanswered still sweeps the helper it made."""
        from pipegate.ports.docker.helpermanager import HelperManager
        from pipegate.ports.engine import EngineClient

        gw, mux = await self.gateway()
        self.provider(mux, [Service(free_port(), "db.hyper", 5432, "tcp")])
        await eventually(lambda: gw.routes)
        self.engine.stall_create_answer = True
        client = EngineClient(reactor, self.double.endpoint)
        self.cleanups.append(client.close)
        manager = HelperManager(client, gw, "pipegate", "pipegate", reactor, target="gw", period=3600.0)
        manager.startService()
        await eventually(lambda: self.engine.stalled)
        self.assertEqual({c.name for c in self.engine.containers.values()}, {helper_name("db.hyper")})
        self.assertIsNone(manager.healthy)  # the first refresh has not finished
        self.engine.stall_create_answer = False
        await manager.stopService()
        self.assertEqual(self.engine.containers, {})

    async def test_removed_helper_comes_back_and_network_is_recreated(self):
        from pipegate.ports.docker.helpermanager import HelperManager
        from pipegate.ports.engine import EngineClient

        gw, mux = await self.gateway()
        self.provider(mux, [Service(free_port(), "db.hyper", 5432, "tcp")])
        client = EngineClient(reactor, self.double.endpoint)
        self.cleanups.append(client.close)
        manager = HelperManager(client, gw, "pipegate", "pipegate", reactor, target="gw", period=0.2, debounce=0.05)
        manager.startService()
        self.cleanups.append(manager.stopService)
        name = helper_name("db.hyper")
        await eventually(lambda: name in {c.name for c in self.engine.containers.values()})
        # Someone removes the helper, then the network itself.
        (helper,) = self.engine.containers.values()
        del self.engine.containers[helper.id]
        await eventually(lambda: self.logged(f"helper {name} has disappeared"))
        await eventually(lambda: name in {c.name for c in self.engine.containers.values()})
        old_id = self.engine.networks["pipegate"]["Id"]
        for c in list(self.engine.containers.values()):
            del self.engine.containers[c.id]
        del self.engine.networks["pipegate"]
        await eventually(lambda: name in {c.name for c in self.engine.containers.values()})
        self.assertNotEqual(self.engine.networks["pipegate"]["Id"], old_id)
        (helper,) = self.engine.containers.values()
        self.assertEqual(helper.networks["pipegate"]["NetworkID"], self.engine.networks["pipegate"]["Id"])
