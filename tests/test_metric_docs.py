"""
docs/deployment.md §10 against the code: every metric the table names is exported by some
collector, every exported metric is in the table, and every reason a service counts under
pipegate_admission_failures_total is listed in its row.  Also the process metrics
(descriptors in use against the limit) on a real --metrics listener's registry.
"""

from __future__ import annotations

import os
import re
import resource

from twisted.trial import unittest

from pipegate.stats import COUNTERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def table_rows() -> dict[str, str]:
    """Documented metric name (labels dropped) -> its table row."""
    text = read("docs/deployment.md")
    section = text[text.index("## 10. Metrics and status"):]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `pipegate_") and not line.startswith("| `process_"):
            continue
        first = line.split("|")[1]
        for name in re.findall(r"`([a-z_]+)(?:\{[^}]*\})?`", first):
            rows[name] = line
    return rows


def exported() -> set[str]:
    names = {f"pipegate_{name}_total" for name in COUNTERS}
    names |= {f"pipegate_hub_{name}_total" for name in ("admission_failures", "dropped_datagrams", "drain_cut")}
    gauge = re.compile(r'^\s*\("([a-z_]+)", "', re.M)
    for path in ("pipegate/metrics.py", "pipegate/http/acme.py"):
        source = read(path)
        start = source.find("def hub_collector")   # the relay's hub: pipegate_hub_<name>
        hub = source[start:source.index("def _link_gauges")] if start >= 0 else ""
        names |= {"pipegate_hub_" + name for name in gauge.findall(hub)}
        names |= {"pipegate_" + name for name in gauge.findall(source.replace(hub, "") if hub else source)}
    return names


class MetricTable(unittest.TestCase):
    def test_documented_metrics_exist(self):
        missing = sorted(set(table_rows()) - exported() - {"process_open_fds", "process_max_fds"})
        self.assertEqual(missing, [])

    def test_exported_metrics_are_documented(self):
        undocumented = sorted(exported() - set(table_rows()))
        self.assertEqual(undocumented, [])

    def test_every_admission_failure_reason_is_documented(self):
        row = table_rows()["pipegate_admission_failures_total"]
        reasons = set()
        for dirpath, _, files in os.walk(os.path.join(ROOT, "pipegate")):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        for call in re.findall(r'inc\("admission_failures", ([^)]*)\)', f.read()):
                            reasons.update(re.findall(r'"([a-z_]+)"', call))
        self.assertIn("revoked", reasons)   # the scan itself works
        self.assertEqual(sorted(r for r in reasons if f"`{r}`" not in row), [])


class ProcessMetrics(unittest.TestCase):
    def test_fds_in_use_and_the_limit(self):
        from prometheus_client.exposition import generate_latest

        from pipegate.metrics import ServiceCollector
        from pipegate.stats import Stats
        from pipegate.status import OpsResource

        ops = OpsResource(ServiceCollector(Stats(), (), lambda: []), lambda: {})
        text = generate_latest(ops.registry).decode()
        values = dict(re.findall(r"^(process_(?:open|max)_fds) (\S+)$", text, re.M))
        self.assertEqual(float(values["process_max_fds"]), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.assertEqual(float(values["process_open_fds"]), len(os.listdir("/proc/self/fd")))


class ScrapesAreNotLogged(unittest.TestCase):
    """Prometheus scrapes /metrics every 15 s: a log line each was 5,760 lines a day in journald."""

    async def test_metrics_quiet_status_logged(self):
        from twisted.internet import endpoints, reactor
        from twisted.logger import formatEvent, globalLogPublisher

        from pipegate.metrics import ServiceCollector
        from pipegate.stats import Stats
        from pipegate.status import OpsResource, OpsSite
        from tests.support import Loopback, request

        loop = Loopback(self)
        site = OpsSite(OpsResource(ServiceCollector(Stats(), (), lambda: []), lambda: {}))
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        loop.ports.append(port)
        base = f"http://127.0.0.1:{port.getHost().port}"
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        agent = loop.agent()
        for path in ("/metrics", "/status", "/nope"):
            response, _ = await request(agent, b"GET", base + path)
        text = [formatEvent(e) for e in events]
        self.assertEqual([t for t in text if "GET /metrics" in t], [])
        self.assertEqual(len([t for t in text if "GET /status" in t]), 1)
        self.assertEqual(len([t for t in text if "GET /nope" in t]), 1)
