"""
The test helpers that other tests trust: the free ports handed to processes a test starts.
"""

from __future__ import annotations

import socket

from twisted.trial import unittest

from tests import support


class FreePorts(unittest.TestCase):
    def test_below_the_ephemeral_range_distinct_and_free(self):
        # A port from bind(0) lies in the ephemeral range, where the kernel may give it to the
        # next outgoing connection as its source port before the service binds it (seen as a
        # flaky "address already in use" in a full run on a busy machine).
        low, _ = support.ephemeral_ports()
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            ports = support.free_ports(20, kind)
            self.assertEqual(len(set(ports)), 20)
            for port in ports:
                self.assertTrue(1024 <= port < low, (port, low))
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("127.0.0.1", port))

    def test_a_taken_port_is_skipped(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", support.free_port()))
        taken.listen(1)
        busy = taken.getsockname()[1]
        free = support.free_port()

        class Picks:
            def __init__(self, ports):
                self.ports = list(ports)

            def randrange(self, start, stop):
                return self.ports.pop(0)

        self.patch(support, "_ports", Picks([busy, busy, free]))
        self.assertEqual(support.free_ports(1), [free])
