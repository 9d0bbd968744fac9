"""Figures (median, min, max over repetitions), ratios to the direct path, targets, Markdown."""

from __future__ import annotations

import statistics

from benchmarks.findings import FINDINGS


def stats(values: list[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values), "values": [round(v, 3) for v in values]}


def figure(name: str, unit: str, tunnel: list, direct: list | None = None, *, better: str = "higher",
           target: tuple | None = None, note: str | None = None) -> dict:
    """One reported figure.  C{target}: (op, value, text) with op in "<", "<=", ">", ">="."""
    t = stats(tunnel)
    d = stats(direct) if direct is not None else None
    fig = {"name": name, "unit": unit, "tunnel": t, "direct": d, "better": better}
    if t and d and d["median"]:
        fig["ratio"] = round(t["median"] / d["median"], 3)
    if target is not None:
        op, value, text = target
        fig["target"] = text
        if t is not None:
            m = t["median"]
            fig["target_met"] = {"<": m < value, "<=": m <= value, ">": m > value, ">=": m >= value}[op]
    if note:
        fig["note"] = note
    return fig


def check(text: str, measured: str, ok: bool | None) -> dict:
    """A target that is not one figure against a constant (e.g. 8 streams >= 1 stream)."""
    return {"target": text, "measured": measured, "target_met": ok}


def _num(v: float | None) -> str:
    if v is None:
        return "–"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _cell(s: dict | None) -> str:
    if s is None:
        return "–"
    if s["n"] == 1:
        return _num(s["median"])
    return f"{_num(s['median'])} ({_num(s['min'])}–{_num(s['max'])})"


def _met(ok) -> str:
    return {True: "yes", False: "**no**", None: "–"}[ok]


# The side-by-side table of issue 22: (label, scenario, figure for PipeGate and direct,
# HAProxy pair's figure, ssh -L's figure).  Missing figures show as "–".
_PEER_ROWS = [
    ("TCP 1 stream, MB/s", "tcp", "1 stream, client → service",
     "reference, HAProxy pair: 1 stream, client → service", "peer, ssh -L: 1 stream, client → service"),
    ("TCP 8 streams, MB/s", "tcp", "8 streams, client → service (-P 8)",
     "reference, HAProxy pair: 8 streams, client → service (-P 8)",
     "peer, ssh -L: 8 streams, client → service (-P 8)"),
    ("CPU seconds per GB, 1 stream", "tcp", "1 stream, client → service: CPU seconds per GB, gateway + provider",
     "reference, HAProxy pair: 1 stream, client → service: CPU seconds per GB, both processes",
     "peer, ssh -L: 1 stream, client → service: CPU seconds per GB, ssh + sshd"),
    ("redis-benchmark GET -c50 -P1, req/s", "redis", "GET -c 50 -P 1: requests/s",
     "peer, HAProxy TLS pair: GET -c 50 -P 1: requests/s", "peer, ssh -L: GET -c 50 -P 1: requests/s"),
    ("redis GET -P1 p50, ms", "redis", "GET -c 50 -P 1: p50 latency",
     "peer, HAProxy TLS pair: GET -c 50 -P 1: p50 latency", "peer, ssh -L: GET -c 50 -P 1: p50 latency"),
    ("redis SET+GET -P1: CPU µs per request", "redis", "-P 1: CPU per request, gateway + provider",
     "peer, HAProxy TLS pair: -P 1: CPU per request, both processes", "peer, ssh -L: -P 1: CPU per request, ssh + sshd"),
    ("redis GET -P16, req/s", "redis", "GET -c 50 -P 16: requests/s",
     "peer, HAProxy TLS pair: GET -c 50 -P 16: requests/s", "peer, ssh -L: GET -c 50 -P 16: requests/s"),
    ("connect + echo + close p50, ms", "connect", "p50", "peer, HAProxy TLS pair: p50", "peer, ssh -L: p50"),
    ("connect + echo + close p99, ms", "connect", "p99", "peer, HAProxy TLS pair: p99", "peer, ssh -L: p99"),
    ("DNS-sized UDP request/response, req/s", "udp_rr", "requests/s", None, None),
    ("HTTP 1 KiB GET, wrk -t2 -c50, req/s", "http_small", "wrk -t2 -c50: requests/s", None, None),
    ("HTTP: relay + connector CPU µs per request", "http_small", "wrk -t2 -c50: CPU per request, relay + connector",
     None, None),
]


def peer_table(result: dict) -> list[str]:
    """Issue 22's table: each workload through direct, PipeGate, the HAProxy TLS pair and ssh -L."""
    def fig(scenario: str, name: str | None) -> dict | None:
        if name is None:
            return None
        for f in result["scenarios"].get(scenario, {}).get("figures", []):
            if f["name"] == name:
                return f
        return None

    def cell(f: dict | None, with_ratio: bool) -> str:
        if f is None or f.get("tunnel") is None:
            return "–"
        text = _num(f["tunnel"]["median"])
        if with_ratio and f.get("ratio") is not None and f["unit"] in ("req/s", "MB/s"):
            text += f" ({_num(f['ratio'])}×)"
        return text

    rows = []
    for label, scenario, ours, haproxy, ssh in _PEER_ROWS:
        mine = fig(scenario, ours)
        if mine is None:
            continue
        direct = _num(mine["direct"]["median"]) if mine.get("direct") else "–"
        rows.append(f"| {label} | {direct} | {cell(mine, True)} | {cell(fig(scenario, haproxy), True)} | "
                    f"{cell(fig(scenario, ssh), True)} |")
    if not rows:
        return []
    return (["## Side by side: direct, PipeGate and the tools users would pick instead (issue 22)", "",
             "Medians of this run; (×) = ratio to direct in the same run.", "",
             "| workload | direct | PipeGate | HAProxy TLS pair | ssh -L |", "|---|---|---|---|---|"]
            + rows + [""])


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# PipeGate benchmarks: {env['date']}", ""]
    lines.append(f"Machine: {env['cpu']} ({env['cpus']} CPUs), {env['memory_gib']} GiB RAM, Linux {env['kernel']}; "
                 f"Python {env['python']}, " + ", ".join(f"{k} {v}" for k, v in env["packages"].items())
                 + f"; {env['tools'].get('wrk') or 'wrk missing'}; {env['tools'].get('iperf3') or 'iperf3 missing'}; "
                 + (f"{env['tools']['haproxy']}; " if env["tools"].get("haproxy") else "")
                 + f"OpenSSL {env['openssl']}.")
    lines.append(f"Code: `{env['git']}`. Command: `{env['command']}` "
                 f"({'quick smoke run, 1 repetition, short durations' if result['quick'] else str(result['repetitions']) + ' repetitions'}, "
                 f"{result['elapsed_s']:.0f} s).")
    if result.get("experiment"):
        lines.append(f"**Experiment, not PipeGate as shipped:** {result['experiment']}.")
    if result.get("profile"):
        lines.append(f"**Profiled run ({result['profile']}): figures are lower than without the profiler.**")
    lines.append("")
    lines += peer_table(result)
    lines.append("Each cell: median (min–max) over the repetitions. *Ratio* = PipeGate median / direct median "
                 "(direct = the same client talking to the same backend with no tunnel, measured in the same run).")
    lines.append("")
    targets = []
    for name, sc in result["scenarios"].items():
        lines.append(f"## {sc.get('title', name)}")
        lines.append("")
        if sc.get("skipped"):
            lines += [f"Skipped: {sc['skipped']}", ""]
            continue
        if sc.get("error"):
            lines += [f"**Error:** `{sc['error']}`", ""]
        if sc.get("how"):
            lines += [sc["how"], ""]
        if sc.get("background_cpu_percent", 0) > 15:
            lines += [f"**Warning:** other processes kept the machine {sc['background_cpu_percent']:.0f} % busy "
                      "just before this scenario; its figures are depressed.", ""]
        figs = sc.get("figures", [])
        if figs:
            lines.append("| figure | PipeGate | direct | ratio | target | met |")
            lines.append("|---|---|---|---|---|---|")
            for f in figs:
                unit = f" {f['unit']}" if f["unit"] else ""
                lines.append(f"| {f['name']}{' (' + f['unit'] + ')' if unit else ''} | {_cell(f['tunnel'])} | "
                             f"{_cell(f['direct'])} | {_num(f.get('ratio')) if 'ratio' in f else '–'} | "
                             f"{f.get('target', '')} | {_met(f.get('target_met')) if 'target' in f else ''} |")
                if "target" in f:
                    targets.append((sc.get("title", name), f"{f['name']}: {f['target']}", _cell(f["tunnel"]) + unit,
                                    f.get("target_met")))
            lines.append("")
        for c in sc.get("checks", []):
            targets.append((sc.get("title", name), c["target"], c["measured"], c["target_met"]))
        if sc.get("checks"):
            for c in sc["checks"]:
                lines.append(f"- {c['target']}: {c['measured']} → {_met(c['target_met'])}")
            lines.append("")
        if sc.get("notes"):
            for n in sc["notes"]:
                lines.append(f"- {n}")
            lines.append("")
        missed = [f for f in figs if f.get("target_met") is False] + [
            c for c in sc.get("checks", []) if c["target_met"] is False]
        if missed and name in FINDINGS:
            lines += [f"**Why {'this target is' if len(missed) == 1 else 'these targets are'} not met.** "
                      + FINDINGS[name], ""]
    if targets:
        lines.append("## Targets (issues 6 and 22)")
        lines.append("")
        lines.append("| scenario | target | measured (median) | met |")
        lines.append("|---|---|---|---|")
        for scenario, text, measured, ok in targets:
            lines.append(f"| {scenario} | {text} | {measured} | {_met(ok)} |")
        lines.append("")
    return "\n".join(lines)
