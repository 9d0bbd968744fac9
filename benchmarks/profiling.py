"""
`--profile`: profile the PipeGate services of a scenario.

With py-spy on PATH (`pip install py-spy`), every service gets `py-spy record --pid PID
--nonblocking --function --format raw` once it is ready (so startup is not in the
profile), stopped with SIGINT when the scenario ends; the output is collapsed stacks
(flamegraph.pl or https://speedscope.app read them), plus a text summary of the
functions with the most samples (self and inclusive).  Without py-spy, the services run
under twistd's own cProfile support (`--profiler cprofile --savestats`, which writes the
stats when the reactor stops, before twistd re-raises SIGTERM; a bare
`python -m cProfile` would never get to write them), and the summary comes from pstats.
"""

from __future__ import annotations

import collections
import io
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys

SERVICES = ("relay", "connector", "gateway", "provider")


class Profiler:
    # py-spy's output formats: collapsed stacks (summarized here), an SVG flame graph, speedscope JSON
    FORMATS = {"raw": "collapsed.txt", "flamegraph": "svg", "speedscope": "speedscope.json"}

    def __init__(self, scenario: str, outdir: str, rate: int = 250, fmt: str = "raw") -> None:
        if fmt not in self.FORMATS:
            raise ValueError(f"profile format {fmt!r}: one of {', '.join(self.FORMATS)}")
        self.format = fmt
        self.scenario = scenario
        self.outdir = outdir
        self.rate = rate
        # py-spy installed into the same virtualenv need not be on PATH
        self.pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
        self.outputs: dict[str, str] = {}
        os.makedirs(outdir, exist_ok=True)

    @property
    def tool(self) -> str:
        return "py-spy" if self.pyspy else "cProfile"

    def _path(self, name: str, ext: str) -> str:
        return os.path.join(self.outdir, f"profile-{self.scenario}-{name}.{ext}")

    def twistd_options(self, name: str) -> list[str]:
        if self.pyspy or name not in SERVICES:
            return []
        path = self._path(name, "pstats")
        self.outputs[name] = path
        return [f"--profile={path}", "--profiler=cprofile", "--savestats"]

    def attach(self, procs, child) -> None:
        if not self.pyspy or child.name not in SERVICES:
            return
        path = self._path(child.name, self.FORMATS[self.format])
        self.outputs[child.name] = path
        procs.popen([self.pyspy, "record", "--pid", str(child.pid), "--rate", str(self.rate), "--nonblocking",
                     "--function", "--format", self.format, "--output", path],
                    name=f"py-spy-{child.name}", stop_signal=signal.SIGINT,
                    stdout=subprocess.DEVNULL, stderr=open(self._path(child.name, "py-spy.log"), "ab"))

    def summarize(self, top: int = 25) -> dict[str, str]:
        """Write and return a text summary per service."""
        summaries = {}
        for name, path in self.outputs.items():
            if not os.path.exists(path):
                summaries[name] = f"(no profile written: {path})"
                continue
            if self.pyspy and self.format != "raw":
                summaries[name] = f"({self.format} written: {path}; open it in a browser or speedscope.app)"
                continue
            text = _summarize_collapsed(path, top) if self.pyspy else _summarize_pstats(path, top)
            with open(self._path(name, "top.txt"), "w") as f:
                f.write(text)
            summaries[name] = text
        return summaries


_LOC = re.compile(r" \((?:.*/)?(site-packages/|lib/python3\.\d+/)?([^()]*)\)$")


def _short(frame: str) -> str:
    m = _LOC.search(frame)
    if not m:
        return frame
    return frame[:m.start()] + f" ({m.group(2)})"


def _summarize_collapsed(path: str, top: int) -> str:
    self_samples: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [_short(x) for x in stack.split(";")]
            self_samples[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    if not total:
        return "no samples (the process was idle)\n"
    # py-spy leaves out a thread that sleeps in epoll, but counts one that is runnable and
    # waiting for a core inside a syscall (a send that woke its peer): on a busy machine the
    # syscalls look heavier than their CPU time.
    out = [f"{total} samples (busy only; idle samples are not recorded; time preempted inside a syscall is)",
           "", "self %  function"]
    for fr, n in self_samples.most_common(top):
        out.append(f"{100 * n / total:6.1f}  {fr}")
    out += ["", "incl %  function (below the reactor's main loop)"]
    shown = 0
    for fr, n in incl.most_common():
        if n >= 0.9 * total:
            continue  # twistd, the reactor's run/mainLoop: in every sample
        out.append(f"{100 * n / total:6.1f}  {fr}")
        shown += 1
        if shown == top:
            break
    return "\n".join(out) + "\n"


def _summarize_pstats(path: str, top: int) -> str:
    buf = io.StringIO()
    st = pstats.Stats(path, stream=buf)
    st.strip_dirs().sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()
