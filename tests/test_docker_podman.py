"""
Docker mode against a REAL Docker-compatible Engine API: Podman's
C{podman system service}, started by each test on a socket in a temporary directory,
with its own storage (C{--root}, C{--runroot}, vfs) so nothing leaks between tests.

What Podman can do in this sandbox, and so what is tested here: networks (inspect,
create), images made without a registry (C{podman import} of a tiny root file system
with C{EXPOSE 80}), containers created, listed with C{all=true}, inspected and
removed, labels, exposed ports, aliases, the C{/events} stream.  Starting a container
fails here (crun cannot set rlimits / cgroups), so the running-container paths are
tested against the Engine API double (tests/test_docker_engine.py,
tests/test_docker_e2e.py), whose JSON shapes are checked against Podman's below.

Without podman these tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import tempfile

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from pipegate.ports.docker.containers import discover
from pipegate.ports.docker.helperspec import helper_name, secret_free
from pipegate.ports.docker.discovery import DockerDiscovery
from pipegate.ports.docker.helpermanager import HelperManager
from pipegate.ports.docker.loop import ensure_network
from pipegate.ports.engine import EngineClient, EngineError, EventStream
from pipegate.ports.services import Service
from tests.docker_double import EngineDouble
from tests.support import debian_tool, eventually
from tests.test_ports_e2e import PortPlane

DOCKER = ("docker",)
PUBLISHED = ("docker", "published")
IMAGE = "localhost/pipegate-test:1"


def podman_or_skip(testcase) -> str:
    return debian_tool(testcase, "podman")


class _Process(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended = defer.Deferred()
        self.done = False

    def outReceived(self, data):
        self.output = (self.output + data)[-20000:]

    errReceived = outReceived

    def processEnded(self, reason):
        self.done = True
        self.ended.callback(None)


class Podman:
    """One podman system service with private storage; stopped and wiped in cleanup."""

    def __init__(self, testcase) -> None:
        self.testcase = testcase
        self.path = podman_or_skip(testcase)
        self.dir = tempfile.mkdtemp(prefix="pg-podman-")
        self.socket = os.path.join(self.dir, "podman.sock")
        self.storage = ["--root", os.path.join(self.dir, "root"), "--runroot", os.path.join(self.dir, "run"),
                        "--storage-driver", "vfs"]
        self.networks: list[str] = []

    async def start(self) -> EngineClient:
        self.process = _Process()
        args = [self.path, *self.storage, "system", "service", "--time=0", "unix://" + self.socket]
        reactor.spawnProcess(self.process, self.path, args, env=dict(os.environ))
        self.testcase.addCleanup(self.stop)
        self.client = EngineClient(reactor, "unix:" + self.socket, timeout=30)
        waited = 0.0
        while True:
            if self.process.done:
                self.testcase.fail(f"podman system service exited: {self.process.output.decode(errors='replace')}")
            if os.path.exists(self.socket):
                try:
                    await self.client.request("GET", "/version")
                    break
                except EngineError:
                    pass
            if waited > 30:
                self.testcase.fail("podman system service did not answer within 30 s")
            await task.deferLater(reactor, 0.1, lambda: None)
            waited += 0.1
        await self.make_image()
        return self.client

    async def make_image(self) -> None:
        rootfs = os.path.join(self.dir, "rootfs")
        os.makedirs(os.path.join(rootfs, "bin"))
        with open(os.path.join(rootfs, "README"), "w") as f:
            f.write("pipegate test image: created, listed and inspected, never started\n")
        script = (f"tar -C {rootfs} -c . | {self.path} --url unix://{self.socket} import "
                  f"--change 'EXPOSE 80' --change 'CMD [\"/bin/true\"]' - {IMAGE}")
        out, err, code = await getProcessOutputAndValue("/bin/sh", ["-c", script], env=dict(os.environ))
        if code != 0:
            self.testcase.fail(f"podman import failed: {(out + err).decode(errors='replace')}")

    def network_name(self) -> str:
        name = "pgtest-" + secrets.token_hex(4)  # networks are host-wide in podman
        self.networks.append(name)
        return name

    async def stop(self) -> None:
        client = self.client
        try:
            for name in self.networks:
                for entry in await client.containers(all=True):
                    if name in ((entry.get("NetworkSettings") or {}).get("Networks") or {}):
                        await client.remove(entry["Id"])
                try:
                    await client.request("DELETE", f"/networks/{name}")
                except EngineError:
                    pass
        finally:
            await client.close()
            if not self.process.done:
                self.process.transport.signalProcess("TERM")
                killer = reactor.callLater(10, lambda: self.process.done or self.process.transport.signalProcess("KILL"))
                await self.process.ended
                if killer.active():
                    killer.cancel()
            shutil.rmtree(self.dir, ignore_errors=True)

    async def create(self, name: str, network: str, aliases=(), labels=None, image: str = IMAGE) -> str:
        spec = {"Image": image, "Labels": labels or {},
                "NetworkingConfig": {"EndpointsConfig": {network: {"Aliases": list(aliases)}}}}
        created = await self.client.create_container(name, spec)
        return created["Id"]


def as_running(listing: dict, inspect: dict) -> tuple[dict, dict]:
    """Podman's JSON for a created container, with only the state changed to running."""
    listing, inspect = copy.deepcopy(listing), copy.deepcopy(inspect)
    listing["State"] = "running"
    inspect["State"]["Status"] = "running"
    inspect["State"]["Running"] = True
    return listing, inspect


class PodmanDiscoveryTests(unittest.TestCase):
    timeout = 120

    async def setUp(self):
        self.podman = Podman(self)
        self.client = await self.podman.start()
        self.network = self.podman.network_name()
        self.other = self.podman.network_name()

    async def test_network_created_and_done_when_1_on_podman_json(self):
        with self.assertRaises(EngineError) as caught:
            await self.client.network(self.network)
        self.assertEqual(caught.exception.status, 404)
        net = await ensure_network(self.client, self.network)
        self.assertEqual(net["Name"], self.network)
        await ensure_network(self.client, self.other)
        await self.podman.create("web", self.network, ["web.hyper"], {"pipegate.EXPOSE": "9000:19000/udp"})
        await self.podman.create("quiet", self.network, ["quiet.hyper"], {"pipegate.UNEXPOSE": "80"})
        await self.podman.create("skipme", self.network, ["skip.hyper"], {"hypergate.EXCLUDE": "TRUE"})
        await self.podman.create("elsewhere", self.other, ["else.hyper"])

        running = await self.client.containers()
        self.assertEqual(running, [])  # created, never started
        listings = await self.client.containers(all=True)
        self.assertEqual(sorted(e["Names"][0] for e in listings), ["/elsewhere", "/quiet", "/skipme", "/web"])
        inspects = {e["Id"]: await self.client.inspect(e["Id"]) for e in listings}
        # As Podman returns them (not running): nothing is announced.
        self.assertEqual(discover(listings, inspects, self.network), [])
        # The same JSON with only the state set to running.
        pairs = [as_running(e, inspects[e["Id"]]) for e in listings]
        services = discover([p[0] for p in pairs], {p[0]["Id"]: p[1] for p in pairs}, self.network)
        self.assertEqual(services, [
            Service(80, "web.hyper", 80, "tcp", DOCKER),
            Service(19000, "web.hyper", 9000, "udp", PUBLISHED),
        ])

    async def test_discovery_loop_and_events_against_podman(self):
        published: list = []
        discovery = DockerDiscovery(self.client, self.network, 3600.0, published.append, reactor, debounce=0.05)
        discovery.startService()
        self.addCleanup(discovery.stopService)
        await eventually(lambda: published, timeout=30)
        self.assertEqual(published, [[]])
        self.assertEqual((await self.client.network(self.network))["Name"], self.network)  # created
        await eventually(lambda: discovery.events.connected, timeout=30)
        refreshes = discovery.refreshes
        seen: list[dict] = []
        watcher = EventStream(self.client, seen.append, retry=lambda n: 0.1)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        await eventually(lambda: watcher.connected, timeout=30)
        cid = await self.podman.create("web", self.network, ["web.hyper"])
        await self.client.remove(cid)
        # Podman reports the removal as "remove" (Docker: "destroy"); the filter asks for both.
        await eventually(lambda: any(e.get("Action") in ("remove", "destroy") and
                                     (e.get("Actor") or {}).get("ID") == cid for e in seen), timeout=30)
        await eventually(lambda: discovery.refreshes > refreshes, timeout=30)  # the event made it refresh

    async def test_double_matches_podman_shapes(self):
        """The double's listing and inspect JSON use Podman's field names and types where discovery reads them."""
        await ensure_network(self.client, self.network)
        cid = await self.podman.create("web", self.network, ["web.hyper"], {"pipegate.EXPOSE": "9000"})
        real_listing = (await self.client.containers(all=True, filters={"id": [cid]}))[0]
        real_inspect = await self.client.inspect(cid)

        directory = tempfile.mkdtemp(prefix="pg-double-")
        self.addCleanup(shutil.rmtree, directory, True)
        double = EngineDouble(self, os.path.join(directory, "docker.sock"))
        await double.up()
        double.engine.add_image(IMAGE, ["80/tcp"])
        double.engine.add_network(self.network)
        fake = double.engine.container("web", image=IMAGE, labels={"pipegate.EXPOSE": "9000"},
                                       networks=(self.network,), aliases=["web.hyper"])
        fake_listing, fake_inspect = fake.listing(), fake.inspect()

        def shape(value, depth=0):
            if isinstance(value, dict) and depth < 2:
                return {k: shape(v, depth + 1) for k, v in value.items()}
            return type(value).__name__ if value is not None else "null"

        for real, fake_doc, paths in [
            (real_listing, fake_listing, [("Id",), ("Names",), ("State",), ("Labels",), ("Ports",),
                                          ("NetworkSettings", "Networks")]),
            (real_inspect, fake_inspect, [("Id",), ("Name",), ("State", "Status"), ("State", "Running"),
                                          ("State", "Paused"), ("State", "Restarting"), ("Config", "Labels"),
                                          ("Config", "ExposedPorts"), ("NetworkSettings", "Networks")]),
        ]:
            for path in paths:
                r, f = real, fake_doc
                for key in path:
                    self.assertIn(key, r, path)
                    self.assertIn(key, f, path)
                    r, f = r[key], f[key]
                self.assertEqual(type(r), type(f), path)
        real_endpoint = real_inspect["NetworkSettings"]["Networks"][self.network]
        fake_endpoint = fake_inspect["NetworkSettings"]["Networks"][self.network]
        self.assertEqual(set(fake_endpoint), set(real_endpoint))
        self.assertEqual(real_endpoint["Aliases"][0], "web.hyper")
        self.assertEqual(fake_endpoint["Aliases"][0], "web.hyper")
        self.assertEqual(set(shape(fake_inspect["State"])) - set(shape(real_inspect["State"])), set())
        self.assertEqual(real_inspect["Config"]["ExposedPorts"], fake_inspect["Config"]["ExposedPorts"])
        # The same labels and ports give the same services from either source.
        self.assertEqual(discover(*self._one(*as_running(real_listing, real_inspect)), self.network),
                         discover(*self._one(*as_running(fake_listing, fake_inspect)), self.network))

    @staticmethod
    def _one(listing, inspect):
        return [listing], {listing["Id"]: inspect}


class PodmanHelperTests(PortPlane):
    """The gateway's helpers on a real Podman, from routes a real provider announced over a real link."""

    timeout = 120
    SECRET_HEX = bytes(range(32)).hex()

    async def setUp(self):
        super().setUp()
        self.podman = Podman(self)
        self.client = await self.podman.start()
        self.network = self.podman.network_name()

    async def helpers(self) -> dict[str, dict]:
        found = await self.client.containers(
            all=True, filters={"label": [f"pipegate.helper.network={self.network}"]})
        return {e["Names"][0].lstrip("/"): await self.client.inspect(e["Id"]) for e in found}

    def assert_secret_free(self, name: str, inspect: dict) -> None:
        config = inspect["Config"]
        for part in (name, inspect["Name"], config.get("Labels"), config.get("Env"), config.get("Cmd"),
                     config.get("Entrypoint"), config.get("Hostname"), inspect.get("Args"), inspect.get("Path")):
            self.assertTrue(secret_free(part, self.SECRET_HEX), part)

    async def test_lifecycle(self):
        gw, mux = await self.gateway(listen="127.0.0.1")
        prov = self.provider(mux, [Service(13306, "mysql.hyper", 3306, "tcp", DOCKER)])
        await eventually(lambda: (13306, "tcp") in gw.gates)
        manager = HelperManager(self.client, gw, self.network, IMAGE, reactor, target="gw.example",
                                secret=bytes.fromhex(self.SECRET_HEX), period=3600.0, debounce=0.05)
        manager.startService()
        stopped = []
        self.addCleanup(lambda: stopped or manager.stopService())

        # Created, with the alias on the network; starting fails on this sandbox and is reported.
        await eventually(lambda: "mysql.hyper" in manager.helpers, timeout=30)
        helpers = await self.helpers()
        name = helper_name("mysql.hyper")
        self.assertEqual(list(helpers), [name])
        inspect = helpers[name]
        self.assertIn("mysql.hyper", inspect["NetworkSettings"]["Networks"][self.network]["Aliases"])
        self.assertEqual(inspect["Config"]["Labels"]["pipegate.helper"], "mysql.hyper")
        self.assertEqual(inspect["Config"]["Labels"]["pipegate.EXCLUDE"], "true")
        self.assertEqual(inspect["Config"]["Cmd"], ["pipegate", "forward", "--to", "gw.example", "3306/tcp=13306"])
        self.assertEqual(inspect["Config"]["ExposedPorts"], {"3306/tcp": {}, "80/tcp": {}})  # 80: the test image
        self.assert_secret_free(name, inspect)
        # (HostConfig.Sysctls of the spec is accepted by Podman 4.3's create but not shown by its inspect.)
        # The helper is recorded once created; the refused start is logged after the engine answers.
        await eventually(lambda: self.logged(f"docker: helper {name} created but not started"), timeout=30)

        # Routes change: the helper is replaced with the new ports.
        prov.set_services([Service(13306, "mysql.hyper", 3306, "tcp", DOCKER),
                           Service(19000, "mysql.hyper", 9000, "udp", PUBLISHED),
                           Service(18080, "web.hyper", 8080, "tcp", DOCKER)])
        await eventually(lambda: "web.hyper" in manager.helpers, timeout=30)
        helpers = await self.helpers()
        self.assertEqual(sorted(helpers), sorted([name, helper_name("web.hyper")]))
        self.assertEqual(helpers[name]["Config"]["Cmd"][4:], ["3306/tcp=13306", "9000/udp=19000"])
        for helper, inspect in helpers.items():
            self.assert_secret_free(helper, inspect)

        # A host's routes go: its helper goes.
        prov.set_services([Service(18080, "web.hyper", 8080, "tcp", DOCKER)])
        await eventually(lambda: "mysql.hyper" not in manager.helpers, timeout=30)
        self.assertEqual(list(await self.helpers()), [helper_name("web.hyper")])

        # The gateway stops (SIGTERM/SIGINT stop the services): every helper goes.
        stopped.append(True)
        await manager.stopService()
        self.assertEqual(await self.helpers(), {})

    async def test_stale_helpers_removed_on_start(self):
        await ensure_network(self.client, self.network)
        await self.podman.create("pipegate-helper-left-over", self.network, ["left.hyper"],
                                 {"pipegate.helper": "left.hyper", "pipegate.helper.network": self.network})
        await self.podman.create("unrelated", self.network, ["db.hyper"], {"pipegate.helper.network": "x"})
        gw, mux = await self.gateway()
        manager = HelperManager(self.client, gw, self.network, IMAGE, reactor, target="gw.example", period=3600.0)
        manager.startService()
        self.addCleanup(manager.stopService)
        await eventually(lambda: manager.refreshes, timeout=30)
        self.assertEqual(await self.helpers(), {})
        names = [e["Names"][0] for e in await self.client.containers(all=True)]
        self.assertIn("/unrelated", names)
        self.assertTrue(self.logged("removed stale helper pipegate-helper-left-over"))


class PodmanMissingTests(unittest.TestCase):
    """Without podman the tests skip, except under CI=true where they fail."""

    def setUp(self):
        self.patch(shutil, "which", lambda name: None)

    def test_skips_outside_ci(self):
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CI"})
        self.assertRaises(unittest.SkipTest, podman_or_skip, self)

    def test_fails_under_ci(self):
        self.patch(os, "environ", dict(os.environ, CI="true"))
        self.assertRaises(self.failureException, podman_or_skip, self)
