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


class CpuMeter:
    """CPU use (% of one core) of some processes over one measurement."""

    def __init__(self, children) -> None:
        self.children = [c for c in children if c is not None]

    def __enter__(self):
        import time
        self._t = time.monotonic()
        self._cpu = {c.name: cpu_times(c.pid) for c in self.children}
        return self

    def __exit__(self, *exc) -> None:
        import time
        wall = time.monotonic() - self._t
        spent = {c.name: [b - a for a, b in zip(self._cpu[c.name], cpu_times(c.pid))]
                 for c in self.children if c.alive()}
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


class PortPlane:
    """backend + gateway + provider.  C{backend}: "echo" or "iperf3"."""

    def __init__(self, procs: Processes, backend: str = "echo") -> None:
        self.procs = procs
        env = child_env(PIPEGATE_ROUTER=ROUTER_SECRET)
        if backend == "echo":
            popen = procs.namer("backend", stdout=subprocess.PIPE, text=True, env=env)
            ports = json.loads(read_json_line(popen([python(), "-m", "benchmarks.backends", "echo"])))
            self.backend_tcp, self.backend_udp = ports["tcp"], ports["udp"]
            self.direct_tcp, self.direct_udp = self.backend_tcp, self.backend_udp
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
                                # every client is 127.0.0.1: no per-IP caps (the totals still apply)
                                "--max-conns-per-ip", "0", "--max-flows-per-ip", "0"], env)
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
        if backend == "echo":
            wait_echo(self.gate, procs=procs)
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
