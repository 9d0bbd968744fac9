"""
PipeGate benchmarks, side by side with the direct path:

    python -m benchmarks                  # every scenario, 3 repetitions (about 9 minutes)
    python -m benchmarks --quick          # smoke run: 1 repetition, short durations, small sizes
    python -m benchmarks --only tcp,udp   # some scenarios
    python -m benchmarks --profile tcp    # one scenario with py-spy (or cProfile) on the services

Needs `wrk`, `iperf3` and redis (`sudo apt-get install wrk iperf3 redis-server redis-tools`);
without one, the scenarios that need it are skipped and said so.  `haproxy` and OpenSSH
(`openssh-server openssh-client`) give the TCP, redis and connect scenarios their peer
rows (an HAProxy TLS pair, `ssh -L`); without them those rows are left out.  Writes benchmarks/results/run-<time>.json, and
for a run of every scenario latest.json and latest.md (latest-quick.* with --quick).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import ssl
import subprocess
import sys
import time

from benchmarks import tools
from benchmarks.procs import (REPO, RESULTS, Interrupted, background_cpu, compile_tree, install_signal_handlers,
                             raise_nofile)
from benchmarks.profiling import Profiler
from benchmarks.report import markdown
from benchmarks.scenarios import SCENARIOS, Ctx

BUSY_WARNING = 15  # percent of all CPUs used by other processes before a scenario


def environment(argv: list[str]) -> dict:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    packages = {}
    for name in ("pipegate", "Twisted", "autobahn", "pyOpenSSL", "cryptography"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "pipegate")
    try:
        from OpenSSL import SSL
        openssl = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()
    except Exception:
        openssl = ssl.OPENSSL_VERSION
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(), "python": platform.python_version(), "packages": packages,
        "openssl": openssl.replace("OpenSSL ", ""), "tools": tools.versions(),
        "git": commit + (" + uncommitted changes in pipegate/" if dirty else ""),
        "command": "python -m benchmarks" + ("" if not argv else " " + shlex.join(argv)),
        "load_average_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, short durations, 64 MiB")
    parser.add_argument("--only", help="comma list of scenarios: " + ", ".join(SCENARIOS))
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--scale", help="comma list of connection counts for the scale scenario "
                                        "(default 1000,10000; 200 with --quick)")
    parser.add_argument("--profile", nargs="?", const="", metavar="SCENARIO",
                        help="profile the services of one scenario (py-spy if installed, else cProfile); "
                             "output in benchmarks/results/profile-*")
    parser.add_argument("--profile-format", choices=("raw", "flamegraph", "speedscope"), default="raw",
                        help="py-spy's output for --profile: collapsed stacks with a summary (raw, the default), "
                             "an SVG flame graph, or speedscope JSON")
    parser.add_argument("--logs", action="store_true", help="keep the services' twistd logs in benchmarks/results/logs/")
    parser.add_argument("--nodelay", nargs="?", const="relay,connector,gateway,provider", metavar="SERVICES",
                        help="experiment: set TCP_NODELAY on every TCP socket of these services (comma list, "
                             "default all four) with a launcher patch (benchmarks/nodelay.py); PipeGate is unchanged")
    parser.add_argument("--extra-args", action="append", default=[], metavar="SERVICE=ARGS",
                        help="experiment: extra options for one service (relay, connector, gateway, provider), "
                             "e.g. 'gateway=--max-window 4194304' (--window must match on both ends); repeatable")
    parser.add_argument("--require-tools", action="store_true",
                        help="exit 2 if wrk, iperf3, redis, haproxy or OpenSSH is missing instead of skipping what needs them (for CI)")
    parser.add_argument("--render", metavar="JSON", help="print the Markdown table of a saved result and exit")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--out", default=RESULTS, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)

    if args.render:
        with open(args.render) as f:
            print(markdown(json.load(f)))
        return 0
    if args.list:
        for name, fn in SCENARIOS.items():
            print(f"{name:12} {(fn.__doc__ or '').strip()}")
        return 0
    names = list(SCENARIOS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    if args.profile is not None:
        if args.profile:
            names = [args.profile]
        if len(names) != 1:
            parser.error("--profile: name one scenario (--profile NAME or --only NAME)")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)} (choose from {', '.join(SCENARIOS)})")

    extra_args: dict[str, list[str]] = {}
    for item in args.extra_args:
        service, eq, value = item.partition("=")
        if not eq or service not in ("relay", "connector", "gateway", "provider"):
            parser.error(f"--extra-args: expected SERVICE=ARGS with SERVICE one of relay, connector, gateway, "
                         f"provider, got {item!r}")
        extra_args.setdefault(service, []).extend(shlex.split(value))
    nodelay = tuple(x.strip() for x in (args.nodelay or "").split(",") if x.strip())
    if set(nodelay) - {"relay", "connector", "gateway", "provider"}:
        parser.error(f"--nodelay: services are relay, connector, gateway, provider, got {args.nodelay!r}")
    experiment = bool(nodelay) or bool(extra_args)

    install_signal_handlers()
    nofile = raise_nofile()
    compile_tree()   # the services load PipeGate from .pyc, as an installed PipeGate
    reps = args.reps or (1 if args.quick else 3)
    if args.scale:
        scale = tuple(int(x) for x in args.scale.split(","))
    else:
        scale = (200,) if args.quick else (1000, 10000)
    fits = tuple(n for n in scale if n * 1.2 + 200 <= nofile)
    if fits != scale:
        print(f"RLIMIT_NOFILE is {nofile}: skipping {sorted(set(scale) - set(fits))} connections in 'scale'")
        scale = fits

    missing = tools.missing_tools()
    skipped = {}
    for tool, scenarios in missing.items():
        hit = [s for s in scenarios if s in names]
        package = tools.PACKAGES.get(tool, tool)
        print(f"{tool} is not installed (sudo apt-get install {package}): skipping {', '.join(scenarios)}")
        for s in hit:
            skipped[s] = f"{tool} is not installed (`sudo apt-get install {package}`)"

    references = tools.missing_references()
    for tool, scenarios in references.items():
        print(f"{tool} is not installed (sudo apt-get install {tools.PACKAGES.get(tool, tool)}): "
              f"{', '.join(scenarios)} without its {tool} reference")

    needed = {tool for tool, scenarios in {**missing, **references}.items() if set(scenarios) & set(names)}
    if needed and args.require_tools:
        print(f"--require-tools: missing {', '.join(sorted(needed))}")
        return 2

    os.makedirs(args.out, exist_ok=True)
    profiler = Profiler(names[0], args.out, fmt=args.profile_format) if args.profile is not None else None
    if profiler is not None:
        print(f"profiling '{names[0]}' with {profiler.tool}")
    ctx = Ctx(quick=args.quick, reps=reps, log_dir=os.path.join(args.out, "logs") if args.logs else None,
              profiler=profiler, scale=scale, nodelay=nodelay, extra_args=extra_args)
    result = {"environment": environment(argv), "quick": args.quick, "repetitions": reps,
              "profile": profiler.tool if profiler else None,
              "experiment": {"nodelay": list(nodelay), "extra_args": extra_args} if experiment else None,
              "scenarios": {}}
    started = time.monotonic()
    failed = False
    interrupted = None
    try:
        for name in names:
            if name in skipped:
                result["scenarios"][name] = {"title": name, "skipped": skipped[name]}
                continue
            busy = background_cpu()
            print(f"[{name}]" + (f"  (warning: the machine is already {busy:.0f} % busy before it starts)"
                                 if busy > BUSY_WARNING else ""), flush=True)
            t0 = time.monotonic()
            try:
                result["scenarios"][name] = SCENARIOS[name](ctx)
            except (Exception, SystemExit) as e:
                failed = True
                print(f"  ERROR: {type(e).__name__}: {e}", flush=True)
                result["scenarios"][name] = {"title": name, "error": f"{type(e).__name__}: {e}"}
            sc = result["scenarios"][name]
            empty = [f["name"] for f in sc.get("figures", []) if f["tunnel"] is None]
            if not sc.get("error") and not sc.get("skipped") and (empty or not sc.get("figures")):
                failed = True
                sc["error"] = "no number for: " + (", ".join(empty) or "any figure")
                print(f"  ERROR: {sc['error']}", flush=True)
            sc["seconds"] = round(time.monotonic() - t0, 1)
            sc["background_cpu_percent"] = busy
    except (KeyboardInterrupt, Interrupted) as e:
        interrupted = type(e).__name__
        print(f"\ninterrupted ({interrupted}); every process started was stopped", flush=True)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    if profiler is not None:
        result["profile_outputs"] = profiler.outputs
        for service, text in profiler.summarize().items():
            print(f"\n--- {service} ({profiler.tool}) ---\n" + "\n".join(text.splitlines()[:40]))

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    result["interrupted"] = interrupted
    run_path = os.path.join(args.out, f"run-{stamp}.json")
    with open(run_path, "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    written = [run_path]
    # latest.md / latest.json: the last complete run as shipped (latest-quick.* for --quick);
    # --only, experiments, profiles and interrupted runs leave them alone.
    if not interrupted and not experiment and profiler is None and names == list(SCENARIOS):
        stem = "latest-quick" if args.quick else "latest"
        for ext, write in (("json", lambda f: json.dump(result, f, indent=1)), ("md", lambda f: f.write(text))):
            path = os.path.join(args.out, f"{stem}.{ext}")
            with open(path, "w") as f:
                write(f)
            written.append(path)
    print()
    print(text)
    print("written: " + ", ".join(os.path.relpath(p) for p in written))
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
