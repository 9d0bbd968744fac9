"""
Hostile input to every decoder (issue 7): services JSON, ingress-policy JSON, PROXY
protocol headers, /unlimited tokens, JWTs, and the mux link fed through a real
protocol object.  The frame codecs themselves are fuzzed in test_frames.py and
test_mux_frames.py; here the property is the one a public listener needs:

- the only exception is the documented one (ServiceError, PolicyError, ValueError,
  TokenInvalid, TokenError), never a TypeError/KeyError/RecursionError...;
- a decoder given N bytes allocates a bounded multiple of N (tracemalloc peak);
- a mux link fed garbage or hostile frames closes only itself, with a logged reason,
  and never lets an exception escape into the reactor.

hypothesis runs with a bounded number of examples and no deadline, so CI time stays
bounded on a slow machine.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import tracemalloc

from hypothesis import HealthCheck, assume, given, settings, strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pipegate import auth
from pipegate.core import policy, policydoc
from pipegate.mux import frames
from pipegate.mux.hello import hello_mac
from pipegate.mux.session import LinkConfig, LinkFactory
from pipegate.ports import proxyprotocol, services, unlimited
from pipegate.ports.gateway import Gateway, GatewayConfig
from pipegate.ports.provider import Provider, ProviderConfig
from tests.support import behind_proxy_listener
from tests.test_mux_frames import frame_strategy

FUZZ = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])

# -- JSON documents, generic and shaped like the real ones ------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["*", "tcp", "udp", "TCP", "127.0.0.1", "10.0.0.0/8", "::1", "fe80::1%eth0",
                     "v1", "v2", "", " ", "0", "65536", "__proto__"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=25,
)
SERVICE_KEYS = ["gatePort", "serviceHost", "servicePort", "protocol", "tags", "proxyProtocol",
                "gatePorts", "protocols", "labels", "serviceHosts"]
service_entries = st.dictionaries(st.sampled_from(SERVICE_KEYS), json_values | st.integers(-5, 70000),
                                  max_size=6)
service_docs = st.one_of(json_values, st.lists(service_entries, max_size=4),
                         st.fixed_dictionaries({"services": st.lists(service_entries, max_size=4)}))
RULE_KEYS = ["allow", "bandwidthLimit", "labels", "expireAt", "desc", "onlyPorts", "excludePorts",
             "onlyProtocols", "excludeProtocols", "mbps", "burstMbps", "direction", "from", "to"]
rule_values = st.recursive(
    scalars | st.integers(0, 70000),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(RULE_KEYS), inner, max_size=4)),
    max_leaves=15,
)
rules = st.dictionaries(st.sampled_from(RULE_KEYS), rule_values, max_size=5)
ip_patterns = st.one_of(st.sampled_from(["*", "127.0.0.1", "10.0.0.0/8", "::/0", "::ffff:1.2.3.4",
                                         "1.2.3.4/33", "fe80::1%eth0", "300.1.1.1"]),
                        st.text(max_size=15))
policy_docs = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"defaults": rules | json_values,
                                        "ips": st.dictionaries(ip_patterns, rules | st.none(), max_size=4)}),
)


def bounded_peak(testcase, func, *args, factor: int = 200, floor: int = 4 << 20):
    """Run func(*args) and return its result; fail if it allocated far more than its input."""
    size = sum(len(a) for a in args if isinstance(a, (bytes, str)))
    tracemalloc.start()
    try:
        result = func(*args)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    testcase.assertLess(peak, max(floor, factor * size), f"peak allocation {peak} for {size} input bytes")
    return result


class ServicesJSON(unittest.TestCase):
    @FUZZ
    @given(service_docs)
    def test_documents_give_services_or_service_error(self, doc):
        try:
            parsed = services.parse_services(doc, "fuzz.json")
        except services.ServiceError as e:
            self.assertNotIn("\n", str(e))
            return
        for service in parsed:
            self.assertTrue(1 <= service.gate_port <= 65535)
            self.assertIn(service.protocol, ("tcp", "udp"))

    @FUZZ
    @given(service_docs)
    def test_filters_give_filters_or_service_error(self, doc):
        try:
            services.parse_filters(doc, "fuzz.json")
        except services.ServiceError:
            pass

    @FUZZ
    @given(st.binary(max_size=400))
    def test_inline_bytes_as_source(self, data):
        text = data.decode("utf-8", "replace")
        try:
            services.load_services("[" + text)
        except services.ServiceError:
            pass

    def test_deep_nesting_is_a_service_error(self):
        for doc in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
            self.assertRaises(services.ServiceError, services.load_services, doc)


class PolicyJSON(unittest.TestCase):
    @FUZZ
    @given(policy_docs)
    def test_documents_give_policy_or_policy_error(self, doc):
        try:
            parsed = policydoc.parse_policy(doc, "fuzz.json")
        except policy.PolicyError as e:
            self.assertNotIn("\n", str(e))
            return
        # Whatever parses can decide for any caller without raising.
        for ip in ("127.0.0.1", "::1", "10.1.2.3"):
            policy.decide([parsed], ip, 443, "tcp", 0)

    @FUZZ
    @given(st.lists(policy_docs, min_size=1, max_size=3))
    def test_merge_then_ship_round_trip(self, docs):
        try:
            parsed, shipped = policydoc.load_policy([json.dumps(d, allow_nan=True) for d in docs])
        except policy.PolicyError:
            return
        self.assertEqual(policydoc.policy_from_bytes(shipped, "shipped"), parsed)

    @FUZZ
    @given(st.binary(max_size=600))
    def test_shipped_bytes_from_a_provider(self, data):
        # The gateway decodes these from every ROUTES frame: fail closed, never crash.
        try:
            bounded_peak(self, policydoc.policy_from_bytes, data, "provider")
        except policy.PolicyError:
            pass

    def test_deeply_nested_shipped_policy(self):
        for data in (b"[" * 200_000, b'{"ips":' * 60_000 + b"1" + b"}" * 60_000):
            self.assertRaises(policy.PolicyError, policydoc.policy_from_bytes, data, "provider")


def plain(ip: str):
    """An address as the PROXY header carries it: no zone, an IPv4-mapped IPv6 address as IPv4."""
    address = ipaddress.ip_address(ip.partition("%")[0])
    return getattr(address, "ipv4_mapped", None) or address


ips = st.one_of(st.ip_addresses().map(str), st.sampled_from(["::ffff:10.0.0.1", "fe80::1%eth0"]))
ports = st.integers(0, 65535)


class ProxyProtocol(unittest.TestCase):
    @FUZZ
    @given(st.sampled_from(["v1", "v2"]), st.sampled_from(["tcp", "udp", "TCP"]), ips, ports, ips, ports,
           st.binary(max_size=20))
    def test_encoder_round_trip(self, version, protocol, src, sport, dst, dport, rest):
        # Read back by Twisted's own PROXY protocol listener (the haproxy: endpoint).
        header = proxyprotocol.header(version, protocol, src, sport, dst, dport)
        # Twisted 26.10's v1 reader refuses the short "PROXY UNKNOWN" the spec allows (UDP,
        # mixed families); tests/test_proxyprotocol.py has HAProxy read those.
        assume(not header.startswith(b"PROXY UNKNOWN"))
        seen = behind_proxy_listener(header + rest)
        self.assertEqual((seen.data, seen.closed), (rest, False))
        if b"\r\n\r\n\x00\r\nQUIT\n" == header[:12] and header[12] & 0x0F == 0:
            return  # v2 LOCAL (mixed families): the real addresses stand
        self.assertEqual((plain(seen.peer.host), seen.peer.port, plain(seen.host.host), seen.host.port),
                         (plain(src), sport, plain(dst), dport))

    @FUZZ
    @given(st.text(max_size=40), st.integers(-2, 70000), st.one_of(st.text(max_size=5), st.integers()))
    def test_encoder_refuses_bad_values_with_value_error(self, ip, port, protocol):
        try:
            proxyprotocol.header("v2", protocol, ip, port, "127.0.0.1", 80)
        except ValueError:
            pass


SECRET = "fuzz-unlimited-secret"


def encrypt(payload: bytes, secret: str = SECRET) -> str:
    """OpenSSL-enc compatible encryption of arbitrary plaintext (see make_token)."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    salt = os.urandom(unlimited.SALT_LENGTH)
    key, iv = unlimited._key_iv(secret, salt)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(payload) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    raw = unlimited.MAGIC + salt + enc.update(padded) + enc.finalize()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class UnlimitedTokens(unittest.TestCase):
    @FUZZ
    @given(st.text(max_size=200))
    def test_random_text_is_invalid_token(self, token):
        self.assertRaises(unlimited.TokenInvalid, unlimited.decrypt_token, token, SECRET)

    @FUZZ
    @given(st.binary(max_size=120))
    def test_random_base64_is_invalid_token(self, raw):
        token = base64.b64encode(unlimited.MAGIC + raw).decode()
        self.assertRaises(unlimited.TokenInvalid, unlimited.decrypt_token, token, SECRET)

    @FEW
    @given(st.one_of(json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
                     st.binary(max_size=60)),
           st.sampled_from(["127.0.0.1", "::ffff:127.0.0.1", "10.0.0.1", " ", "x"]))
    def test_encrypted_arbitrary_payload_gets_a_status(self, plaintext, caller):
        gate = unlimited.UnlimitedGate(secret=SECRET)
        status, body = gate.check(encrypt(plaintext), caller, 1_700_000_000_000)
        self.assertIn(status, (200, 400, 403, 409, 429))
        json.dumps(body, allow_nan=False)   # the answer is always valid JSON

    @FEW
    @given(st.dictionaries(st.sampled_from(["ip", "timestamp", "ts", "other"]),
                           st.one_of(scalars, st.just(1_700_000_000_000)), max_size=4))
    def test_encrypted_claims_get_a_status(self, claims):
        gate = unlimited.UnlimitedGate(secret=SECRET)
        token = encrypt(json.dumps(claims, allow_nan=True).encode())
        for _ in range(2):  # second time: replay detection path
            status, body = gate.check(token, "127.0.0.1", 1_700_000_000_000)
            self.assertIn(status, (200, 400, 403, 409, 429))
            json.dumps(body, allow_nan=False)

    @FUZZ
    @given(st.one_of(st.none(), st.binary(max_size=80)), st.binary(max_size=200),
           st.one_of(st.none(), st.sampled_from([b"application/json", b"application/x-www-form-urlencoded",
                                                 b"text/plain; charset=x", b"\xff\xfe"])))
    def test_extract_payload(self, query, body, content_type):
        found = unlimited.extract_payload(query, body, content_type)
        self.assertTrue(found is None or isinstance(found, str))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


JWT = auth.JWTSettings(secret="fuzz-jwt-secret-fuzz-jwt-secret-0123456789")


class JWTs(unittest.TestCase):
    @FUZZ
    @given(json_values | st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "b64"]),
                                         scalars, max_size=4),
           json_values, st.binary(max_size=40))
    def test_forged_segments(self, header, payload, signature):
        token = ".".join((b64(json.dumps(header, allow_nan=True).encode()),
                          b64(json.dumps(payload, allow_nan=True).encode()), b64(signature)))
        self.assertRaises(auth.TokenError, auth.verify, JWT, token, 1_700_000_000)
        subject = auth.unverified_subject(token)
        self.assertTrue(subject is None or isinstance(subject, str))

    @FUZZ
    @given(st.lists(st.binary(max_size=60), min_size=1, max_size=4))
    def test_random_segments(self, parts):
        token = ".".join(b64(p) for p in parts)
        self.assertRaises(auth.TokenError, auth.verify, JWT, token, 1_700_000_000)
        auth.unverified_subject(token)

    @FUZZ
    @given(st.text(max_size=100))
    def test_unverified_subject_of_any_text(self, text):
        subject = auth.unverified_subject(text)
        self.assertTrue(subject is None or isinstance(subject, str))


# -- a mux link fed hostile bytes through the real protocol object ----------------------------

ROUTER = bytes(range(32))
EXPORTER = b"E" * 32


class _SocketOptions:
    """Stands in for a UDP port's socket: records the options the gateway sets (buffer sizes)."""

    def __init__(self) -> None:
        self.options = {}

    def setsockopt(self, level, option, value):
        self.options[level, option] = value


class _UDPPort:
    def __init__(self, port: int) -> None:
        self.port = port
        self.handle = _SocketOptions()

    def getHandle(self):
        return self.handle

    def stopListening(self):
        return None

    def write(self, data, addr=None):
        pass


class MemoryReactor(MemoryReactorClock):
    """MemoryReactorClock plus a recording listenUDP (the gateway opens UDP gates too)."""

    def __init__(self):
        super().__init__()
        self.udpPorts = {}

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.udpPorts[port] = protocol
        return _UDPPort(port)


class FuzzLink:
    """One MuxLink of a real node on a StringTransport, admitted or not."""

    def __init__(self, node, role: int, admitted: bool, peer_role: int) -> None:
        config = LinkConfig(secret=ROUTER, role=role, handshake_timeout=5)
        self.link = LinkFactory(node, config, node.clock if hasattr(node, "clock") else node.reactor,
                                False).buildProtocol(None)
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.link._exporter = EXPORTER   # what handshakeCompleted would have read from TLS
        if admitted:
            nonce = os.urandom(32)
            mac = hello_mac(ROUTER, EXPORTER, peer_role, nonce, True)
            self.link.dataReceived(frames.encode(frames.Hello(peer_role, nonce, mac)))
            assert self.link.admitted

    @property
    def closed(self) -> bool:
        return self.link.closed or self.transport.disconnecting

    def close(self) -> None:
        if not self.link.closed:
            self.link.fail("test over")
        self.link.connectionLost(None)


class MuxLinkStreams(unittest.TestCase):
    """A gateway (and a provider) on a memory reactor, fed fuzzed frames by a peer link."""

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def node(self, kind):
        reactor = MemoryReactor()
        if kind == "gateway":
            node = Gateway(GatewayConfig(), reactor)
        else:
            node = Provider(ProviderConfig(services=()), reactor)
        node.startService()
        return node, reactor

    def assert_no_escapes(self):
        errors = [e for e in self.events if e.get("log_failure") is not None]
        self.assertEqual(errors, [])
        self.events.clear()

    def feed(self, fl, chunks):
        for chunk in chunks:
            fl.link.dataReceived(chunk)   # must never raise
            if fl.closed:
                break

    @FUZZ
    @given(st.lists(st.binary(max_size=80), max_size=6))
    def test_garbage_before_admission_closes_only_that_link(self, chunks):
        gw, _ = self.node("gateway")
        good = FuzzLink(gw, frames.ROLE_GATEWAY, True, frames.ROLE_PROVIDER)
        bad = FuzzLink(gw, frames.ROLE_GATEWAY, False, frames.ROLE_PROVIDER)
        self.feed(bad, chunks)
        self.assertFalse(bad.link.admitted)
        self.assertFalse(good.closed)
        self.assertIn(good.link, gw.links)
        self.assertNotIn(bad.link, gw.links)
        for fl in (good, bad):
            fl.close()
        gw.stopService()
        self.assert_no_escapes()

    @FUZZ
    @given(st.sampled_from([frames.ROLE_PROVIDER, frames.ROLE_GATEWAY, frames.ROLE_OBSERVER, 0, 9]),
           st.binary(min_size=32, max_size=32), st.booleans())
    def test_forged_or_replayed_hello_is_refused(self, role, mac, replay):
        gw, _ = self.node("gateway")
        fl = FuzzLink(gw, frames.ROLE_GATEWAY, False, frames.ROLE_PROVIDER)
        nonce = os.urandom(32)
        if replay:
            # A Hello that was valid on another TLS session (another exporter value).
            mac = hello_mac(ROUTER, b"X" * 32, frames.ROLE_PROVIDER, nonce, True)
        try:
            data = frames.encode(frames.Hello(role, nonce, mac))
        except frames.FrameError:
            data = frames.encode(frames.Hello(frames.ROLE_PROVIDER, nonce, mac))
        fl.link.dataReceived(data)
        self.assertFalse(fl.link.admitted)
        self.assertTrue(fl.closed)
        self.assertFalse(gw.links)
        fl.close()
        gw.stopService()
        self.assert_no_escapes()

    @FUZZ
    @given(st.lists(frame_strategy, max_size=12), st.sampled_from(["gateway", "provider"]))
    def test_admitted_peer_sends_arbitrary_frames(self, sent, kind):
        node, reactor = self.node(kind)
        if kind == "gateway":
            role, peer = frames.ROLE_GATEWAY, frames.ROLE_PROVIDER
        else:
            role, peer = frames.ROLE_PROVIDER, frames.ROLE_GATEWAY
        other = FuzzLink(node, role, True, peer)
        fl = FuzzLink(node, role, True, peer)
        data = b"".join(frames.encode(f) for f in sent)
        self.feed(fl, [data[i:i + 997] for i in range(0, len(data), 997)])
        self.assertFalse(other.closed)
        for fl_ in (fl, other):
            fl_.close()
        node.stopService()
        if kind == "gateway":
            self.assertEqual(node.routes, {})
        self.assert_no_escapes()
        reactor.advance(3600)

    @FEW
    @given(st.lists(st.binary(min_size=1, max_size=200), min_size=1, max_size=10))
    def test_admitted_peer_sends_garbage(self, chunks):
        gw, _ = self.node("gateway")
        other = FuzzLink(gw, frames.ROLE_GATEWAY, True, frames.ROLE_PROVIDER)
        fl = FuzzLink(gw, frames.ROLE_GATEWAY, True, frames.ROLE_PROVIDER)
        self.feed(fl, chunks)
        self.assertFalse(other.closed)
        if fl.closed:
            self.assertTrue(any("closing link" in str(e.get("log_format")) for e in self.events))
        for fl_ in (fl, other):
            fl_.close()
        gw.stopService()
        self.assert_no_escapes()

    def test_huge_declared_length_is_refused_before_buffering(self):
        gw, _ = self.node("gateway")
        fl = FuzzLink(gw, frames.ROLE_GATEWAY, False, frames.ROLE_PROVIDER)
        fl.link.dataReceived(b"\xff\xff\xff\xff" + b"x" * 100)
        self.assertTrue(fl.closed)
        self.assertEqual(fl.link.decoder.buffered, 0)
        fl.close()
        gw.stopService()
        self.assert_no_escapes()

    def test_routes_with_unreadable_policy_fail_closed(self):
        gw, reactor = self.node("gateway")
        fl = FuzzLink(gw, frames.ROLE_GATEWAY, True, frames.ROLE_PROVIDER)
        route = frames.Route(9000, "tcp", "h", 80, policy=b"[" * 60_000)
        fl.link.dataReceived(frames.encode(frames.Routes((route,))))
        self.assertFalse(fl.closed)
        self.assertEqual(gw.gates, {})
        self.assertEqual(reactor.tcpServers, [])
        fl.close()
        gw.stopService()
        self.events.clear()

