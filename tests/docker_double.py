"""
A Docker Engine API double for tests: twisted.web on a UNIX socket, serving the
endpoints PipeGate uses with the JSON shapes of Docker's Engine API reference (the
shapes are checked against a real Podman in tests/test_docker_podman.py).

Unlike Podman in this sandbox, its containers can be "started": C{run(name)} sets the
container running and emits the events Docker emits.  It can also fail on purpose
(C{fail_status}), stall (C{stall}), or be shut down and brought back on the same path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, endpoints, reactor
from twisted.web import resource, server

_ids = itertools.count(1)


def _id(kind: str) -> str:
    return hashlib.sha256(f"{kind}-{next(_ids)}-{os.getpid()}".encode()).hexdigest()


class Container:
    def __init__(self, name: str, image: str, labels: dict, exposed: list[str], networks: dict,
                 cmd: list[str] | None = None, env: list[str] | None = None, hostname: str | None = None) -> None:
        self.id = _id("container")
        self.name = name
        self.image = image
        self.labels = dict(labels)
        self.exposed = list(exposed)
        self.networks = networks  # name -> {"Aliases": [...], "NetworkID": ...}
        self.cmd = cmd or []
        self.env = env or []
        self.hostname = hostname or self.id[:12]
        self.status = "created"
        self.created = int(reactor.seconds())

    def _endpoint(self, name: str, settings: dict, index: int) -> dict:
        return {
            "IPAMConfig": None, "Links": None,
            "Aliases": list(settings.get("Aliases") or []) + [self.id[:12]],
            "NetworkID": settings.get("NetworkID") or name,
            "EndpointID": hashlib.sha256((self.id + name).encode()).hexdigest() if self.status == "running" else "",
            "Gateway": "172.30.0.1" if self.status == "running" else "",
            "IPAddress": f"172.30.0.{index + 2}" if self.status == "running" else "",
            "IPPrefixLen": 16 if self.status == "running" else 0,
            "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0,
            "MacAddress": "", "DriverOpts": None,
        }

    def listing(self) -> dict:
        ports = []
        for text in self.exposed:
            port, _, proto = text.partition("/")
            ports.append({"PrivatePort": int(port), "Type": proto or "tcp"})
        return {
            "Id": self.id, "Names": ["/" + self.name], "Image": self.image, "ImageID": "sha256:" + "0" * 64,
            "Command": " ".join(self.cmd), "Created": self.created, "Ports": ports, "Labels": dict(self.labels),
            "State": self.status, "Status": "Up 1 second" if self.status == "running" else "Created",
            "HostConfig": {"NetworkMode": "bridge"},
            "NetworkSettings": {"Networks": {n: self._endpoint(n, s, i)
                                             for i, (n, s) in enumerate(self.networks.items())}},
            "Mounts": [],
        }

    def inspect(self) -> dict:
        running = self.status == "running"
        return {
            "Id": self.id, "Created": "2026-11-22T03:02:36.61981886Z", "Path": self.cmd[0] if self.cmd else "",
            "Args": self.cmd[1:], "Name": "/" + self.name, "Image": "sha256:" + "0" * 64,
            "State": {"Status": self.status, "Running": running, "Paused": False, "Restarting": False,
                      "OOMKilled": False, "Dead": False, "Pid": 4242 if running else 0, "ExitCode": 0,
                      "Error": "", "StartedAt": "0001-01-01T00:00:00Z", "FinishedAt": "0001-01-01T00:00:00Z"},
            "RestartCount": 0,
            "HostConfig": {"NetworkMode": "bridge", "PortBindings": {p: None for p in self.exposed}},
            "Config": {"Hostname": self.hostname, "Env": list(self.env), "Cmd": list(self.cmd),
                       "Image": self.image, "Labels": dict(self.labels),
                       "ExposedPorts": {p: {} for p in self.exposed}},
            "NetworkSettings": {
                "Ports": {p: None for p in self.exposed},
                "Networks": {n: self._endpoint(n, s, i) for i, (n, s) in enumerate(self.networks.items())},
            },
            "Mounts": [],
        }


class Engine(resource.Resource):
    """The state and the HTTP API of the double."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.containers: dict[str, Container] = {}
        self.networks: dict[str, dict] = {}
        self.images: dict[str, list[str]] = {}  # name -> exposed ports from the image
        self.watchers: list = []  # open /events requests
        self.requests: list[tuple[str, str]] = []
        self.fail_status: int | None = None
        self.stall = False
        self.stalled: list = []
        self.stall_create_answer = False  # create the container, then hold the answer (a create cut short)
        self.start_fails = False
        self.events_status: int | None = None  # answer /events with this error status

    # -- test controls
    def add_image(self, name: str, exposed: list[str]) -> None:
        self.images[name] = exposed

    def add_network(self, name: str) -> dict:
        net = {"Name": name, "Id": _id("network"), "Created": "2026-11-22T03:02:34.181701863Z", "Scope": "local",
               "Driver": "bridge", "EnableIPv6": False,
               "IPAM": {"Driver": "default", "Options": {"driver": "host-local"},
                        "Config": [{"Subnet": "172.30.0.0/16", "Gateway": "172.30.0.1"}]},
               "Internal": False, "Attachable": False, "Ingress": False, "ConfigFrom": {"Network": ""},
               "ConfigOnly": False, "Containers": {}, "Options": {}, "Labels": {}}
        self.networks[name] = net
        return net

    def container(self, name: str, image: str = "app:1", labels: dict | None = None, networks=("pipegate",),
                  aliases=(), exposed: list[str] | None = None) -> Container:
        nets = {n: {"Aliases": list(aliases)} for n in networks}
        c = Container(name, image, labels or {}, exposed if exposed is not None else self.images.get(image, []), nets)
        self.containers[c.id] = c
        self.emit("container", "create", c)
        return c

    def run(self, c: Container) -> None:
        c.status = "running"
        for n in c.networks:
            self.emit("network", "connect", c, network=n)
        self.emit("container", "start", c)

    def stop(self, c: Container) -> None:
        c.status = "exited"
        self.emit("container", "kill", c)
        self.emit("container", "die", c)
        for n in c.networks:
            self.emit("network", "disconnect", c, network=n)
        self.emit("container", "stop", c)

    def emit(self, kind: str, action: str, c: Container, network: str | None = None) -> None:
        actor = {"ID": c.id, "Attributes": {"image": c.image, "name": c.name, **c.labels}}
        if network is not None:
            actor = {"ID": self.networks.get(network, {}).get("Id", network),
                     "Attributes": {"container": c.id, "name": network, "type": "bridge"}}
        event = {"Type": kind, "Action": action, "Actor": actor, "scope": "local",
                 "time": int(reactor.seconds()), "timeNano": int(reactor.seconds() * 1e9)}
        if kind == "container":
            event.update({"status": action, "id": c.id, "from": c.image})
        line = json.dumps(event).encode() + b"\n"
        for request in list(self.watchers):
            if self._wanted(request, event):
                request.write(line)

    def write_raw(self, data: bytes) -> None:
        """Send bytes as they are to every /events watcher (bad lines, huge lines)."""
        for request in list(self.watchers):
            request.write(data)

    def drop_watchers(self) -> None:
        for request in list(self.watchers):
            request.channel.transport.abortConnection()

    @staticmethod
    def _wanted(request, event) -> bool:
        filters = request.pg_filters
        if "type" in filters and event["Type"] not in filters["type"]:
            return False
        if "event" in filters and event["Action"] not in filters["event"]:
            return False
        return True

    # -- HTTP
    def render(self, request):
        path = unquote(urlsplit(request.uri.decode()).path)
        method = request.method.decode()
        self.requests.append((method, path))
        query = {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()}
        if self.stall:
            self.stalled.append(request)
            return server.NOT_DONE_YET
        if self.fail_status is not None:
            return self._json(request, {"message": f"simulated engine failure {self.fail_status}"},
                              self.fail_status)
        parts = [p for p in path.split("/") if p]
        try:
            body = json.loads(request.content.read() or b"null")
        except ValueError:
            return self._json(request, {"message": "invalid JSON"}, 400)
        if parts == ["events"] and method == "GET":
            if self.events_status is not None:
                return self._json(request, {"message": "events are not offered here"}, self.events_status)
            return self._events(request, query)
        if parts == ["containers", "json"] and method == "GET":
            return self._list(request, query)
        if parts == ["containers", "create"] and method == "POST":
            return self._create(request, query, body)
        if len(parts) == 3 and parts[:1] == ["containers"] and parts[2] == "json" and method == "GET":
            c = self._find(parts[1])
            return self._json(request, c.inspect()) if c else self._missing(request, parts[1])
        if len(parts) == 3 and parts[:1] == ["containers"] and parts[2] == "start" and method == "POST":
            c = self._find(parts[1])
            if c is None:
                return self._missing(request, parts[1])
            if self.start_fails:
                return self._json(request, {"message": "crun: cannot start (simulated)"}, 500)
            self.run(c)
            return self._json(request, None, 204)
        if len(parts) == 2 and parts[0] == "containers" and method == "DELETE":
            c = self._find(parts[1])
            if c is None:
                return self._missing(request, parts[1])
            if c.status == "running" and query.get("force") != ["true"]:
                return self._json(request, {"message": "cannot remove a running container"}, 409)
            if c.status == "running":
                self.stop(c)
            del self.containers[c.id]
            self.emit("container", "destroy", c)
            return self._json(request, None, 204)
        if parts == ["networks", "create"] and method == "POST":
            name = (body or {}).get("Name")
            if not name or name in self.networks:
                return self._json(request, {"message": f"network with name {name} already exists"}, 409)
            net = self.add_network(name)
            return self._json(request, {"Id": net["Id"], "Warning": ""}, 201)
        if len(parts) == 2 and parts[0] == "networks" and method == "GET":
            net = self.networks.get(parts[1])
            if net is None:
                return self._json(request, {"message": f"network {parts[1]} not found"}, 404)
            return self._json(request, net)
        return self._json(request, {"message": f"page not found: {method} {path}"}, 404)

    def _find(self, ref: str) -> Container | None:
        for c in self.containers.values():
            if c.id == ref or c.id.startswith(ref) and len(ref) >= 12 or c.name == ref:
                return c
        return None

    def _missing(self, request, ref):
        return self._json(request, {"message": f"No such container: {ref}"}, 404)

    def _json(self, request, value, status: int = 200):
        request.setResponseCode(status)
        if value is None:
            return b""
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value).encode() + b"\n"

    def _filters(self, query) -> dict:
        return json.loads(query["filters"][0]) if "filters" in query else {}

    def _list(self, request, query):
        show_all = query.get("all") in (["true"], ["1"])
        labels = self._filters(query).get("label", [])
        result = []
        for c in sorted(self.containers.values(), key=lambda c: c.created):
            if not show_all and c.status != "running":
                continue
            if not all(self._label_matches(c, f) for f in labels):
                continue
            result.append(c.listing())
        return self._json(request, result)

    @staticmethod
    def _label_matches(c: Container, wanted: str) -> bool:
        key, eq, value = wanted.partition("=")
        return key in c.labels and (not eq or c.labels[key] == value)

    def _create(self, request, query, body):
        name = query.get("name", [None])[0] or _id("name")[:12]
        if any(c.name == name for c in self.containers.values()):
            return self._json(request, {"message": f'Conflict. The container name "/{name}" is already in use'}, 409)
        image = body.get("Image")
        if image not in self.images:
            return self._json(request, {"message": f"No such image: {image}"}, 404)
        endpoints_config = (body.get("NetworkingConfig") or {}).get("EndpointsConfig") or {"bridge": {}}
        for net in endpoints_config:
            if net not in self.networks and net != "bridge":
                return self._json(request, {"message": f"network {net} not found"}, 404)
        exposed = list(self.images[image]) + [p for p in body.get("ExposedPorts") or {} if p not in self.images[image]]
        c = Container(name, image, body.get("Labels") or {}, exposed, {
            n: {"Aliases": list(s.get("Aliases") or []), "NetworkID": s.get("NetworkID")}
            for n, s in endpoints_config.items()}, cmd=body.get("Cmd"), env=body.get("Env"),
            hostname=body.get("Hostname"))
        self.containers[c.id] = c
        self.emit("container", "create", c)
        if self.stall_create_answer:
            self.stalled.append(request)
            return server.NOT_DONE_YET
        return self._json(request, {"Id": c.id, "Warnings": []}, 201)

    def _events(self, request, query):
        request.pg_filters = self._filters(query)
        request.setHeader(b"content-type", b"application/json")
        request.setResponseCode(200)
        request.write(b"")  # send the head now, as Docker does
        self.watchers.append(request)
        request.notifyFinish().addBoth(lambda _: self.watchers.remove(request) if request in self.watchers else None)
        return server.NOT_DONE_YET


class EngineDouble:
    """Owns the double's listening socket; C{down()} and C{up()} stop and restart it on the same path."""

    def __init__(self, testcase, path: str) -> None:
        self.testcase = testcase
        self.path = path
        self.engine = Engine()
        self.port = None
        testcase.addCleanup(self.down)

    @property
    def endpoint(self) -> str:
        return "unix:" + self.path

    async def up(self) -> None:
        site = server.Site(self.engine)
        site.noisy = False
        site.log = lambda request: None
        self.site = site
        self.port = await endpoints.UNIXServerEndpoint(reactor, self.path).listen(site)

    async def down(self) -> None:
        if self.port is None:
            return
        port, self.port = self.port, None
        self.engine.drop_watchers()
        for request in self.engine.stalled:
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.abortConnection()
        self.engine.stalled = []
        await port.stopListening()
        await defer.maybeDeferred(lambda: None)
        if os.path.exists(self.path):
            os.unlink(self.path)
