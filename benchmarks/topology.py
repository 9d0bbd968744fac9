"""
The two topologies, each started as real processes on 127.0.0.1:

- L{HttpPlane}: a local app, C{twistd -n pipegate-server} (relay) and
  C{twistd -n pipegate-client} (connector), tunnel id C{bench}; the tunnel's URL
  prefix is C{/bench}.  Started with the helpers of L{benchmarks.transfer}.
- L{PortPlane}: a backend (the TCP/UDP echo server or C{iperf3 -s}),
  C{twistd -n pipegate-gateway} and C{twistd -n pipegate-provider}; one gate port
  carries the backend's port for TCP and for UDP alike.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

from benchmarks import transfer
from benchmarks.procs import (
    Processes, child_env, free_port, python, read_json_line, wait_echo, wait_listening,
)
from benchmarks.tools import iperf3_server_argv

ROUTER_SECRET = "5e" * 32


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system (kernel) CPU time of a process so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def descendants(pid: int) -> list[int]:
    """C{pid} and every process below it (from the parent ids in /proc/*/stat)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(parents.get(p, ()))
    return found


class ProcessTree:
    """A child and the processes it forked (sshd's per-session processes), metered as one."""

    def __init__(self, child) -> None:
        self.name = child.name
        self.pid = child.pid
        self._child = child

    def alive(self) -> bool:
        return self._child.alive()

    def cpu_times(self) -> tuple[float, float]:
        user = system = 0.0
        for pid in descendants(self.pid):
            try:
                u, s = cpu_times(pid)
            except OSError:
                continue
            user, system = user + u, system + s
        return user, system


def _times(child) -> tuple[float, float]:
    return child.cpu_times() if isinstance(child, ProcessTree) else cpu_times(child.pid)


class CpuMeter:
    """CPU use (% of one core) of some processes over one measurement."""

    def __init__(self, children) -> None:
        self.children = [c for c in children if c is not None]

    def __enter__(self):
        import time
        self._t = time.monotonic()
        self._cpu = {c.name: _times(c) for c in self.children}
        return self

    def __exit__(self, *exc) -> None:
        import time
        wall = time.monotonic() - self._t
        spent = {c.name: [b - a for a, b in zip(self._cpu[c.name], _times(c))]
                 for c in self.children if c.alive()}
        # CPU seconds (user + system) over the measurement, per process (tree)
        self.seconds = {name: sum(t) for name, t in spent.items()}
        self.percent = {name: round(100 * sum(t) / wall, 1) for name, t in spent.items()}
        # Of which in the kernel (system time): sockets, TCP, the loopback's delivery.
        self.kernel_percent = {name: round(100 * t[1] / wall, 1) for name, t in spent.items()}


class HttpPlane:
    """app + relay + connector.  C{app}: "small" (1 KiB GETs) or "stream" (transfer.py's app)."""

    def __init__(self, procs: Processes, app: str = "small") -> None:
        self.procs = procs
        env = transfer.relay_env(child_env())
        if app == "small":
            popen = procs.namer("app", stdout=subprocess.PIPE, text=True, env=env)
            proc = popen([python(), "-m", "benchmarks.backends", "small-http"])
            self.app_port = json.loads(read_json_line(proc))["http"]
            ready = "/small"
        else:
            _, self.app_port = transfer.start_app(procs.namer("app", env=env))
            ready = "/big/1"
        self.app = procs.child("app")
        _, self.relay_port = transfer.start_relay(procs.namer("relay"), env, twistd_opts=procs.twistd_opts("relay"),
                                                  extra_args=procs.extra("relay"), twistd=procs.twistd_cmd("relay"))
        self.relay = procs.started("relay")
        transfer.start_connector(procs.namer("connector"), env, self.app_port, self.relay_port,
                                 twistd_opts=procs.twistd_opts("connector"), ready_path=ready,
                                 extra_args=procs.extra("connector"), twistd=procs.twistd_cmd("connector"))
        self.connector = procs.started("connector")

    @property
    def services(self):
        return [self.relay, self.connector]


def start_redis(procs: Processes, name: str = "redis") -> int:
    """C{redis-server} on 127.0.0.1 (no persistence, no protected-mode surprises); its port."""
    port = free_port()
    procs.popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--logfile", "", "--loglevel", "warning", "--maxclients", "1000"],
                name=name, stdout=subprocess.DEVNULL, env=child_env())
    wait_listening(port, "tcp", procs=procs)
    return port


class PortPlane:
    """backend + gateway + provider.  C{backend}: "echo", "iperf3" or "redis" (redis-server for TCP, the
    echo server for UDP)."""

    def __init__(self, procs: Processes, backend: str = "echo") -> None:
        self.procs = procs
        env = child_env(PIPEGATE_ROUTER=ROUTER_SECRET)
        if backend in ("echo", "redis"):
            popen = procs.namer("backend", stdout=subprocess.PIPE, text=True, env=env)
            ports = json.loads(read_json_line(popen([python(), "-m", "benchmarks.backends", "echo"])))
            self.backend_tcp, self.backend_udp = ports["tcp"], ports["udp"]
            self.direct_tcp, self.direct_udp = self.backend_tcp, self.backend_udp
            self.echo_tcp = self.backend_tcp
            if backend == "redis":
                self.backend_tcp = self.direct_tcp = start_redis(procs)
        else:
            # Two iperf3 servers (one answers one test at a time): one behind the gate, one direct.
            for name in ("backend", "backend-direct"):
                port = free_port()
                procs.popen(iperf3_server_argv(port), name=name, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, stop_signal=signal.SIGTERM)
                wait_listening(port, "tcp", procs=procs)
                if name == "backend":
                    self.backend_tcp = self.backend_udp = port
                else:
                    self.direct_tcp = self.direct_udp = port
        self.backend = procs.child("backend")
        mux = free_port()
        self.gate = free_port()
        gateway = procs.twistd("gateway", "pipegate-gateway",
                               ["--mux", f"tcp:{mux}:interface=127.0.0.1", "--listen", "127.0.0.1",
                                # every client is 127.0.0.1: no per-IP caps or rate (the totals still apply)
                                "--max-conns-per-ip", "0", "--conn-rate-per-ip", "0", "--max-flows-per-ip", "0"], env)
        wait_listening(mux, "tcp", procs=procs)
        services = json.dumps([
            {"gatePort": self.gate, "serviceHost": "127.0.0.1", "servicePort": self.backend_tcp, "protocol": "tcp"},
            {"gatePort": self.gate, "serviceHost": "127.0.0.1", "servicePort": self.backend_udp, "protocol": "udp"},
        ])
        provider = procs.twistd("provider", "pipegate-provider",
                                ["--services", services, "--connect", f"tcp:127.0.0.1:{mux}",
                                 "--max-backends-per-ip", "0"], env)
        # A gate opens once the provider's link is admitted and its routes are in.
        wait_listening(self.gate, "tcp", procs=procs)
        wait_listening(self.gate, "udp", procs=procs)
        if backend in ("echo", "redis"):
            wait_echo(self.gate if backend == "echo" else self.echo_tcp, procs=procs)
        self.gateway = procs.started(gateway.name)
        self.provider = procs.started(provider.name)

    @property
    def services(self):
        return [self.gateway, self.provider]


# Two HAProxy processes in the gateway's and the provider's places: the same shape (one
# process per side, one thread each, TLS between them) written in C, as a yardstick for
# what this machine allows.  Unlike the mux, each client connection gets its own TLS
# connection between the two.
_HAPROXY_CONFIG = """\
global
    nbthread 1
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client  60s
    timeout server  60s
listen pipegate_reference
    bind 127.0.0.1:{listen}
    server next 127.0.0.1:{to}{tls}
"""


class HAProxyPair:
    """haproxy-front (plain TCP in, TLS out) + haproxy-back (TLS in, plain TCP to C{backend_port})."""

    def __init__(self, procs: Processes, backend_port: int, workdir: str) -> None:
        from pipegate.mux.tls import generated_certificate

        pem = os.path.join(workdir, "haproxy.pem")
        with open(pem, "wb") as f:
            f.write(generated_certificate("haproxy-reference").dumpPEM())
        self.front, hop = free_port(), free_port()
        configs = {"haproxy-back": dict(listen=f"{hop} ssl crt {pem}", to=backend_port, tls=""),
                   "haproxy-front": dict(listen=self.front, to=hop, tls=" ssl verify none")}
        for name, values in configs.items():
            path = os.path.join(workdir, name + ".cfg")
            with open(path, "w") as f:
                f.write(_HAPROXY_CONFIG.format(**values))
            procs.popen(["haproxy", "-f", path, "-db"], name=name, stdout=subprocess.DEVNULL)
        wait_listening(hop, "tcp", procs=procs)
        wait_listening(self.front, "tcp", procs=procs)
        self.services = [procs.child("haproxy-front"), procs.child("haproxy-back")]


# `ssh -L` through a local sshd: what a user would type instead of a tunnel.  The sshd is
# a throwaway: its own host key, authorized key and config in a temporary directory, on a
# free 127.0.0.1 port; the system's sshd and its configuration are never touched.
_SSHD_CONFIG = """\
ListenAddress 127.0.0.1:{port}
HostKey {workdir}/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile {workdir}/authorized_keys
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowTcpForwarding local
PermitOpen {permit}
X11Forwarding no
PrintMotd no
LogLevel ERROR
"""


class SshTunnel:
    """C{sshd} on 127.0.0.1 and C{ssh -N -L} through it to C{backend_ports} (local port per backend)."""

    def __init__(self, procs: Processes, backend_ports: list[int], workdir: str) -> None:
        import getpass
        import shutil

        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        for key in ("ssh_host_ed25519_key", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pipegate-bench",
                            "-f", os.path.join(workdir, key)], check=True, stdin=subprocess.DEVNULL)
        with open(os.path.join(workdir, "id_ed25519.pub")) as f, \
                open(os.path.join(workdir, "authorized_keys"), "w") as out:
            out.write(f.read())
        port = free_port()
        config = os.path.join(workdir, "sshd_config")
        with open(config, "w") as f:
            f.write(_SSHD_CONFIG.format(port=port, workdir=workdir,
                                        permit=" ".join(f"127.0.0.1:{p}" for p in backend_ports)))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        procs.popen([sshd, "-D", "-e", "-f", config], name="sshd", stdout=subprocess.DEVNULL)
        wait_listening(port, "tcp", procs=procs)
        self.local = {b: free_port() for b in backend_ports}
        argv = ["ssh", "-N", "-F", "/dev/null", "-p", str(port), "-i", os.path.join(workdir, "id_ed25519"),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR"]
        for backend, local in self.local.items():
            argv += ["-L", f"127.0.0.1:{local}:127.0.0.1:{backend}"]
        procs.popen(argv + [f"{getpass.getuser()}@127.0.0.1"], name="ssh", stdout=subprocess.DEVNULL)
        for local in self.local.values():
            wait_listening(local, "tcp", procs=procs)
        # sshd forks a process per session: meter the listener with its children
        self.services = [ProcessTree(procs.child("sshd")), procs.child("ssh")]
