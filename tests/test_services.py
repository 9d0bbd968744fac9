"""
Tests for L{pipegate.ports.services}: service and filter sources, validation, merging
and the gateway's exposure rules (Hypergate's services.json with its tagged bugs fixed).
"""

from __future__ import annotations

import json

from twisted.python.filepath import FilePath
from twisted.trial import unittest

from pipegate.ports.services import (
    Exposure,
    Filter,
    Service,
    ServiceError,
    load_filters,
    load_services,
    merge_services,
    parse_filters,
    parse_only_services,
    parse_service_spec,
    parse_services,
)

# Hypergate's bundled examples.
HTTP_EXAMPLE = [{"gatePort": 8080, "serviceHost": "localhost", "servicePort": 8080, "protocol": "tcp"}]
MINECRAFT_EXAMPLE = {
    "name": "Minecraft",
    "icon": "https://example.invalid/minecraft.png",
    "services": [
        {"gatePort": 25565, "serviceHost": "localhost", "servicePort": 25565, "protocol": "tcp"},
        {"gatePort": 19132, "serviceHost": "localhost", "servicePort": 19132, "protocol": "udp"},
        {"gatePort": 8123, "serviceHost": "localhost", "servicePort": 8123, "protocol": "tcp"},
    ],
}

WEB = Service(80, "web", 8080, "tcp", ("web", "published"))
DB = Service(5432, "db", 5432, "tcp", ("docker",))
DNS = Service(53, "dns", 53, "udp", ("docker", "published"))
PLAIN = Service(9000, "plain", 9000)


def entry(**fields: object) -> dict:
    base: dict = {"gatePort": 80, "serviceHost": "web", "servicePort": 8080}
    base.update(fields)
    return base


class ServiceTests(unittest.TestCase):

    def test_defaults_and_key(self) -> None:
        service = Service(80, "web", 8080)
        self.assertEqual(service.protocol, "tcp")
        self.assertEqual(service.tags, ())
        self.assertEqual(service.key, (80, "tcp"))
        self.assertEqual(Service(53, "dns", 53, "udp").key, (53, "udp"))

    def test_frozen_and_hashable(self) -> None:
        service = Service(80, "web", 8080, tags=["a", "b"])
        self.assertEqual(service.tags, ("a", "b"))
        self.assertEqual(len({service, Service(80, "web", 8080, tags=("a", "b"))}), 1)
        self.assertRaises(AttributeError, setattr, service, "gate_port", 81)

    def test_describe(self) -> None:
        self.assertEqual(WEB.describe(), "80/tcp -> web:8080 [web published]")
        self.assertEqual(PLAIN.describe(), "9000/tcp -> plain:9000")

    def test_error_is_value_error(self) -> None:
        self.assertTrue(issubclass(ServiceError, ValueError))


class ParseServicesTests(unittest.TestCase):

    def assertEntryError(self, doc: object, expected: str) -> None:
        e = self.assertRaises(ServiceError, parse_services, doc, "services.json")
        self.assertEqual(str(e), expected)

    def test_http_example(self) -> None:
        self.assertEqual(parse_services(HTTP_EXAMPLE, "http.json"), [Service(8080, "localhost", 8080, "tcp")])

    def test_minecraft_example(self) -> None:
        self.assertEqual(
            parse_services(MINECRAFT_EXAMPLE, "minecraft.json"),
            [
                Service(25565, "localhost", 25565, "tcp"),
                Service(19132, "localhost", 19132, "udp"),
                Service(8123, "localhost", 8123, "tcp"),
            ],
        )

    def test_list_and_object_forms_agree(self) -> None:
        entries = MINECRAFT_EXAMPLE["services"]
        self.assertEqual(parse_services(entries, "a"), parse_services({"services": entries}, "b"))

    def test_load_services_inline_file_url(self) -> None:
        text = json.dumps(MINECRAFT_EXAMPLE)
        path = FilePath(self.mktemp())
        path.setContent(text.encode())
        inline = load_services(text)
        self.assertEqual(len(inline), 3)
        self.assertEqual(load_services(path.path), inline)
        self.assertEqual(load_services("https://example.invalid/m.json", lambda url: text.encode()), inline)

    def test_load_services_error_names_file(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(json.dumps([entry(), entry(gatePort=81, servicePort="80")]).encode())
        e = self.assertRaises(ServiceError, load_services, path.path)
        self.assertEqual(
            str(e), f"{path.path}: entry 1: servicePort: must be an integer 1-65535, got '80'"
        )

    def test_load_services_error_names_inline(self) -> None:
        source = '[{"gatePort": 0, "serviceHost": "x", "servicePort": 1}]'
        e = self.assertRaises(ServiceError, load_services, source)
        self.assertTrue(str(e).startswith("inline JSON '[{\"gatePort\": 0, "), str(e))
        self.assertIn("...': entry 0: gatePort:", str(e))

    def test_empty(self) -> None:
        self.assertEqual(parse_services([], "s"), [])
        self.assertEqual(parse_services({"services": [], "name": "n"}, "s"), [])

    def test_bad_document(self) -> None:
        for doc in ["x", 1, None, {"name": "no services"}, {"services": {"gatePort": 1}}]:
            e = self.assertRaises(ServiceError, parse_services, doc, "services.json")
            self.assertTrue(str(e).startswith("services.json: "), str(e))

    def test_entry_not_object(self) -> None:
        self.assertEntryError([entry(), "web:80"], "services.json: entry 1: must be an object, got 'web:80'")

    def test_missing_fields(self) -> None:
        for name in ("gatePort", "serviceHost", "servicePort"):
            doc = entry()
            del doc[name]
            self.assertEntryError([doc], f"services.json: entry 0: {name}: missing")

    def test_bad_ports(self) -> None:
        for name in ("gatePort", "servicePort"):
            for value, shown in [
                ("80", "'80'"), (0, "0"), (65536, "65536"), (-1, "-1"), (80.0, "80.0"),
                (True, "True"), (None, "None"), ([80], "[80]"),
            ]:
                bad = entry(gatePort=81)
                bad[name] = value
                self.assertEntryError(
                    [entry(), bad],
                    f"services.json: entry 1: {name}: must be an integer 1-65535, got {shown}",
                )

    def test_port_bounds(self) -> None:
        services = parse_services([entry(gatePort=1, servicePort=65535)], "s")
        self.assertEqual(services, [Service(1, "web", 65535)])

    def test_bad_host(self) -> None:
        for value, shown in [("", "''"), ("a b", "'a b'"), ("a\n", "'a\\n'"), (1, "1"), (None, "None")]:
            self.assertEntryError(
                [entry(serviceHost=value)],
                "services.json: entry 0: serviceHost: must be a non-empty host name without spaces,"
                f" got {shown}",
            )

    def test_protocol_any_case(self) -> None:
        for value, expected in [("tcp", "tcp"), ("TCP", "tcp"), ("Udp", "udp"), ("UDP", "udp")]:
            [service] = parse_services([entry(protocol=value)], "s")
            self.assertEqual(service.protocol, expected)

    def test_protocol_numbers(self) -> None:
        self.assertEqual(parse_services([entry(protocol=0)], "s")[0].protocol, "tcp")
        self.assertEqual(parse_services([entry(protocol=1)], "s")[0].protocol, "udp")

    def test_protocol_missing_is_tcp(self) -> None:
        self.assertEqual(parse_services([entry()], "s")[0].protocol, "tcp")

    def test_bad_protocol_refused(self) -> None:
        # Hypergate silently reads these as tcp.
        for value, shown in [
            ("sctp", "'sctp'"), ("", "''"), (" tcp", "' tcp'"), (2, "2"), (True, "True"),
            (False, "False"), (None, "None"), (1.0, "1.0"),
        ]:
            self.assertEntryError(
                [entry(protocol=value)],
                f'services.json: entry 0: protocol: must be "tcp" or "udp" (or 0 / 1), got {shown}',
            )

    def test_tags(self) -> None:
        [service] = parse_services([entry(tags="web  published\tx")], "s")
        self.assertEqual(service.tags, ("web", "published", "x"))
        self.assertEqual(parse_services([entry(tags="")], "s")[0].tags, ())
        self.assertEqual(parse_services([entry(tags="a b a")], "s")[0].tags, ("a", "b"))
        self.assertEqual(parse_services([entry()], "s")[0].tags, ())

    def test_bad_tags(self) -> None:
        for value, shown in [(["web"], "['web']"), (1, "1"), (None, "None")]:
            self.assertEntryError(
                [entry(tags=value)],
                f"services.json: entry 0: tags: must be a string of space-separated words, got {shown}",
            )

    def test_unknown_field_refused(self) -> None:
        doc = [entry(), entry(gatePort=81, servicehost="x")]
        e = self.assertRaises(ServiceError, parse_services, doc, "s.json")
        self.assertTrue(str(e).startswith("s.json: entry 1: unknown field 'servicehost'"), str(e))

    def test_long_value_truncated(self) -> None:
        e = self.assertRaises(ServiceError, parse_services, [entry(serviceHost="x " * 500)], "s.json")
        self.assertLess(len(str(e)), 200)

    def test_source_in_message_is_one_line(self) -> None:
        e = self.assertRaises(ServiceError, parse_services, [1], "two\nlines")
        self.assertNotIn("\n", str(e))

    def test_exact_duplicate_dropped(self) -> None:
        services = parse_services([entry(tags="a"), entry(gatePort=81), entry(tags="a")], "s")
        self.assertEqual(services, [Service(80, "web", 8080, "tcp", ("a",)), Service(81, "web", 8080)])

    def test_duplicate_after_normalisation_dropped(self) -> None:
        services = parse_services([entry(protocol="TCP"), entry(protocol=0), entry()], "s")
        self.assertEqual(services, [Service(80, "web", 8080)])

    def test_conflicting_gate_refused(self) -> None:
        e = self.assertRaises(
            ServiceError, parse_services,
            [entry(), entry(gatePort=81), entry(servicePort=9090)], "services.json",
        )
        self.assertEqual(
            str(e),
            "services.json: entry 2: gatePort 80/tcp is ambiguous: entry 0 already maps it to web:8080",
        )

    def test_conflicting_tags_refused(self) -> None:
        self.assertRaises(ServiceError, parse_services, [entry(tags="a"), entry(tags="b")], "s")

    def test_same_port_other_protocol(self) -> None:
        services = parse_services([entry(), entry(protocol="udp")], "s")
        self.assertEqual([s.key for s in services], [(80, "tcp"), (80, "udp")])


class MergeServicesTests(unittest.TestCase):

    def test_order_kept_duplicates_dropped(self) -> None:
        self.assertEqual(
            merge_services([[WEB, DB], [DNS, WEB], [], [PLAIN, DB]]),
            [WEB, DB, DNS, PLAIN],
        )

    def test_empty(self) -> None:
        self.assertEqual(merge_services([]), [])

    def test_conflict_refused(self) -> None:
        other = Service(80, "other", 80, "tcp")
        e = self.assertRaises(ServiceError, merge_services, [[WEB], [other]])
        self.assertEqual(
            str(e),
            "gatePort 80/tcp is ambiguous: 80/tcp -> web:8080 [web published] and 80/tcp -> other:80",
        )

    def test_same_port_other_protocol(self) -> None:
        udp = Service(80, "web", 8080, "udp")
        self.assertEqual(merge_services([[WEB], [udp]]), [WEB, udp])

    def test_sources_merged(self) -> None:
        http = parse_services(HTTP_EXAMPLE, "http.json")
        minecraft = parse_services(MINECRAFT_EXAMPLE, "minecraft.json")
        self.assertEqual(len(merge_services([http, minecraft, http])), 4)


class ServiceSpecTests(unittest.TestCase):
    """--service's short form, GATE_PORT:HOST:PORT[/udp]."""

    def test_forms(self) -> None:
        self.assertEqual(parse_service_spec("2222:127.0.0.1:22"), Service(2222, "127.0.0.1", 22, "tcp"))
        self.assertEqual(parse_service_spec("5353:192.168.1.10:53/udp"), Service(5353, "192.168.1.10", 53, "udp"))
        self.assertEqual(parse_service_spec("80:db.local:8080/TCP"), Service(80, "db.local", 8080, "tcp"))
        self.assertEqual(parse_service_spec("8080:[::1]:80"), Service(8080, "::1", 80, "tcp"))
        self.assertEqual(parse_service_spec(" 1:a:2 "), Service(1, "a", 2, "tcp"))

    def test_bad_forms_say_what_is_expected(self) -> None:
        for spec in ("2222:127.0.0.1", "x", "1:::1:2", "1:a:2/sctp", "1:a b:2", "a:b:c", "1:a:2/", ""):
            e = self.assertRaises(ServiceError, parse_service_spec, spec)
            self.assertIn("expected GATE_PORT:HOST:PORT, with /udp after it for UDP", str(e), spec)

    def test_ports_out_of_range_are_named(self) -> None:
        e = self.assertRaises(ServiceError, parse_service_spec, "70000:a:1")
        self.assertEqual(str(e), "'70000:a:1': gatePort: must be an integer 1-65535, got 70000")
        e = self.assertRaises(ServiceError, parse_service_spec, "1:a:0")
        self.assertEqual(str(e), "'1:a:0': servicePort: must be an integer 1-65535, got 0")


class FilterTests(unittest.TestCase):

    def test_empty_filter_matches_everything(self) -> None:
        for service in (WEB, DB, DNS, PLAIN):
            self.assertTrue(Filter().matches(service))

    def test_each_field(self) -> None:
        self.assertTrue(Filter(gate_port=80).matches(WEB))
        self.assertFalse(Filter(gate_port=81).matches(WEB))
        self.assertTrue(Filter(service_host="web").matches(WEB))
        self.assertFalse(Filter(service_host="db").matches(WEB))
        self.assertTrue(Filter(service_port=8080).matches(WEB))
        self.assertFalse(Filter(service_port=80).matches(WEB))
        self.assertTrue(Filter(protocol="udp").matches(DNS))
        self.assertFalse(Filter(protocol="udp").matches(WEB))

    def test_protocol_case_insensitive(self) -> None:
        self.assertTrue(Filter(protocol="UDP").matches(DNS))
        self.assertTrue(Filter(protocol="tcp").matches(Service(1, "h", 1, "TCP")))

    def test_all_given_fields_must_match(self) -> None:
        self.assertTrue(Filter(gate_port=80, service_host="web", protocol="tcp").matches(WEB))
        self.assertFalse(Filter(gate_port=80, service_host="db").matches(WEB))

    def test_tags_subset(self) -> None:
        self.assertTrue(Filter(tags=("web",)).matches(WEB))
        self.assertTrue(Filter(tags=("published", "web")).matches(WEB))
        self.assertFalse(Filter(tags=("web", "docker")).matches(WEB))
        self.assertFalse(Filter(tags=("web",)).matches(PLAIN))

    def test_parse(self) -> None:
        doc = [
            {},
            {"gatePort": 80, "serviceHost": "web", "servicePort": 8080, "protocol": "TCP", "tags": "a b"},
            {"protocol": 1},
        ]
        self.assertEqual(
            parse_filters(doc, "f"),
            [Filter(), Filter(80, "web", 8080, "tcp", ("a", "b")), Filter(protocol="udp")],
        )
        self.assertEqual(parse_filters({"services": doc, "name": "x"}, "f"), parse_filters(doc, "f"))

    def test_parse_errors(self) -> None:
        cases = [
            ({"gatePort": "80"}, "gatePort: must be an integer 1-65535, got '80'"),
            ({"servicePort": 0}, "servicePort: must be an integer 1-65535, got 0"),
            ({"serviceHost": ""}, "serviceHost: must be a non-empty host name without spaces, got ''"),
            ({"protocol": "icmp"}, 'protocol: must be "tcp" or "udp" (or 0 / 1), got \'icmp\''),
            ({"tags": ["web"]}, "tags: must be a string of space-separated words, got ['web']"),
        ]
        for bad, message in cases:
            e = self.assertRaises(ServiceError, parse_filters, [{}, bad], "filters.json")
            self.assertEqual(str(e), f"filters.json: entry 1: {message}")

    def test_parse_unknown_field(self) -> None:
        e = self.assertRaises(ServiceError, parse_filters, [{"host": "web"}], "filters.json")
        self.assertTrue(str(e).startswith("filters.json: entry 0: unknown field 'host'"), str(e))

    def test_parse_bad_document(self) -> None:
        for doc in [{"serviceHost": "web"}, "web", None, [1]]:
            self.assertRaises(ServiceError, parse_filters, doc, "filters.json")

    def test_load_filters(self) -> None:
        self.assertEqual(load_filters('[{"tags": "web"}]'), [Filter(tags=("web",))])
        path = FilePath(self.mktemp())
        path.setContent(b'{"services": [{"serviceHost": "db"}]}')
        self.assertEqual(load_filters(path.path), [Filter(service_host="db")])
        self.assertEqual(
            load_filters("https://example.invalid/f", lambda url: b'[{"gatePort": 53}]'),
            [Filter(gate_port=53)],
        )


class ExposureTests(unittest.TestCase):
    ALL = [WEB, DB, DNS, PLAIN]

    def exposed(self, exposure: Exposure) -> list[Service]:
        return [s for s in self.ALL if exposure.exposes(s)]

    def test_nothing_set_exposes_everything(self) -> None:
        self.assertEqual(self.exposed(Exposure()), self.ALL)

    def test_filters_are_ored(self) -> None:
        # Hypergate ANDs the list, so these two filters would expose nothing there.
        exposure = Exposure(filters=(Filter(service_host="web"), Filter(protocol="udp")))
        self.assertEqual(self.exposed(exposure), [WEB, DNS])

    def test_fields_within_filter_are_anded(self) -> None:
        exposure = Exposure(filters=(Filter(service_host="web", protocol="udp"),))
        self.assertEqual(self.exposed(exposure), [])

    def test_tag_filter(self) -> None:
        filters = parse_filters(json.loads('[{"tags": "web"}]'), "f")
        self.assertEqual(self.exposed(Exposure(filters=filters)), [WEB])

    def test_only_services_without_filters(self) -> None:
        # Hypergate ignores exposeOnly* when there is no filter list.
        exposure = Exposure(only_services=parse_only_services("web, dns"))
        self.assertEqual(self.exposed(exposure), [WEB, DNS])

    def test_only_published_without_filters(self) -> None:
        self.assertEqual(self.exposed(Exposure(only_published=True)), [WEB, DNS])

    def test_only_docker_without_filters(self) -> None:
        self.assertEqual(self.exposed(Exposure(only_docker=True)), [DB, DNS])

    def test_flags_combined(self) -> None:
        self.assertEqual(self.exposed(Exposure(only_published=True, only_docker=True)), [DNS])
        self.assertEqual(self.exposed(Exposure(only_services=frozenset({"web"}), only_docker=True)), [])

    def test_filters_and_flags_combined(self) -> None:
        filters = (Filter(service_host="web"), Filter(service_host="db"), Filter(protocol="udp"))
        self.assertEqual(self.exposed(Exposure(filters=filters)), [WEB, DB, DNS])
        self.assertEqual(self.exposed(Exposure(filters=filters, only_docker=True)), [DB, DNS])
        both = Exposure(filters=filters, only_docker=True, only_published=True)
        self.assertEqual(self.exposed(both), [DNS])
        self.assertEqual(
            self.exposed(Exposure(filters=filters, only_services=frozenset({"web", "plain"}))), [WEB]
        )

    def test_empty_only_services_means_no_restriction(self) -> None:
        self.assertEqual(self.exposed(Exposure(only_services=parse_only_services(" , "))), self.ALL)

    def test_converters(self) -> None:
        exposure = Exposure(filters=[Filter(gate_port=80)], only_services={"web"})
        self.assertEqual(exposure.filters, (Filter(gate_port=80),))
        self.assertEqual(exposure.only_services, frozenset({"web"}))
        hash(exposure)

    def test_minecraft_udp_only(self) -> None:
        services = parse_services(MINECRAFT_EXAMPLE, "minecraft.json")
        exposure = Exposure(filters=tuple(parse_filters([{"protocol": "udp"}, {"gatePort": 8123}], "f")))
        self.assertEqual([s.key for s in services if exposure.exposes(s)], [(19132, "udp"), (8123, "tcp")])


class ParseOnlyServicesTests(unittest.TestCase):

    def test_parse(self) -> None:
        self.assertEqual(parse_only_services("a, b ,,c,"), frozenset({"a", "b", "c"}))
        self.assertEqual(parse_only_services(""), frozenset())
        self.assertEqual(parse_only_services("  "), frozenset())
        self.assertEqual(parse_only_services("svc-a"), frozenset({"svc-a"}))
