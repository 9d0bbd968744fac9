"""
The Engine API client, the /events stream and the provider's discovery loop against
the Engine API double (tests/docker_double.py) on a real UNIX socket.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile

from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from pipegate.ports.docker.discovery import DockerDiscovery
from pipegate.ports.docker.loop import ensure_network
from pipegate.ports.engine import EVENT_FILTERS, EngineClient, EngineError, EventStream, backoff_delay
from pipegate.ports.services import Service
from tests.docker_double import EngineDouble
from tests.support import eventually

DOCKER = ("docker",)
PUBLISHED = ("docker", "published")


class EngineCase(unittest.TestCase):

    async def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="pg-engine-")
        self.addCleanup(lambda: os.path.isdir(self.dir) and os.rmdir(self.dir))
        self.double = EngineDouble(self, os.path.join(self.dir, "docker.sock"))
        self.engine = self.double.engine
        await self.double.up()
        self.client = EngineClient(reactor, self.double.endpoint, timeout=5)
        self.addCleanup(self.client.close)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, text: str, level: str | None = None) -> int:
        return sum(1 for e in self.events if text in formatEvent(e)
                   and (level is None or e.get("log_level") is not None and e["log_level"].name == level))


class ClientTests(EngineCase):

    async def test_list_and_inspect(self):
        self.engine.add_image("app:1", ["80/tcp"])
        self.engine.add_network("pipegate")
        c = self.engine.container("web", aliases=["web.hyper"])
        self.assertEqual(await self.client.containers(), [])
        listed = await self.client.containers(all=True)
        self.assertEqual([x["Id"] for x in listed], [c.id])
        inspected = await self.client.inspect("web")
        self.assertEqual(inspected["Config"]["ExposedPorts"], {"80/tcp": {}})
        self.assertEqual(inspected["NetworkSettings"]["Networks"]["pipegate"]["Aliases"][0], "web.hyper")

    async def test_filters_are_json(self):
        self.assertEqual(EngineClient.path("/containers/json", {"all": True, "filters": {"label": ["a=b"]}}),
                         "/containers/json?all=true&filters=%7B%22label%22%3A%5B%22a%3Db%22%5D%7D")
        self.engine.add_image("app:1", [])
        self.engine.container("a", labels={"x": "1"})
        self.engine.container("b", labels={"x": "2"})
        found = await self.client.containers(all=True, filters={"label": ["x=2"]})
        self.assertEqual([x["Names"] for x in found], [["/b"]])

    async def test_http_error_carries_status_and_message(self):
        with self.assertRaises(EngineError) as caught:
            await self.client.inspect("nope")
        self.assertEqual(caught.exception.status, 404)
        self.assertEqual(str(caught.exception), "GET /containers/nope/json: HTTP 404: No such container: nope")

    async def test_server_error(self):
        self.engine.fail_status = 500
        with self.assertRaises(EngineError) as caught:
            await self.client.containers()
        self.assertEqual(caught.exception.status, 500)
        self.assertIn("simulated engine failure 500", str(caught.exception))

    async def test_create_and_remove(self):
        self.engine.add_image("app:1", [])
        self.engine.add_network("pipegate")
        created = await self.client.create_container("h1", {"Image": "app:1", "Labels": {"k": "v"}})
        self.assertEqual(len(created["Id"]), 64)
        with self.assertRaises(EngineError) as caught:
            await self.client.create_container("h1", {"Image": "app:1"})
        self.assertEqual(caught.exception.status, 409)
        self.assertIsNone(await self.client.remove("h1"))
        self.assertEqual(self.engine.containers, {})

    async def test_body_bound(self):
        small = EngineClient(reactor, self.double.endpoint, timeout=5, max_body=100)
        self.addCleanup(small.close)
        self.engine.add_image("app:1", [])
        for i in range(5):
            self.engine.container(f"c{i}")
        with self.assertRaises(EngineError) as caught:
            await small.containers(all=True)
        self.assertEqual(str(caught.exception), "GET /containers/json: response body larger than 100 bytes")

    async def test_timeout(self):
        self.engine.stall = True
        quick = EngineClient(reactor, self.double.endpoint, timeout=0.3)
        self.addCleanup(quick.close)
        with self.assertRaises(EngineError) as caught:
            await quick.containers()
        self.assertEqual(str(caught.exception), "GET /containers/json: no answer from the engine within 0.3 s")
        await self.double.down()

    async def test_engine_down(self):
        await self.double.down()
        with self.assertRaises(EngineError) as caught:
            await self.client.containers()
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"GET /containers/json: cannot reach the engine at {self.double.endpoint}: "),
                        message)
        self.assertNotIn("\n", message)

    async def test_missing_socket_says_why(self):
        """A socket path that does not exist: the reason in words, not the bare errno ('...: 2')."""
        missing = EngineClient(reactor, "unix:" + os.path.join(self.dir, "nosuch.sock"), timeout=5)
        self.addCleanup(missing.close)
        with self.assertRaises(EngineError) as caught:
            await missing.containers()
        self.assertTrue(str(caught.exception).endswith(": No such file or directory"), str(caught.exception))

    def test_permission_denied_names_the_fix(self):
        """EACCES on the socket (the process lacks the socket's group), as Twisted's UNIX connector raises it.
        Built by hand: the tests run as root, which no socket mode refuses."""
        from twisted.internet import error
        from pipegate.ports.engine import _reason
        reason = _reason(error.getConnectError((errno.EACCES, os.strerror(errno.EACCES))))
        self.assertEqual(reason, "Permission denied (give the process the socket's group, or run it as root:"
                                 " docs/docker.md §1)")

    async def test_invalid_json(self):
        path = os.path.join(self.dir, "garbage.sock")

        class Garbage(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{oops")
                self.transport.loseConnection()

        port = await endpoints.UNIXServerEndpoint(reactor, path).listen(Factory.forProtocol(Garbage))
        self.addCleanup(port.stopListening)
        client = EngineClient(reactor, "unix:" + path, timeout=5)
        self.addCleanup(client.close)
        with self.assertRaises(EngineError) as caught:
            await client.containers()
        self.assertIn("GET /containers/json: invalid JSON from the engine", str(caught.exception))

    async def test_ensure_network_creates_once(self):
        net = await ensure_network(self.client, "pipegate")
        self.assertEqual(net["Name"], "pipegate")
        again = await ensure_network(self.client, "pipegate")
        self.assertEqual(again["Id"], net["Id"])
        self.assertEqual([r for r in self.engine.requests if r[0] == "POST"], [("POST", "/networks/create")])


class EventTests(EngineCase):

    def stream(self, **kwargs) -> tuple[EventStream, list, list]:
        seen: list[dict] = []
        opened: list[int] = []
        stream = EventStream(self.client, seen.append, lambda: opened.append(1), retry=lambda n: 0.05, **kwargs)
        stream.startService()
        self.addCleanup(stream.stopService)
        return stream, seen, opened

    async def test_events_are_filtered_and_parsed(self):
        stream, seen, opened = self.stream()
        await eventually(lambda: opened)
        self.assertEqual(json.loads(self.engine.watchers[0].pg_filters and json.dumps(self.engine.watchers[0].pg_filters)),
                         EVENT_FILTERS)
        self.engine.add_image("app:1", [])
        c = self.engine.container("web")  # "create" is not asked for
        self.engine.run(c)
        await eventually(lambda: len(seen) >= 2)
        self.assertEqual([(e["Type"], e["Action"]) for e in seen], [("network", "connect"), ("container", "start")])

    async def test_bad_line_is_skipped(self):
        stream, seen, opened = self.stream()
        await eventually(lambda: opened)
        self.engine.write_raw(b"not json\n[1,2]\n" + json.dumps({"Type": "container", "Action": "start"}).encode() + b"\n")
        await eventually(lambda: seen)
        self.assertEqual(seen, [{"Type": "container", "Action": "start"}])
        self.assertEqual(stream.bad_lines, 2)
        self.assertEqual(len(opened), 1)

    async def test_line_bound_reconnects(self):
        stream, seen, opened = self.stream(max_line=1000)
        await eventually(lambda: opened)
        self.engine.write_raw(b"x" * 5000)
        await eventually(lambda: len(opened) == 2)
        self.assertEqual(self.logged("a line longer than 1000 bytes"), 1)
        self.engine.write_raw(json.dumps({"Type": "container", "Action": "die"}).encode() + b"\n")
        await eventually(lambda: seen)

    async def test_engine_down_and_back(self):
        stream, seen, opened = self.stream()
        await eventually(lambda: opened)
        await self.double.down()
        await eventually(lambda: stream.attempt >= 3)  # retried, quietly
        self.assertEqual(self.logged("ended; reopening", "info"), 1)
        self.assertEqual(self.logged("cannot reach the engine"), 0)  # the refresh loop reports outages
        await self.double.up()
        await eventually(lambda: len(opened) == 2)
        self.assertEqual(stream.attempt, 0)
        self.assertTrue(self.logged("open again"))

    async def test_engine_down_from_the_start_is_one_line(self):
        """Engine unreachable when Docker mode starts: the refresh loop's line is the one error line
        (docs/docker.md §5); the stream retries without a second 'cannot reach the engine' line."""
        await self.double.down()
        stream, seen, opened = self.stream()
        await eventually(lambda: stream.attempt >= 2)
        self.assertEqual(self.logged("cannot reach the engine"), 0)
        await self.double.up()
        await eventually(lambda: opened)

    async def test_events_refused_from_the_start_is_logged(self):
        """An engine that answers but refuses /events: the stream's own error line is the only signal."""
        self.engine.events_status = 404
        stream, seen, opened = self.stream()
        await eventually(lambda: self.logged("docker: event stream: GET /events: HTTP 404", "error"))

    def test_backoff(self):
        delays = [backoff_delay(n) for n in range(1, 12)]
        self.assertTrue(0.5 <= delays[0] <= 1.0)
        self.assertTrue(all(d <= 60 for d in delays))
        self.assertTrue(30 <= delays[-1] <= 60)


class DiscoveryTests(EngineCase):
    """The provider side: DockerDiscovery publishes what discover() finds, on a real socket."""

    async def setUp(self):
        await super().setUp()
        self.engine.add_image("app:1", ["80/tcp"])
        self.published: list[list[Service]] = []

    def discovery(self, period: float = 3600.0, events: bool = True) -> DockerDiscovery:
        d = DockerDiscovery(self.client, "pipegate", period, self.published.append, reactor, debounce=0.05,
                            events=events)
        d.startService()
        self.addCleanup(d.stopService)
        return d

    def last(self) -> list[Service] | None:
        return self.published[-1] if self.published else None

    async def test_done_when_1(self):
        """EXPOSE 80 + EXPOSE label; UNEXPOSE; EXCLUDE; off the network."""
        self.engine.add_network("pipegate")
        self.engine.add_network("other")
        for name, labels, networks in [
            ("web", {"pipegate.EXPOSE": "9000:19000/udp"}, ("pipegate",)),
            ("quiet", {"pipegate.UNEXPOSE": "80"}, ("pipegate",)),
            ("skipme", {"pipegate.EXCLUDE": "true"}, ("pipegate",)),
            ("elsewhere", {}, ("other",)),
        ]:
            self.engine.run(self.engine.container(name, labels=labels, networks=networks, aliases=[f"{name}.hyper"]))
        old = self.engine.container("old", labels={"hypergate.EXPOSE": "5000"}, aliases=["old.hyper"], exposed=[])
        self.engine.run(old)
        self.discovery()
        await eventually(lambda: self.published)
        self.assertEqual(self.last(), [
            Service(5000, "old.hyper", 5000, "tcp", DOCKER),
            Service(80, "web.hyper", 80, "tcp", DOCKER),
            Service(19000, "web.hyper", 9000, "udp", PUBLISHED),
        ])

    async def test_network_is_created(self):
        self.discovery()
        await eventually(lambda: self.published)
        self.assertIn("pipegate", self.engine.networks)
        self.assertEqual(self.last(), [])

    async def test_events_trigger_a_refresh_and_stop_withdraws(self):
        self.engine.add_network("pipegate")
        d = self.discovery(period=3600.0)  # only events can make it refresh again
        await eventually(lambda: self.published)
        await eventually(lambda: d.events.connected)
        c = self.engine.container("web", aliases=["web.hyper"])
        self.engine.run(c)
        await eventually(lambda: self.last() == [Service(80, "web.hyper", 80, "tcp", DOCKER)])
        self.engine.stop(c)
        await eventually(lambda: self.last() == [])
        self.assertEqual(len(self.published), 3)  # debounced: one publish per change

    async def test_period_without_events(self):
        self.engine.add_network("pipegate")
        self.discovery(period=0.2, events=False)
        await eventually(lambda: self.published)
        self.engine.run(self.engine.container("web", aliases=["web.hyper"]))
        await eventually(lambda: self.last() == [Service(80, "web.hyper", 80, "tcp", DOCKER)])

    async def test_engine_errors_then_recovery(self):
        self.engine.add_network("pipegate")
        self.engine.run(self.engine.container("web", aliases=["web.hyper"]))
        d = self.discovery(period=0.1, events=False)
        await eventually(lambda: self.published)
        self.engine.fail_status = 500
        before = d.refreshes
        await task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(d.refreshes, before)
        self.assertEqual(self.logged("simulated engine failure 500", "error"), 1)  # once, not every period
        self.assertEqual(self.last(), [Service(80, "web.hyper", 80, "tcp", DOCKER)])  # kept as last seen
        self.engine.fail_status = None
        await self.double.down()
        await task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.logged("cannot reach the engine", "error"), 0)  # same outage: no new error
        await self.double.up()
        self.engine.run(self.engine.container("db", aliases=["db.hyper"], exposed=["3306/tcp"]))
        await eventually(lambda: len(self.last()) == 2)
        self.assertEqual(self.logged("the engine answers again"), 1)

    async def test_invalid_label_reported_once(self):
        self.engine.add_network("pipegate")
        self.engine.run(self.engine.container("bad", labels={"pipegate.EXPOSE": "http"}))
        d = self.discovery(period=0.05, events=False)
        await eventually(lambda: d.refreshes >= 4)
        self.assertEqual(self.last(), [])
        self.assertEqual(self.logged("container bad: label pipegate.EXPOSE: bad item 'http'"), 1)

    async def test_stop_cancels_everything(self):
        self.engine.stall = True
        d = self.discovery()
        await eventually(lambda: self.engine.stalled)
        await defer.maybeDeferred(d.stopService)
        self.assertFalse(d.running)
        await self.double.down()
