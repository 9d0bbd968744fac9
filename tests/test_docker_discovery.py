"""
Tests for the pure modules of L{pipegate.ports.docker}: Docker discovery over Engine API
JSON (C{containers}, no engine), label parsing (C{labels}), merging with static services,
helper container specs (C{helperspec}) and the Docker host address (C{host}).

The fixtures follow the field names of Docker's Engine API reference for
C{GET /containers/json} entries and C{GET /containers/{id}/json} results.
"""

from __future__ import annotations

import hashlib
import json

from twisted.internet.endpoints import UNIXClientEndpoint, clientFromString
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from pipegate.ports.docker.containers import (
    container_name,
    container_services,
    discover,
    merge_with_static,
    wants_inspect,
)
from pipegate.ports.docker.helperspec import helper_name, helper_spec, secret_free
from pipegate.ports.docker.host import DEFAULT_DOCKER_ENDPOINT, parse_docker_host
from pipegate.ports.docker.labels import (
    LABEL_PREFIXES,
    DockerLabelError,
    UnexposeSpec,
    parse_expose_label,
    parse_unexpose_label,
)
from pipegate.ports.services import Service

NETWORK = "pipegate"
NETWORK_ID = "7d86d31b1478e7cca9ebed7e73aa0fdeec46c5ca29497431d3007d2d9e15ed99"
OTHER_NETWORK = "bridge"
OTHER_NETWORK_ID = "f2de39df4171b0dc801e8002d1d999b77256983dfc63041c0f34030aa3977566"
SECRET = "4f1c2b7e9a0d3c5e8b6a7f1e2d3c4b5a6978e0f1a2b3c4d5e6f708192a3b4c5d"

DOCKER = ("docker",)
PUBLISHED = ("docker", "published")


def _endpoint(network: str, network_id: str, cid: str, aliases: list[str] | None, index: int) -> dict:
    """One C{NetworkSettings.Networks} value (EndpointSettings)."""
    return {
        "IPAMConfig": None,
        "Links": None,
        "Aliases": aliases,
        "MacAddress": f"02:42:ac:12:00:{index:02x}",
        "DriverOpts": None,
        "NetworkID": network_id,
        "EndpointID": hashlib.sha256(("endpoint" + cid + network).encode()).hexdigest(),
        "Gateway": "172.18.0.1",
        "IPAddress": f"172.18.0.{index}",
        "IPPrefixLen": 16,
        "IPv6Gateway": "",
        "GlobalIPv6Address": "",
        "GlobalIPv6PrefixLen": 0,
        "DNSNames": None,
    }


def make_container(
    name: str,
    *,
    exposed: tuple[str, ...] = (),
    published: tuple[tuple[int, int, str], ...] = (),
    labels: dict[str, str] | None = None,
    networks: tuple[str, ...] = (NETWORK,),
    aliases: tuple[str, ...] = (),
    state: str = "running",
    list_unpublished: bool = True,
    index: int = 2,
) -> tuple[dict, dict]:
    """
    C{(listing, inspect)} of one container as the Engine returns them.

    C{exposed}: the image's C{EXPOSE} (C{"80/tcp"}); C{published}: C{-p} bindings as
    C{(private, public, proto)} (listed twice, for 0.0.0.0 and ::, as Docker does);
    C{aliases}: C{--network-alias} values, followed by the short id as older engines
    add it.  With C{list_unpublished=False} the listing's C{Ports} holds only published
    ports (as some compatible engines return it).
    """
    cid = hashlib.sha256(name.encode()).hexdigest()
    short = cid[:12]
    labels = dict(labels or {})
    running = state == "running"

    list_ports: list[dict] = []
    inspect_ports: dict[str, list[dict] | None] = {}
    exposed_ports: dict[str, dict] = {key: {} for key in exposed}
    for private, public, proto in published:
        exposed_ports[f"{private}/{proto}"] = {}
    if running:
        for key in exposed:
            port, proto = key.split("/")
            if list_unpublished and not any(p == int(port) and t == proto for p, _, t in published):
                list_ports.append({"PrivatePort": int(port), "Type": proto})
            inspect_ports.setdefault(key, None)
        for private, public, proto in published:
            for ip in ("0.0.0.0", "::"):
                list_ports.append({"IP": ip, "PrivatePort": private, "PublicPort": public, "Type": proto})
            inspect_ports[f"{private}/{proto}"] = [
                {"HostIp": "0.0.0.0", "HostPort": str(public)},
                {"HostIp": "::", "HostPort": str(public)},
            ]

    ids = {NETWORK: NETWORK_ID, OTHER_NETWORK: OTHER_NETWORK_ID}
    endpoints = {
        net: _endpoint(net, ids.get(net, hashlib.sha256(net.encode()).hexdigest()), cid,
                       list(aliases) + [short] if net != OTHER_NETWORK else None, index)
        for net in networks
    }
    status = {"running": "Up 3 minutes", "exited": "Exited (0) 2 minutes ago",
              "paused": "Up 3 minutes (Paused)", "created": "Created"}[state]
    listing = {
        "Id": cid,
        "Names": [f"/{name}"],
        "Image": "example/web:1.0",
        "ImageID": "sha256:" + hashlib.sha256(b"image").hexdigest(),
        "Command": "/docker-entrypoint.sh nginx -g 'daemon off;'",
        "Created": 1763715600,
        "Ports": list_ports,
        "Labels": labels,
        "State": state,
        "Status": status,
        "HostConfig": {"NetworkMode": networks[0] if networks else "none"},
        "NetworkSettings": {"Networks": json.loads(json.dumps(endpoints))},
        "Mounts": [],
    }
    inspect = {
        "Id": cid,
        "Created": "2026-11-21T09:00:00.000000000Z",
        "Path": "/docker-entrypoint.sh",
        "Args": ["nginx", "-g", "daemon off;"],
        "State": {
            "Status": state,
            "Running": state in ("running", "paused"),
            "Paused": state == "paused",
            "Restarting": False,
            "OOMKilled": False,
            "Dead": False,
            "Pid": 4242 if state in ("running", "paused") else 0,
            "ExitCode": 0,
            "Error": "",
            "StartedAt": "2026-11-21T09:00:01.000000000Z",
            "FinishedAt": "0001-01-01T00:00:00Z",
        },
        "Image": listing["ImageID"],
        "Name": f"/{name}",
        "RestartCount": 0,
        "Config": {
            "Hostname": short,
            "Domainname": "",
            "User": "",
            "ExposedPorts": exposed_ports or None,
            "Tty": False,
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["nginx", "-g", "daemon off;"],
            "Image": "example/web:1.0",
            "Labels": labels,
        },
        "NetworkSettings": {
            "Bridge": "",
            "SandboxID": hashlib.sha256(("sandbox" + cid).encode()).hexdigest(),
            "Ports": inspect_ports,
            "SandboxKey": f"/var/run/docker/netns/{short}",
            "Networks": endpoints,
        },
    }
    return listing, inspect


def services_of(name: str, network: str = NETWORK, **kwargs: object) -> list[Service]:
    return container_services(*make_container(name, **kwargs), network)  # type: ignore[arg-type]


def run_discover(*containers: tuple[dict, dict], network: str = NETWORK) -> tuple[list[Service], list[str]]:
    messages: list[str] = []
    listings = [listing for listing, _ in containers]
    inspects = {inspect["Id"]: inspect for _, inspect in containers}
    return discover(listings, inspects, network, messages.append), messages


class ExposeLabelTests(unittest.TestCase):

    def test_items(self) -> None:
        self.assertEqual(
            parse_expose_label("9000:19000/udp, 80,8443:443/TCP , 53/Udp,"),
            [(9000, 19000, "udp"), (80, None, "tcp"), (8443, 443, "tcp"), (53, None, "udp")],
        )

    def test_empty(self) -> None:
        self.assertEqual(parse_expose_label(""), [])
        self.assertEqual(parse_expose_label(" , "), [])

    def test_bad_items_name_the_item(self) -> None:
        cases = {
            "80,http": "'http'",
            "80:http": "'80:http'",
            "0": "'0'",
            "65536": "'65536'",
            "80/sctp": "'80/sctp'",
            "80:": "'80:'",
            ":80": "':80'",
            "80:81:82": "'80:81:82'",
            "/udp": "'/udp'",
            "80/udp/x": "'80/udp/x'",
            "-1": "'-1'",
            "８０": "'８０'",
        }
        for text, item in cases.items():
            with self.assertRaises(DockerLabelError, msg=text) as caught:
                parse_expose_label(text)
            self.assertIn(item, str(caught.exception), text)
            self.assertNotIn("\n", str(caught.exception))

    def test_error_is_value_error(self) -> None:
        self.assertTrue(issubclass(DockerLabelError, ValueError))


class UnexposeLabelTests(unittest.TestCase):

    def test_star(self) -> None:
        spec = parse_unexpose_label("*")
        self.assertEqual(spec, UnexposeSpec(all_ports=True))
        self.assertTrue(spec.removes(80, "tcp"))
        self.assertTrue(spec.removes(53, "udp"))

    def test_bare_port_is_tcp(self) -> None:
        spec = parse_unexpose_label("80, 53/UDP")
        self.assertEqual(spec.ports, frozenset({(80, "tcp"), (53, "udp")}))
        self.assertTrue(spec.removes(80, "tcp"))
        self.assertFalse(spec.removes(80, "udp"))
        self.assertTrue(spec.removes(53, "udp"))
        self.assertFalse(spec.removes(53, "tcp"))

    def test_empty(self) -> None:
        self.assertEqual(parse_unexpose_label(""), UnexposeSpec())
        self.assertFalse(UnexposeSpec().removes(80, "tcp"))

    def test_bad_items(self) -> None:
        for text in ("web", "80:8080", "80/sctp", "*/udp", "0"):
            with self.assertRaises(DockerLabelError, msg=text) as caught:
                parse_unexpose_label(text)
            self.assertIn(repr(text), str(caught.exception))


class ContainerServicesTests(unittest.TestCase):
    """Issue 5, "Done when" 1, and the rules of hypergate.md section 7."""

    def test_expose_and_label(self) -> None:
        self.assertEqual(
            services_of("web", exposed=("80/tcp",), labels={"pipegate.EXPOSE": "9000:19000/udp"}),
            [Service(80, "web", 80, "tcp", DOCKER), Service(19000, "web", 9000, "udp", PUBLISHED)],
        )

    def test_unexpose_drops_port(self) -> None:
        labels = {"pipegate.EXPOSE": "9000:19000/udp", "pipegate.UNEXPOSE": "80"}
        self.assertEqual(
            services_of("web", exposed=("80/tcp",), labels=labels),
            [Service(19000, "web", 9000, "udp", PUBLISHED)],
        )

    def test_unexpose_bare_port_keeps_udp(self) -> None:
        self.assertEqual(
            services_of("dns", exposed=("53/tcp", "53/udp"), labels={"pipegate.UNEXPOSE": "53"}),
            [Service(53, "dns", 53, "udp", DOCKER)],
        )

    def test_unexpose_star_keeps_published(self) -> None:
        self.assertEqual(
            services_of("web", exposed=("80/tcp", "443/tcp"), published=((80, 8080, "tcp"),),
                        labels={"pipegate.UNEXPOSE": "*"}),
            [Service(8080, "web", 80, "tcp", PUBLISHED)],
        )

    def test_unexpose_cannot_remove_published(self) -> None:
        self.assertEqual(
            services_of("web", published=((80, 8080, "tcp"),), labels={"pipegate.UNEXPOSE": "80/tcp"}),
            [Service(8080, "web", 80, "tcp", PUBLISHED)],
        )

    def test_exclude(self) -> None:
        for value in ("true", "TRUE", " True "):
            self.assertEqual(
                services_of("web", exposed=("80/tcp",), labels={"pipegate.EXCLUDE": value}), [], value)
        for value in ("false", "1", "yes", ""):
            self.assertEqual(
                services_of("web", exposed=("80/tcp",), labels={"pipegate.EXCLUDE": value}),
                [Service(80, "web", 80, "tcp", DOCKER)], value)

    def test_off_network(self) -> None:
        self.assertEqual(services_of("web", exposed=("80/tcp",), networks=(OTHER_NETWORK,)), [])
        self.assertEqual(services_of("web", exposed=("80/tcp",), networks=()), [])
        self.assertEqual(
            services_of("web", exposed=("80/tcp",), networks=(OTHER_NETWORK,), network=OTHER_NETWORK),
            [Service(80, "web", 80, "tcp", DOCKER)],
        )

    def test_not_running(self) -> None:
        for state in ("exited", "paused", "created"):
            self.assertEqual(services_of("web", exposed=("80/tcp",), state=state), [], state)

    def test_inspect_state_wins_over_stale_listing(self) -> None:
        listing, inspect = make_container("web", exposed=("80/tcp",))
        inspect["State"].update(Status="exited", Running=False, Pid=0)
        self.assertEqual(container_services(listing, inspect, NETWORK), [])

    def test_inspect_networks_win_over_stale_listing(self) -> None:
        listing, inspect = make_container("web", exposed=("80/tcp",))
        del inspect["NetworkSettings"]["Networks"][NETWORK]
        self.assertEqual(container_services(listing, inspect, NETWORK), [])

    def test_hypergate_spellings(self) -> None:
        self.assertEqual(
            services_of("web", exposed=("80/tcp",),
                        labels={"hypergate.EXPOSE": "9000:19000/udp", "hypergate.UNEXPOSE": "80"}),
            [Service(19000, "web", 9000, "udp", PUBLISHED)],
        )
        self.assertEqual(
            services_of("web", exposed=("80/tcp",), labels={"hypergate.EXCLUDE": "true"}), [])
        self.assertEqual(LABEL_PREFIXES, ("pipegate.", "hypergate."))

    def test_pipegate_wins(self) -> None:
        labels = {
            "pipegate.EXPOSE": "81", "hypergate.EXPOSE": "82",
            "pipegate.EXCLUDE": "false", "hypergate.EXCLUDE": "true",
            "hypergate.UNEXPOSE": "80",
        }
        self.assertEqual(
            services_of("web", exposed=("80/tcp",), labels=labels),
            [Service(81, "web", 81, "tcp", DOCKER)],
        )

    def test_published_port(self) -> None:
        self.assertEqual(
            services_of("web", published=((80, 8080, "tcp"), (53, 5353, "udp"))),
            [Service(5353, "web", 53, "udp", PUBLISHED), Service(8080, "web", 80, "tcp", PUBLISHED)],
        )

    def test_lowest_public_port(self) -> None:
        self.assertEqual(
            services_of("web", published=((80, 8081, "tcp"), (80, 8080, "tcp"))),
            [Service(8080, "web", 80, "tcp", PUBLISHED)],
        )

    def test_expose_label_fills_missing_public_port_only(self) -> None:
        self.assertEqual(
            services_of("web", exposed=("80/tcp",), labels={"pipegate.EXPOSE": "80:8081"}),
            [Service(8081, "web", 80, "tcp", PUBLISHED)],
        )
        self.assertEqual(
            services_of("web", published=((80, 8080, "tcp"),), labels={"pipegate.EXPOSE": "80:9999, 80"}),
            [Service(8080, "web", 80, "tcp", PUBLISHED)],
        )
        self.assertEqual(
            services_of("web", exposed=("80/tcp",), labels={"pipegate.EXPOSE": "80"}),
            [Service(80, "web", 80, "tcp", DOCKER)],
        )

    def test_expose_after_unexpose(self) -> None:
        self.assertEqual(
            services_of("web", exposed=("80/tcp",),
                        labels={"pipegate.UNEXPOSE": "*", "pipegate.EXPOSE": "80:8080"}),
            [Service(8080, "web", 80, "tcp", PUBLISHED)],
        )

    def test_exposed_ports_from_inspect_only(self) -> None:
        """Engines that list only published ports: C{Config.ExposedPorts} still counts."""
        listing, inspect = make_container("web", exposed=("80/tcp",), list_unpublished=False)
        self.assertEqual(listing["Ports"], [])
        inspect["NetworkSettings"]["Ports"] = {}
        self.assertEqual(container_services(listing, inspect, NETWORK),
                         [Service(80, "web", 80, "tcp", DOCKER)])

    def test_published_port_from_inspect_only(self) -> None:
        listing, inspect = make_container("web", published=((80, 8080, "tcp"),))
        listing["Ports"] = []
        self.assertEqual(container_services(listing, inspect, NETWORK),
                         [Service(8080, "web", 80, "tcp", PUBLISHED)])

    def test_other_protocols_ignored(self) -> None:
        self.assertEqual(services_of("web", exposed=("80/tcp", "9/sctp")),
                         [Service(80, "web", 80, "tcp", DOCKER)])

    def test_service_host_is_first_alias(self) -> None:
        self.assertEqual(
            services_of("app-db-1", exposed=("3306/tcp",), aliases=("mysql.hyper", "db")),
            [Service(3306, "mysql.hyper", 3306, "tcp", DOCKER)],
        )

    def test_service_host_skips_short_id(self) -> None:
        listing, inspect = make_container("web", exposed=("80/tcp",))
        short = listing["Id"][:12]
        self.assertEqual(inspect["NetworkSettings"]["Networks"][NETWORK]["Aliases"], [short])
        self.assertEqual(container_services(listing, inspect, NETWORK)[0].service_host, "web")
        inspect["NetworkSettings"]["Networks"][NETWORK]["Aliases"] = [short, "api"]
        self.assertEqual(container_services(listing, inspect, NETWORK)[0].service_host, "api")

    def test_service_host_without_aliases(self) -> None:
        listing, inspect = make_container("web", exposed=("80/tcp",))
        inspect["NetworkSettings"]["Networks"][NETWORK]["Aliases"] = None
        listing["NetworkSettings"]["Networks"][NETWORK]["Aliases"] = None
        self.assertEqual(container_services(listing, inspect, NETWORK)[0].service_host, "web")

    def test_container_name(self) -> None:
        listing, inspect = make_container("web")
        self.assertEqual(container_name(listing, inspect), "web")
        self.assertEqual(container_name(listing), "web")
        listing["Names"] = ["/proxy/web", "/web"]
        self.assertEqual(container_name(listing), "web")

    def test_bad_label_names_container_and_label(self) -> None:
        for key in ("pipegate.EXPOSE", "hypergate.UNEXPOSE"):
            with self.assertRaises(DockerLabelError) as caught:
                services_of("web", exposed=("80/tcp",), labels={key: "80:http"})
            message = str(caught.exception)
            self.assertIn("container web", message)
            self.assertIn(key, message)
            self.assertIn("'80:http'", message)

    def test_bad_label_of_ignored_container_is_not_parsed(self) -> None:
        self.assertEqual(services_of("web", labels={"pipegate.EXPOSE": "x"}, state="exited"), [])
        self.assertEqual(services_of("web", labels={"pipegate.EXPOSE": "x"}, networks=(OTHER_NETWORK,)), [])
        self.assertEqual(
            services_of("web", labels={"pipegate.EXPOSE": "x", "pipegate.EXCLUDE": "true"}), [])

    def test_helper_containers_are_excluded(self) -> None:
        listing, inspect = make_container("pipegate-helper-db", exposed=("3306/tcp",), aliases=("db",))
        labels = helper_spec("db", [(3306, "tcp", 3306)], "pipegate", NETWORK, NETWORK_ID, "10.89.0.1")["Labels"]
        listing["Labels"] = inspect["Config"]["Labels"] = labels
        self.assertEqual(container_services(listing, inspect, NETWORK), [])

    def test_wants_inspect(self) -> None:
        self.assertTrue(wants_inspect(make_container("web")[0], NETWORK))
        self.assertFalse(wants_inspect(make_container("web", state="exited")[0], NETWORK))
        self.assertFalse(wants_inspect(make_container("web", networks=(OTHER_NETWORK,))[0], NETWORK))
        excluded = make_container("web", labels={"hypergate.EXCLUDE": "true"})[0]
        self.assertFalse(wants_inspect(excluded, NETWORK))
        listing = make_container("web")[0]
        del listing["NetworkSettings"]
        self.assertTrue(wants_inspect(listing, NETWORK))


class DiscoverTests(unittest.TestCase):

    def test_all_containers_in_name_order(self) -> None:
        services, messages = run_discover(
            make_container("web", exposed=("80/tcp",), labels={"pipegate.EXPOSE": "9000:19000/udp"}, index=3),
            make_container("db", exposed=("3306/tcp",), aliases=("mysql.hyper",), index=4),
            make_container("elsewhere", exposed=("8080/tcp",), networks=(OTHER_NETWORK,), index=5),
            make_container("stopped", exposed=("8081/tcp",), state="exited", index=6),
            make_container("hidden", exposed=("8082/tcp",), labels={"pipegate.EXCLUDE": "true"}, index=7),
        )
        self.assertEqual(services, [
            Service(3306, "mysql.hyper", 3306, "tcp", DOCKER),
            Service(80, "web", 80, "tcp", DOCKER),
            Service(19000, "web", 9000, "udp", PUBLISHED),
        ])
        self.assertEqual(messages, [])

    def test_invalid_labels_skip_container(self) -> None:
        services, messages = run_discover(
            make_container("broken", exposed=("80/tcp",), labels={"pipegate.UNEXPOSE": "80:8080"}),
            make_container("web", exposed=("8080/tcp",)),
        )
        self.assertEqual(services, [Service(8080, "web", 8080, "tcp", DOCKER)])
        self.assertEqual(len(messages), 1)
        self.assertIn("container broken", messages[0])
        self.assertIn("pipegate.UNEXPOSE", messages[0])
        self.assertIn("'80:8080'", messages[0])
        self.assertIn("skipped", messages[0])

    def test_conflict_keeps_first_by_name(self) -> None:
        services, messages = run_discover(
            make_container("zeta", published=((80, 8080, "tcp"),)),
            make_container("alpha", exposed=("8080/tcp",)),
        )
        self.assertEqual(services, [Service(8080, "alpha", 8080, "tcp", DOCKER)])
        self.assertEqual(len(messages), 1)
        self.assertIn("8080/tcp", messages[0])
        self.assertIn("zeta", messages[0])
        self.assertIn("alpha", messages[0])

    def test_same_port_other_protocol_is_no_conflict(self) -> None:
        services, messages = run_discover(
            make_container("dns", exposed=("53/udp",)),
            make_container("dns-admin", exposed=("53/tcp",)),
        )
        self.assertEqual(services, [
            Service(53, "dns", 53, "udp", DOCKER), Service(53, "dns-admin", 53, "tcp", DOCKER)])
        self.assertEqual(messages, [])

    def test_replicas_sharing_an_alias(self) -> None:
        services, messages = run_discover(
            make_container("app-web-2", exposed=("80/tcp",), aliases=("web",), index=3),
            make_container("app-web-1", exposed=("80/tcp",), aliases=("web",), index=4),
        )
        self.assertEqual(services, [Service(80, "web", 80, "tcp", DOCKER)])
        self.assertEqual(messages, [])

    def test_missing_inspect(self) -> None:
        gone_listing, _ = make_container("gone", exposed=("80/tcp",))
        stopped_listing, _ = make_container("stopped", exposed=("81/tcp",), state="exited")
        web = make_container("web", exposed=("8080/tcp",))
        messages: list[str] = []
        services = discover([gone_listing, stopped_listing, web[0]], {web[1]["Id"]: web[1]}, NETWORK,
                            messages.append)
        self.assertEqual(services, [Service(8080, "web", 8080, "tcp", DOCKER)])
        self.assertEqual(len(messages), 1)
        self.assertIn("gone", messages[0])

    def test_without_log(self) -> None:
        broken = make_container("broken", labels={"pipegate.EXPOSE": "x"})
        self.assertEqual(discover([broken[0]], {broken[1]["Id"]: broken[1]}, NETWORK), [])

    def test_nothing(self) -> None:
        self.assertEqual(run_discover(), ([], []))


class MergeTests(unittest.TestCase):

    STATIC = [Service(8080, "localhost", 8080), Service(25565, "minecraft", 25565)]

    def test_static_kept_discovered_added(self) -> None:
        discovered = [Service(80, "web", 80, "tcp", DOCKER)]
        self.assertEqual(merge_with_static(self.STATIC, discovered), self.STATIC + discovered)

    def test_static_survives_every_refresh(self) -> None:
        refreshes = [
            [Service(80, "web", 80, "tcp", DOCKER)],
            [],
            [Service(8080, "web", 80, "tcp", PUBLISHED)],
        ]
        for discovered in refreshes:
            merged = merge_with_static(self.STATIC, discovered)
            self.assertEqual(merged[: len(self.STATIC)], self.STATIC)

    def test_static_wins_conflict(self) -> None:
        messages: list[str] = []
        discovered = [Service(8080, "web", 80, "tcp", PUBLISHED), Service(53, "dns", 53, "udp", DOCKER)]
        merged = merge_with_static(self.STATIC, discovered, messages.append)
        self.assertEqual(merged, self.STATIC + [Service(53, "dns", 53, "udp", DOCKER)])
        self.assertEqual(len(messages), 1)
        self.assertIn("8080/tcp", messages[0])
        self.assertIn("--services", messages[0])
        self.assertIn("web:80", messages[0])

    def test_identical_is_silent(self) -> None:
        messages: list[str] = []
        merged = merge_with_static(self.STATIC, [self.STATIC[0]], messages.append)
        self.assertEqual(merged, self.STATIC)
        self.assertEqual(messages, [])

    def test_discovered_conflicts(self) -> None:
        messages: list[str] = []
        discovered = [Service(80, "a", 80, "tcp", DOCKER), Service(80, "b", 80, "tcp", DOCKER)]
        self.assertEqual(merge_with_static([], discovered, messages.append), discovered[:1])
        self.assertEqual(len(messages), 1)

    def test_end_to_end(self) -> None:
        discovered, _ = run_discover(
            make_container("web", exposed=("80/tcp",), labels={"pipegate.EXPOSE": "9000:19000/udp"}))
        merged = merge_with_static(self.STATIC, discovered)
        self.assertEqual(merged, self.STATIC + [
            Service(80, "web", 80, "tcp", DOCKER), Service(19000, "web", 9000, "udp", PUBLISHED)])


class HelperTests(unittest.TestCase):

    def spec(self, network_id: str | None = NETWORK_ID) -> dict:
        return helper_spec("mysql.hyper", [(3306, "udp", 13306), (3306, "tcp", 3306)], "pipegate:latest", NETWORK,
                           network_id, "172.18.0.1")

    def test_shape(self) -> None:
        self.assertEqual(self.spec(), {
            "Image": "pipegate:latest",
            "Cmd": ["pipegate", "forward", "--to", "172.18.0.1", "3306/tcp=3306", "3306/udp=13306"],
            "ExposedPorts": {"3306/tcp": {}, "3306/udp": {}},
            "Hostname": "mysql.hyper",
            "Labels": {"pipegate.EXCLUDE": "true", "pipegate.helper": "mysql.hyper",
                       "pipegate.helper.network": NETWORK},
            "HostConfig": {"Sysctls": {"net.ipv4.ip_unprivileged_port_start": "0"}},
            "NetworkingConfig": {
                "EndpointsConfig": {NETWORK: {"Aliases": ["mysql.hyper"], "NetworkID": NETWORK_ID}},
            },
        })
        self.assertNotIn("Env", self.spec())
        json.dumps(self.spec())

    def test_without_network_id(self) -> None:
        self.assertEqual(self.spec(None)["NetworkingConfig"],
                         {"EndpointsConfig": {NETWORK: {"Aliases": ["mysql.hyper"]}}})

    def test_secret_free(self) -> None:
        spec = self.spec()
        self.assertTrue(secret_free(spec, SECRET))
        self.assertTrue(secret_free(helper_name("mysql.hyper"), SECRET))

    def test_secret_free_finds_leaks(self) -> None:
        leaky = helper_spec("db", [(5432, "tcp", 5432)], "pipegate", NETWORK, None, SECRET)
        self.assertFalse(secret_free(leaky, SECRET))
        self.assertFalse(secret_free({"Env": [f"PIPEGATE_ROUTER={SECRET}"]}, SECRET))
        self.assertFalse(secret_free({"Labels": {f"x-{SECRET.upper()}": "1"}}, SECRET))
        self.assertFalse(secret_free({"a": [{"b": ("c", {"d": SECRET[:10] + SECRET[10:]})}]}, SECRET))
        self.assertFalse(secret_free([b"prefix" + SECRET.encode()], SECRET))
        self.assertTrue(secret_free({"a": [1, None, True, 2.5]}, SECRET))
        self.assertRaises(ValueError, secret_free, {}, "")

    def test_bad_arguments(self) -> None:
        for host, forwards, target in [
            ("", [(80, "tcp", 80)], "gw"), ("a b", [(80, "tcp", 80)], "gw"), ("web", [(0, "tcp", 80)], "gw"),
            ("web", [(80, "tcp", 70000)], "gw"), ("web", [(80, "sctp", 80)], "gw"), ("web", [], "gw"),
            ("web", [(80, "tcp", 80), (80, "tcp", 81)], "gw"), ("web", [(80, "tcp", 80)], ""),
            ("web", [(80, "tcp", 80)], "g w"),
        ]:
            self.assertRaises(ValueError, helper_spec, host, forwards, "pipegate", NETWORK, None, target)

    def test_long_host(self) -> None:
        host = "a" * 40 + "." + "b" * 40
        spec = helper_spec(host, [(80, "tcp", 80)], "pipegate", NETWORK, None, "gw")
        self.assertLessEqual(len(spec["Hostname"]), 63)
        self.assertEqual(spec["NetworkingConfig"]["EndpointsConfig"][NETWORK]["Aliases"], [host])

    def test_helper_name(self) -> None:
        self.assertEqual(helper_name("mysql"), "pipegate-helper-mysql")
        dotted, dashed = helper_name("mysql.hyper"), helper_name("mysql-hyper")
        self.assertEqual(dashed, "pipegate-helper-mysql-hyper")
        self.assertTrue(dotted.startswith("pipegate-helper-mysql-hyper-"))
        self.assertNotEqual(dotted, dashed)
        self.assertNotEqual(helper_name("Web"), helper_name("web"))
        for host in ("mysql.hyper", "Web_Server", "x" * 200, "...", "ünïcode.example", "a" * 38, "a" * 39):
            name = helper_name(host)
            self.assertRegex(name, r"^pipegate-helper-[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
            self.assertLessEqual(len(name), 63, host)
            self.assertEqual(helper_name(host), name)


class DockerHostTests(unittest.TestCase):

    def test_default(self) -> None:
        self.assertEqual(DEFAULT_DOCKER_ENDPOINT, "unix:/var/run/docker.sock")
        self.assertEqual(parse_docker_host(None), "unix:/var/run/docker.sock")
        self.assertEqual(parse_docker_host(""), "unix:/var/run/docker.sock")
        self.assertEqual(parse_docker_host("  "), "unix:/var/run/docker.sock")

    def test_forms(self) -> None:
        for value in ("unix:///run/user/1000/docker.sock", "unix:/run/user/1000/docker.sock",
                      "/run/user/1000/docker.sock", " unix:///run/user/1000/docker.sock\n",
                      "UNIX:///run/user/1000/docker.sock"):
            self.assertEqual(parse_docker_host(value), "unix:/run/user/1000/docker.sock", value)
        self.assertEqual(parse_docker_host("podman.sock"), "unix:podman.sock")

    def test_other_schemes(self) -> None:
        for value in ("tcp://127.0.0.1:2375", "ssh://me@host", "npipe:////./pipe/docker_engine",
                      "https://docker.example:2376", "fd://"):
            with self.assertRaises(ValueError, msg=value) as caught:
                parse_docker_host(value)
            self.assertIn("only unix sockets are supported", str(caught.exception))

    def test_empty_path(self) -> None:
        self.assertRaises(ValueError, parse_docker_host, "unix://")

    def test_twisted_endpoint(self) -> None:
        for path in ("/var/run/docker.sock", "/tmp/odd:name=1\\x.sock"):
            endpoint = clientFromString(MemoryReactor(), parse_docker_host("unix://" + path))
            self.assertIsInstance(endpoint, UNIXClientEndpoint)
            self.assertEqual(endpoint._path, path)
