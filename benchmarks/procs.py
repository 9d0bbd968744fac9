"""
Child processes of the benchmark harness: start, wait until ready, measure, stop.

Every process the harness starts goes through one L{Processes} registry, which stops
them all (SIGTERM, then SIGKILL after a grace period) when the registry's C{with}
block ends, whatever ends it: a finished scenario, an exception, Ctrl-C or SIGTERM to
the harness.  Children run in their own session, so a Ctrl-C in the terminal reaches
only the harness, which then stops them in order; on Linux they also get
C{PR_SET_PDEATHSIG}, so even a harness killed with SIGKILL takes them along.
"""

from __future__ import annotations

import ctypes
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time

from benchmarks.transfer import TWISTD, proc_status

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")

TWISTD_NODELAY = [sys.executable, "-c", "import benchmarks.nodelay; from twisted.scripts.twistd import run; run()"]

_libc = None


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the harness (its parent) dies."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def child_env(**extra: str) -> dict:
    """The harness's environment without any PIPEGATE_* setting of the user's, plus C{extra}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEGATE_")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def compile_tree() -> None:
    """
    Compile the tree's C{pipegate} package and plugin module to C{__pycache__}, as an install
    does (pip compiles what it installs), so that the services load PipeGate from C{.pyc} as
    they load Twisted and Autobahn.  Where C{PYTHONDONTWRITEBYTECODE} is set (this VM, many CI
    images) a checkout is otherwise compiled from source at every start, which leaves a
    relay's idle RSS 0.35-0.4 MiB above a deployed one's (benchmarks/README.md, "Relay idle
    memory, fourth pass").
    """
    import compileall

    for directory in ("pipegate", os.path.join("twisted", "plugins")):
        compileall.compile_dir(os.path.join(REPO, directory), quiet=1)


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to its hard limit (children inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class Interrupted(BaseException):
    """SIGTERM or SIGHUP reached the harness."""


def install_signal_handlers() -> None:
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    # A harness started in the background by a script inherits SIGINT ignored; Ctrl-C must still work.
    signal.signal(signal.SIGINT, signal.default_int_handler)


class Child:
    def __init__(self, name: str, popen: subprocess.Popen, stop_signal=signal.SIGTERM) -> None:
        self.name = name
        self.popen = popen
        self.stop_signal = stop_signal

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss(self) -> int:
        return proc_status(self.pid, "VmRSS")

    def hwm(self) -> int:
        return proc_status(self.pid, "VmHWM")

    def alive(self) -> bool:
        return self.popen.poll() is None


class Processes:
    """A registry of the children of one topology; a context manager that stops them all."""

    def __init__(self, log_dir: str | None = None, profile=None, nodelay=(),
                 extra_args: dict | None = None) -> None:
        self.children: list[Child] = []
        self.log_dir = log_dir
        self.profile = profile   # a Profiler, or None
        # Experiments: TCP_NODELAY on every socket of these services; extra options per service.
        self.nodelay = frozenset(nodelay)
        self.extra_args = extra_args or {}

    def twistd_cmd(self, name: str) -> list[str]:
        return TWISTD_NODELAY if name in self.nodelay else TWISTD

    def extra(self, name: str) -> list[str]:
        return list(self.extra_args.get(name, ()))

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def popen(self, argv: list[str], *, name: str, stop_signal=signal.SIGTERM, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        # In REPO: `python -c ...` (twistd) puts its working directory first on sys.path, ahead of
        # child_env's PYTHONPATH, so a child started elsewhere imports that directory's pipegate
        # (connect_ab run from a checkout compared that checkout with itself).
        kwargs.setdefault("cwd", REPO)
        if "stderr" not in kwargs and self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            kwargs["stderr"] = open(os.path.join(self.log_dir, name + ".stderr"), "ab")
        popen = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)
        self.children.append(Child(name, popen, stop_signal))
        return popen

    def child(self, name: str) -> Child:
        for c in reversed(self.children):
            if c.name == name:
                return c
        raise KeyError(name)

    def namer(self, name: str, **extra):
        """A C{popen(argv, **kwargs)} callable that registers its process as C{name}."""
        def popen(argv, **kwargs):
            return self.popen(argv, name=name, **extra, **kwargs)
        return popen

    def twistd_opts(self, name: str) -> list[str]:
        """twistd's own options for service C{name}: its log file, and the profiler's if any."""
        log = os.path.join(self.log_dir, name + ".log") if self.log_dir else "/dev/null"
        opts = ["-l", log]
        if self.profile is not None:
            opts += self.profile.twistd_options(name)
        return opts

    def started(self, name: str) -> Child:
        """Call once service C{name} is ready: attaches the sampling profiler if any."""
        child = self.child(name)
        if self.profile is not None:
            self.profile.attach(self, child)
        return child

    def twistd(self, name: str, plugin: str, args: list[str], env: dict) -> Child:
        """Start C{twistd -n --pidfile= -l LOG PLUGIN ARGS} as a real process (not yet ready)."""
        self.popen(self.twistd_cmd(name) + ["-n", "--pidfile="] + self.twistd_opts(name) + [plugin] + args
                   + self.extra(name), name=name, env=env)
        return self.children[-1]

    def check_alive(self) -> None:
        for c in self.children:
            code = c.popen.poll()
            if code is not None and c.stop_signal is not None:
                raise RuntimeError(f"{c.name} (pid {c.pid}) exited early with status {code}")

    def stop_all(self, grace: float = 10.0) -> None:
        """Stop every child, the last started first; SIGKILL what is still there after C{grace}."""
        children, self.children = self.children, []
        for c in reversed(children):
            if c.alive():
                try:
                    c.popen.send_signal(c.stop_signal or signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    c.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    c.popen.kill()
        for c in children:
            if c.alive():
                c.popen.kill()
            try:
                c.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (c.popen.stdout, c.popen.stderr):
                if stream is not None:
                    stream.close()


def run_tool(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a load generator to completion (killed on timeout, Ctrl-C or error)."""
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=_die_with_parent)
    try:
        out, err = popen.communicate(timeout=timeout)
    except BaseException:
        popen.kill()
        popen.communicate()
        raise
    return subprocess.CompletedProcess(argv, popen.returncode, out, err)


# -- readiness
# Ports free_port handed out in this process, not handed out again: the kernel may give the
# same port to two bind(0) calls in a row once the first socket is closed.  A topology whose
# mux and gate ports came out equal would have its gateway's TLS listener take (silently) the
# echo meant for the gate, whose bind fails: wait_echo's 30 s of "timed out", which one full
# run showed once (reproduced by giving a gate its gateway's mux port).
_HANDED_OUT: set[int] = set()


_PICKS = random.Random(os.urandom(16))


def _below_ephemeral() -> int:
    """
    A random port below the kernel's ephemeral range: bind(0) draws from that range, and so
    does every outgoing connection's source port, so a port from bind(0) may be taken by the
    next connection (the scenarios make thousands) before the service binds it.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return _PICKS.randrange(10000, max(low, 10001))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free for TCP and UDP alike (so a gate can use both), not returned before."""
    for _ in range(100):
        port = _below_ephemeral()
        try:
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        if port in _HANDED_OUT:
            continue
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port")


def _listening(port: int, proto: str) -> bool:
    want = f"{port:04X}"
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].rsplit(":", 1)[1] == want and (proto == "udp" or fields[3] == "0A"):
                        return True
        except OSError:
            pass
    return False


def wait_listening(port: int, proto: str = "tcp", timeout: float = 30, procs: Processes | None = None) -> None:
    """Wait until something listens on TCP (or has bound UDP) C{port}, from /proc/net."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening(port, proto):
            return
        if procs is not None:
            procs.check_alive()
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {proto} port {port} to open")


def wait_echo(port: int, timeout: float = 30, procs: Processes | None = None) -> None:
    """Wait until a TCP connect + 1-byte echo on C{port} works."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"r")
                if s.recv(1) == b"r":
                    return
        except OSError as e:
            last = e
        if procs is not None:
            procs.check_alive()
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for an echo on port {port} ({last})")


def read_json_line(popen: subprocess.Popen, timeout: float = 30) -> str:
    """The first stdout line of a backend that prints its ports."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(popen.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise RuntimeError(f"no output from {popen.args[:3]} within {timeout} s")
    line = popen.stdout.readline()
    if not line:
        raise RuntimeError(f"{popen.args[:3]} exited before printing its port")
    return line


def background_cpu(seconds: float = 1.0) -> float:
    """Percent of all CPUs busy over C{seconds} (from /proc/stat), before a scenario starts anything."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return round(100 * (1 - (i1 - i0) / max(1, t1 - t0)), 1)


def python() -> str:
    return sys.executable
