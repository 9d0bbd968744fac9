"""
Experiment only (`python -m benchmarks --nodelay`): imported by the twistd launcher
before twistd runs, sets TCP_NODELAY on every TCP socket Twisted creates or accepts in
that service, to measure what Nagle's algorithm costs the tunnels.  PipeGate's own code
is not changed; this shows what a fix there could gain.
"""

from __future__ import annotations

import socket

from twisted.internet import tcp


def _nodelay(sock) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


_server_init = tcp.Server.__init__
_create_socket = tcp.BaseClient.createInternetSocket


def _patched_server_init(self, sock, *args, **kwargs):
    _server_init(self, sock, *args, **kwargs)
    _nodelay(sock)


def _patched_create_socket(self):
    sock = _create_socket(self)
    _nodelay(sock)
    return sock


tcp.Server.__init__ = _patched_server_init
tcp.BaseClient.createInternetSocket = _patched_create_socket
