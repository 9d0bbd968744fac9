"""
PROXY protocol headers: known byte vectors from the spec, round trips, refusal of
malformed input, and a real consumer (HAProxy with C{accept-proxy}) reading our
headers and passing the declared client address on to a backend.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import sys

from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.trial import unittest

from pipegate.ports import proxyprotocol as pp
from tests.support import debian_tool
from tests.test_ports_e2e import free_ports

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

CASES = [
    ("tcp", "192.168.0.1", 56324, "192.168.0.11", 443),
    ("udp", "10.0.0.1", 53, "10.0.0.2", 5353),
    ("tcp", "2001:db8::1", 1, "2001:db8::2", 65535),
    ("udp", "fe80::1", 0, "::1", 9),
    ("tcp", "0.0.0.0", 0, "255.255.255.255", 65535),
]


class V1HeaderTests(unittest.TestCase):

    def test_spec_vectors(self):
        self.assertEqual(pp.v1_header("tcp", "192.168.0.1", 56324, "192.168.0.11", 443),
                         b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
        self.assertEqual(pp.v1_header("TCP", "2001:db8::1", 56324, "2001:db8::11", 443),
                         b"PROXY TCP6 2001:db8::1 2001:db8::11 56324 443\r\n")

    def test_ipv6_is_written_in_canonical_form(self):
        self.assertEqual(pp.v1_header("tcp", "2001:DB8:0:0::1", 1, "::0001", 2),
                         b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n")

    def test_zone_is_dropped(self):
        self.assertEqual(pp.v1_header("tcp", "fe80::1%eth0", 1, "fe80::2", 2),
                         b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n")

    def test_udp_is_unknown(self):
        self.assertEqual(pp.v1_header("udp", "10.0.0.1", 1, "10.0.0.2", 2), b"PROXY UNKNOWN\r\n")

    def test_mixed_families_are_unknown(self):
        self.assertEqual(pp.v1_header("tcp", "10.0.0.1", 1, "::1", 2), b"PROXY UNKNOWN\r\n")
        self.assertEqual(pp.v1_header("tcp", "::1", 1, "10.0.0.1", 2), b"PROXY UNKNOWN\r\n")

    def test_v4_mapped_address_next_to_ipv4_is_unmapped(self):
        self.assertEqual(pp.v1_header("tcp", "::ffff:10.0.0.1", 1, "10.0.0.2", 2),
                         b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n")
        self.assertEqual(pp.v1_header("tcp", "10.0.0.1", 1, "::ffff:10.0.0.2", 2),
                         b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n")

    def test_longest_header_fits(self):
        full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
        h = pp.v1_header("tcp", full, 65535, full, 65535)
        self.assertLessEqual(len(h), pp.V1_MAX_LENGTH)

    def test_bad_arguments(self):
        for args in [("sctp", "1.2.3.4", 1, "1.2.3.4", 2),
                     ("tcp", "1.2.3", 1, "1.2.3.4", 2),
                     ("tcp", "host.example", 1, "1.2.3.4", 2),
                     ("tcp", "1.2.3.4", -1, "1.2.3.4", 2),
                     ("tcp", "1.2.3.4", 1, "1.2.3.4", 65536),
                     ("tcp", "1.2.3.4", True, "1.2.3.4", 2),
                     ("tcp", "1.2.3.4", "80", "1.2.3.4", 2),
                     ("udp", "1.2.3.4", 1, "1.2.3.4", 70000)]:
            self.assertRaises(ValueError, pp.v1_header, *args)


class V2HeaderTests(unittest.TestCase):

    def test_tcp4_vector(self):
        self.assertEqual(
            pp.v2_header("tcp", "192.168.0.1", 56324, "192.168.0.11", 443),
            SIG + b"\x21\x11\x00\x0c" + b"\xc0\xa8\x00\x01" + b"\xc0\xa8\x00\x0b" + b"\xdc\x04\x01\xbb")

    def test_udp4_vector(self):
        self.assertEqual(
            pp.v2_header("udp", "10.0.0.1", 53, "10.0.0.2", 5353),
            SIG + b"\x21\x12\x00\x0c" + b"\x0a\x00\x00\x01\x0a\x00\x00\x02" + b"\x00\x35\x14\xe9")

    def test_tcp6_vector(self):
        self.assertEqual(
            pp.v2_header("tcp", "2001:db8::1", 1, "::1", 2),
            SIG + b"\x21\x21\x00\x24"
            + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01"
            + b"\x00" * 15 + b"\x01"
            + b"\x00\x01\x00\x02")

    def test_udp6_transport(self):
        self.assertEqual(pp.v2_header("udp", "::1", 1, "::2", 2)[12:16], b"\x21\x22\x00\x24")

    def test_mixed_families_are_local_unspec(self):
        self.assertEqual(pp.v2_header("tcp", "10.0.0.1", 1, "::1", 2), SIG + b"\x20\x00\x00\x00")
        self.assertEqual(pp.v2_header("udp", "::1", 1, "10.0.0.1", 2), SIG + b"\x20\x00\x00\x00")

    def test_bad_arguments(self):
        for args in [("raw", "1.2.3.4", 1, "1.2.3.4", 2),
                     ("tcp", "1.2.3.4.5", 1, "1.2.3.4", 2),
                     ("udp", "1.2.3.4", 1, "1.2.3.4", 65536),
                     ("tcp", None, 1, "1.2.3.4", 2)]:
            self.assertRaises(ValueError, pp.v2_header, *args)


class DispatchTests(unittest.TestCase):

    def test_versions(self):
        args = ("tcp", "10.0.0.1", 1, "10.0.0.2", 2)
        self.assertEqual(pp.header("v1", *args), pp.v1_header(*args))
        self.assertEqual(pp.header("v2", *args), pp.v2_header(*args))

    def test_other_versions_refused(self):
        for version in ("v3", "1", "2", "V1", "", None, 1):
            self.assertRaises(ValueError, pp.header, version, "tcp", "10.0.0.1", 1, "10.0.0.2", 2)


class RoundTripTests(unittest.TestCase):

    def check(self, info, protocol, src_ip, src_port, dst_ip, dst_port):
        self.assertEqual(info["command"], "PROXY")
        self.assertEqual(info["protocol"], protocol)
        self.assertEqual(info["family"], "inet" if ":" not in src_ip else "inet6")
        self.assertEqual((info["src_ip"], info["src_port"], info["dst_ip"], info["dst_port"]),
                         (src_ip, src_port, dst_ip, dst_port))
        self.assertEqual(info["tlvs"], [])

    def test_v2_round_trips(self):
        for case in CASES:
            info, rest = pp.parse_v2(pp.v2_header(*case) + b"payload\r\n")
            self.assertEqual(rest, b"payload\r\n")
            self.assertEqual(info["version"], 2)
            self.check(info, *case)

    def test_v1_round_trips_tcp(self):
        for case in CASES:
            if case[0] != "tcp":
                continue
            info, rest = pp.parse_v1(pp.v1_header(*case) + b"GET / HTTP/1.1\r\n")
            self.assertEqual(rest, b"GET / HTTP/1.1\r\n")
            self.assertEqual(info["version"], 1)
            self.check(info, *case)

    def test_v1_udp_round_trips_as_unknown(self):
        info, rest = pp.parse_v1(pp.v1_header("udp", "10.0.0.1", 1, "10.0.0.2", 2))
        self.assertEqual(rest, b"")
        self.assertEqual((info["version"], info["command"], info["family"], info["protocol"]),
                         (1, "PROXY", "unspec", None))
        self.assertIsNone(info["src_ip"])

    def test_v2_local_round_trip(self):
        info, rest = pp.parse_v2(pp.v2_header("tcp", "10.0.0.1", 1, "::1", 2) + b"x")
        self.assertEqual(rest, b"x")
        self.assertEqual((info["version"], info["command"], info["family"], info["src_ip"]),
                         (2, "LOCAL", "unspec", None))

    def test_parse_dispatches(self):
        for version in ("v1", "v2"):
            info, rest = pp.parse(pp.header(version, *CASES[0]) + b"z")
            self.assertEqual((info["version"], info["src_ip"], rest), (int(version[1]), "192.168.0.1", b"z"))

    def test_every_prefix_is_incomplete(self):
        for data in (pp.v1_header(*CASES[0]), pp.v1_header(*CASES[2]), pp.v1_header(*CASES[1]),
                     pp.v2_header(*CASES[0]), pp.v2_header(*CASES[2]),
                     pp.v2_header("tcp", "10.0.0.1", 1, "::1", 2)):
            parser = pp.parse_v1 if data.startswith(b"PROXY") else pp.parse_v2
            for n in range(len(data)):
                self.assertRaises(pp.Incomplete, parser, data[:n])
                self.assertRaises(pp.Incomplete, pp.parse, data[:n])
            parser(data)

    def test_incomplete_is_a_value_error(self):
        self.assertTrue(issubclass(pp.Incomplete, ValueError))


class ParseV1Tests(unittest.TestCase):

    def test_spec_vector(self):
        info, rest = pp.parse_v1(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /")
        self.assertEqual(rest, b"GET /")
        self.assertEqual(info, {"version": 1, "command": "PROXY", "family": "inet", "protocol": "tcp",
                                "src_ip": "192.168.0.1", "src_port": 56324,
                                "dst_ip": "192.168.0.11", "dst_port": 443, "tlvs": []})

    def test_unknown_ignores_the_rest_of_the_line(self):
        info, rest = pp.parse_v1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nrest")
        self.assertEqual((info["family"], rest), ("unspec", b"rest"))

    def test_length_bound(self):
        line = b"PROXY UNKNOWN "
        exact = line + b"x" * (pp.V1_MAX_LENGTH - len(line) - 2) + b"\r\n"
        self.assertEqual(len(exact), 107)
        self.assertEqual(pp.parse_v1(exact + b"tail")[1], b"tail")
        too_long = line + b"x" * (pp.V1_MAX_LENGTH - len(line) - 1) + b"\r\n"
        self.assertRaises(ValueError, pp.parse_v1, too_long)
        e = self.assertRaises(ValueError, pp.parse_v1, b"PROXY TCP4 " + b"1" * 200)
        self.assertNotIsInstance(e, pp.Incomplete)

    def test_malformed(self):
        for data in [
            b"GET / HTTP/1.1\r\n\r\n",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",                # LF alone
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",             # two spaces
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",            # trailing space
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 ::1 ::2 1 2\r\n",                      # family mismatch
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 ::ffff:1.2.3.4 ::1%eth0 1 2\r\n",
            b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 001.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 host 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n",       # Arabic-Indic digit
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n",
            b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
            b"PROXY \xff",
            b"PROXY\r\n",
            b"PROXY \r\n",
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c",               # a v2 header
        ]:
            e = self.assertRaises(ValueError, pp.parse_v1, data)
            self.assertFalse(isinstance(e, pp.Incomplete), data)


def v2(command_byte: int, family_byte: int, block: bytes, length: int | None = None) -> bytes:
    return SIG + bytes([command_byte, family_byte]) + struct.pack(
        "!H", len(block) if length is None else length) + block


INET_BLOCK = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1234, 80)


class ParseV2Tests(unittest.TestCase):

    def test_tlvs_after_the_addresses(self):
        tlvs = b"\x02\x00\x0bexample.com" + b"\x04\x00\x00" + b"\xe0\x00\x02ab"
        info, rest = pp.parse_v2(v2(0x21, 0x11, INET_BLOCK + tlvs) + b"data")
        self.assertEqual(rest, b"data")
        self.assertEqual(info["tlvs"], [(0x02, b"example.com"), (0x04, b""), (0xE0, b"ab")])
        self.assertEqual((info["src_ip"], info["src_port"], info["dst_ip"], info["dst_port"]),
                         ("10.0.0.1", 1234, "10.0.0.2", 80))

    def test_local_discards_the_block(self):
        info, rest = pp.parse_v2(v2(0x20, 0x11, b"\x01\x02\x03") + b"r")
        self.assertEqual((info["command"], info["family"], info["src_ip"], info["tlvs"], rest),
                         ("LOCAL", "inet", None, [], b"r"))

    def test_unspec_proxy_has_no_addresses(self):
        info, _ = pp.parse_v2(v2(0x21, 0x00, b""))
        self.assertEqual((info["command"], info["family"], info["protocol"], info["src_ip"]),
                         ("PROXY", "unspec", None, None))

    def test_unix(self):
        block = b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")
        info, rest = pp.parse_v2(v2(0x21, 0x31, block) + b"!")
        self.assertEqual((info["family"], info["protocol"], info["src_ip"], info["dst_ip"],
                          info["src_port"], rest), ("unix", "tcp", "/run/a.sock", "/run/b.sock", None, b"!"))

    def test_malformed(self):
        for data in [
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + INET_BLOCK,
            v2(0x11, 0x11, INET_BLOCK),             # version 1 nibble
            v2(0x31, 0x11, INET_BLOCK),             # version 3
            v2(0x22, 0x11, INET_BLOCK),             # command 2
            v2(0x2F, 0x11, INET_BLOCK),
            v2(0x21, 0x41, INET_BLOCK),             # family 4
            v2(0x21, 0x13, INET_BLOCK),             # transport 3
            v2(0x21, 0x11, INET_BLOCK[:11]),        # length too short for AF_INET
            v2(0x21, 0x21, INET_BLOCK),             # too short for AF_INET6
            v2(0x21, 0x31, b"\0" * 215),            # too short for AF_UNIX
            v2(0x21, 0x11, INET_BLOCK + b"\x01\x00"),           # truncated TLV header
            v2(0x21, 0x11, INET_BLOCK + b"\x01\x00\x05abc"),    # TLV overruns
            v2(0x21, 0x00, b"\x01"),                 # junk where TLVs should be
        ]:
            e = self.assertRaises(ValueError, pp.parse_v2, data)
            self.assertFalse(isinstance(e, pp.Incomplete), data)

    def test_declared_length_longer_than_data_is_incomplete(self):
        data = v2(0x21, 0x11, INET_BLOCK, length=0xFFFF)
        self.assertRaises(pp.Incomplete, pp.parse_v2, data)
        # ... and complete once the declared bytes arrive (padded with NOOP TLVs).
        pad = 0xFFFF - len(INET_BLOCK)
        info, rest = pp.parse_v2(data + b"\x04" + struct.pack("!H", pad - 3) + b"\0" * (pad - 3) + b"x")
        self.assertEqual((rest, len(info["tlvs"])), (b"x", 1))


# --- a real consumer: HAProxy ---------------------------------------------------

HAPROXY = "/usr/sbin/haproxy"


def haproxy_or_skip(testcase) -> str:
    return debian_tool(testcase, "haproxy", HAPROXY)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class HAProxyProcess(ProcessProtocol):

    def __init__(self) -> None:
        self.output = b""
        self.ended = defer.Deferred()
        self.done = False

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.done = True
        self.ended.callback(None)


async def start_haproxy(case: unittest.TestCase, path: str, config: str, ports) -> HAProxyProcess:
    """Run C{haproxy -f config} until C{case} ends; return once it accepts on every port."""
    process = HAProxyProcess()
    reactor.spawnProcess(process, path, [path, "-f", config, "-db"], env=dict(os.environ))
    case.addCleanup(stop_haproxy, process)
    waited = 0.0
    while not all(accepts(port) for port in ports):
        if process.done:
            case.fail(f"haproxy exited: {process.output.decode(errors='replace')}")
        if waited > 10:
            case.fail(f"haproxy did not listen within 10 s: {process.output.decode(errors='replace')}")
        await task.deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
    return process


async def stop_haproxy(process: HAProxyProcess) -> None:
    if not process.done:
        process.transport.signalProcess("TERM")
        killer = reactor.callLater(5, lambda: process.done or process.transport.signalProcess("KILL"))
        await process.ended
        if killer.active():
            killer.cancel()


class HeaderReader(Protocol):
    """Backend behind HAProxy: reads the PROXY header HAProxy sends, echoes the rest."""

    def connectionMade(self) -> None:
        self.buffer = b""
        self.info = None
        self.lost = defer.Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.info is not None:
            self.transport.write(data)
            return
        self.buffer += data
        try:
            self.info, rest = self.factory.parse(self.buffer)
        except pp.Incomplete:
            return
        except ValueError as e:
            self.factory.errors.append(e)
            self.transport.loseConnection()
            return
        self.factory.headers.append(self.info)
        if rest:
            self.transport.write(rest)

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class HeaderReaderFactory(Factory):
    protocol = HeaderReader

    def __init__(self, parse) -> None:
        self.parse = parse
        self.headers: list[dict] = []
        self.errors: list[Exception] = []
        self.connections: list[HeaderReader] = []


class Client(Protocol):

    def __init__(self, first: bytes, expect: int) -> None:
        self.first = first
        self.expect = expect
        self.received = b""
        self.echoed = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self) -> None:
        self.local_port = self.transport.getHost().port
        self.transport.write(self.first)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.expect and not self.echoed.called:
            self.echoed.callback(self.received)

    def connectionLost(self, reason) -> None:
        if not self.echoed.called:
            self.echoed.errback(reason)
        self.lost.callback(None)


CONFIG = """\
global
    maxconn 64

defaults
    mode tcp
    timeout connect 5s
    timeout client 5s
    timeout server 5s

frontend to_v1
    bind 127.0.0.1:{front_v1} accept-proxy
    default_backend send_v1

frontend to_v2
    bind 127.0.0.1:{front_v2} accept-proxy
    default_backend send_v2

backend send_v1
    server reader 127.0.0.1:{back_v1} send-proxy

backend send_v2
    server reader 127.0.0.1:{back_v2} send-proxy-v2
"""


class HAProxyMissingTests(unittest.TestCase):
    """Without haproxy the consumer tests skip, except under CI=true where they fail."""

    def setUp(self):
        self.patch(sys.modules[__name__], "HAPROXY", "/nonexistent/haproxy")
        self.patch(shutil, "which", lambda name: None)

    def test_skips_outside_ci(self):
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CI"})
        self.assertRaises(unittest.SkipTest, haproxy_or_skip, self)

    def test_fails_under_ci(self):
        self.patch(os, "environ", dict(os.environ, CI="true"))
        self.assertRaises(self.failureException, haproxy_or_skip, self)


class HAProxyTests(unittest.TestCase):
    """
    The test client sends our header to an HAProxy frontend with C{accept-proxy};
    HAProxy forwards to a backend with C{send-proxy} (v1) or C{send-proxy-v2}, and
    the address HAProxy writes there is the one it understood from our header.
    """

    timeout = 60

    async def start_haproxy(self):
        path = haproxy_or_skip(self)
        self.readers = {"v1": HeaderReaderFactory(pp.parse_v1), "v2": HeaderReaderFactory(pp.parse_v2)}
        back = {}
        for version, factory in self.readers.items():
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(self.close_reader, port, factory)
            back[version] = port.getHost().port
        v1, v2 = free_ports(2)
        self.front = {"v1": v1, "v2": v2}
        directory = self.mktemp()
        os.makedirs(directory)
        config = os.path.join(directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(CONFIG.format(front_v1=self.front["v1"], front_v2=self.front["v2"],
                                  back_v1=back["v1"], back_v2=back["v2"]))
        return await start_haproxy(self, path, config, self.front.values())

    async def close_reader(self, port, factory: HeaderReaderFactory) -> None:
        await port.stopListening()
        for connection in factory.connections:
            if not connection.lost.called:
                connection.transport.loseConnection()
            await connection.lost

    async def relay(self, front: str, first: bytes, data: bytes = b"hello through haproxy") -> tuple[Client, dict]:
        """Send C{first + data} to frontend C{front}; wait for the echo; return the header
        the backend behind it received."""
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.front[front])
        client = Client(first + data, len(data))
        await endpoints.connectProtocol(endpoint, client)
        try:
            echoed = await client.echoed
        finally:
            client.transport.loseConnection()
            await client.lost
        self.assertEqual(echoed, data)
        reader = self.readers[front]
        self.assertEqual(reader.errors, [])
        self.assertEqual(len(reader.headers), 1)
        return client, reader.headers.pop()

    async def through_haproxy(self, version: str, src_ip: str, src_port: int, dst_ip: str, dst_port: int):
        await self.start_haproxy()
        ours = pp.header(version, "tcp", src_ip, src_port, dst_ip, dst_port)
        claimed, _ = pp.parse(ours)
        for front in ("v1", "v2"):
            _, seen = await self.relay(front, ours)
            self.assertEqual(seen["version"], int(front[1]))
            self.assertEqual(seen["command"], "PROXY")
            self.assertEqual(seen["protocol"], "tcp")
            self.assertEqual(
                (seen["family"], seen["src_ip"], seen["src_port"], seen["dst_ip"], seen["dst_port"]),
                (claimed["family"], src_ip, src_port, dst_ip, dst_port))

    async def test_v1_tcp4(self):
        await self.through_haproxy("v1", "203.0.113.7", 40123, "198.51.100.9", 443)

    async def test_v1_tcp6(self):
        await self.through_haproxy("v1", "2001:db8::7", 40123, "2001:db8:1::9", 8443)

    async def test_v2_tcp4(self):
        await self.through_haproxy("v2", "203.0.113.8", 1, "198.51.100.10", 65535)

    async def test_v2_tcp6(self):
        await self.through_haproxy("v2", "2001:db8::8", 65535, "2001:db8:1::10", 22)

    async def test_unknown_and_local_use_the_real_connection(self):
        """Mixed families: v1 UNKNOWN and v2 LOCAL are accepted, and HAProxy falls back
        to the real client and frontend addresses."""
        await self.start_haproxy()
        for version in ("v1", "v2"):
            ours = pp.header(version, "tcp", "203.0.113.1", 1, "2001:db8::1", 2)
            for front in ("v1", "v2"):
                client, seen = await self.relay(front, ours)
                self.assertEqual(
                    (seen["src_ip"], seen["src_port"], seen["dst_ip"], seen["dst_port"]),
                    ("127.0.0.1", client.local_port, "127.0.0.1", self.front[front]))
