"""
The visitor policy of one tunnel: who may call it (sans-IO, no reactor).

The connector declares it at login (C{--basic-auth}, C{--allow}, C{--deny}); it travels
in the C{PipeGate-Visitor-Policy} header of the WebSocket upgrade (docs/protocol.md 1.1),
and the relay applies it to every public request of the tunnel: IP rules first (403),
then credentials (401).  Passwords never leave the connector: it sends
PBKDF2-HMAC-SHA256 hashes salted with the tunnel and user name, so that every connector
of one tunnel declares the same bytes for the same credentials, and the relay compares
the caller's hashed password in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
from collections import OrderedDict

import attrs

HEADER = "PipeGate-Visitor-Policy"
ACCEPTED = "enforced"        # the relay's answer header value: it understood the policy
KDF_ITERATIONS = 2000        # a constant of the login format (docs/protocol.md 1.1)
MAX_USERS = 64
MAX_RULES = 256
MAX_HEADER = 16384
MAX_USER = 128
HASH_RATE = 50.0             # password hashes per second and tunnel (about 6% of a core)
HASH_BURST = 100.0


class VisitorPolicyError(ValueError):
    """A policy is malformed; the message says what (and never holds a password)."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def hash_password(tunnel_id: str, user: str, password: str) -> bytes:
    """The 32-byte hash the connector sends and the relay recomputes from the caller's password."""
    salt = b"pipegate-visitor\x00" + tunnel_id.lower().encode() + b"\x00" + user.encode()
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, KDF_ITERATIONS)


def parse_network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise VisitorPolicyError(f"{text!r} is not an IP address or CIDR") from None


def parse_credentials(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise VisitorPolicyError("expected USER:PASSWORD with both parts non-empty")
    if len(user) > MAX_USER or any(c in user for c in "\r\n\x00"):
        raise VisitorPolicyError(f"user name must be 1-{MAX_USER} characters without control characters")
    return user, password


def _unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address):
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


@attrs.frozen
class Verdict:
    """C{outcome}: allowed, ip_denied, no_credentials, bad_credentials or throttled."""

    outcome: str
    user: str | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome == "allowed"


@attrs.frozen
class VisitorPolicy:
    """
    C{users}: (user, hash) pairs; C{allow}/C{deny}: networks.  Equal policies compare equal
    whatever the order they were declared in (the fields are sorted).
    """

    users: tuple[tuple[str, bytes], ...] = ()
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def build(cls, users=(), allow=(), deny=()) -> VisitorPolicy:
        names = [u for u, _ in users]
        if len(set(names)) != len(names):
            raise VisitorPolicyError("a user name appears twice")
        if len(names) > MAX_USERS:
            raise VisitorPolicyError(f"more than {MAX_USERS} users")
        if len(allow) + len(deny) > MAX_RULES:
            raise VisitorPolicyError(f"more than {MAX_RULES} allow/deny rules")
        key = lambda n: (n.version, n.network_address, n.prefixlen)  # noqa: E731
        return cls(tuple(sorted(users)), tuple(sorted(set(allow), key=key)),
                   tuple(sorted(set(deny), key=key)))

    @classmethod
    def from_options(cls, tunnel_id: str, credentials=(), allow=(), deny=()) -> VisitorPolicy:
        """From the connector's C{USER:PASSWORD}, C{CIDR} strings (raises L{VisitorPolicyError})."""
        users = []
        for text in credentials:
            user, password = parse_credentials(text)
            users.append((user, hash_password(tunnel_id, user, password)))
        return cls.build(users, [parse_network(a) for a in allow], [parse_network(d) for d in deny])

    @property
    def empty(self) -> bool:
        return not (self.users or self.allow or self.deny)

    # -- the wire (docs/protocol.md 1.1)
    def encode(self) -> str:
        """The header value: compact JSON, hashes as lowercase hex."""
        body = {}
        if self.users:
            body["basic"] = [[u, h.hex()] for u, h in self.users]
        if self.allow:
            body["allow"] = [str(n) for n in self.allow]
        if self.deny:
            body["deny"] = [str(n) for n in self.deny]
        return json.dumps(body, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def decode(cls, text: str | None) -> VisitorPolicy:
        """The policy a login declares; no header (or an empty one) is the empty policy."""
        if text is None or not text.strip():
            return EMPTY
        if len(text) > MAX_HEADER:
            raise VisitorPolicyError(f"longer than {MAX_HEADER} bytes")
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):  # deep nesting overflows the decoder's stack
            raise VisitorPolicyError("not JSON (or nested too deeply)") from None
        if not isinstance(body, dict) or set(body) - {"basic", "allow", "deny"}:
            raise VisitorPolicyError("expected an object with basic, allow and deny only")
        users = []
        for item in _list(body, "basic"):
            if (not isinstance(item, list) or len(item) != 2 or not all(isinstance(i, str) for i in item)):
                raise VisitorPolicyError("basic: expected [user, hex hash] pairs")
            user, digest = item
            if not 0 < len(user) <= MAX_USER or ":" in user:
                raise VisitorPolicyError("basic: bad user name")
            try:
                raw = binascii.unhexlify(digest)
            except (binascii.Error, ValueError):
                raise VisitorPolicyError("basic: hash is not hex") from None
            if len(raw) != 32:
                raise VisitorPolicyError("basic: hash is not 32 bytes")
            users.append((user, raw))
        nets = {}
        for name in ("allow", "deny"):
            items = _list(body, name)
            if not all(isinstance(i, str) for i in items):
                raise VisitorPolicyError(f"{name}: expected a list of CIDR strings")
            nets[name] = [parse_network(i) for i in items]
        return cls.build(users, nets["allow"], nets["deny"])

    # -- the decision
    def ip_allowed(self, ip: str) -> bool:
        """Deny rules win; with allow rules the caller must match one."""
        if not self.allow and not self.deny:
            return True
        try:
            address = _unmapped(ipaddress.ip_address(ip.split("%", 1)[0]))
        except ValueError:
            return False  # a unix socket or an unparsable peer: only a rule-less policy admits it
        if any(address in net for net in self.deny):
            return False
        return not self.allow or any(address in net for net in self.allow)


def _list(body: dict, name: str) -> list:
    value = body.get(name, [])
    if not isinstance(value, list):
        raise VisitorPolicyError(f"{name}: expected a list")
    return value


EMPTY = VisitorPolicy()


def basic_credentials(header: bytes | None) -> tuple[str, str] | None:
    """(user, password) from C{Authorization: Basic ...}, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class VisitorGate:
    """
    One tunnel's policy applied to callers, with a small cache of Authorization values
    that passed (a browser repeats the same header on every request; the hash is computed
    once, not per request).  The cache keys are SHA-256 digests, never the header itself.

    Hashing costs about a millisecond, so a stranger guessing passwords could spend the
    relay's CPU: each tunnel may hash at most C{hash_rate} passwords a second (burst
    C{hash_burst}); beyond that, credentials not in the cache get C{throttled} (429)
    without a hash, and only this tunnel's new visitors wait.
    """

    CACHE = 64

    def __init__(self, tunnel_id: str, policy: VisitorPolicy, hash_rate: float = HASH_RATE,
                 hash_burst: float = HASH_BURST) -> None:
        self.tunnel_id = tunnel_id
        self.policy = policy
        self._users = dict(policy.users)
        self._good: OrderedDict[bytes, str] = OrderedDict()
        self._rate, self._burst = hash_rate, hash_burst
        self._level, self._last = hash_burst, None   # the hash budget, a token bucket

    def check(self, ip: str, authorization: bytes | None, now: float = 0.0) -> Verdict:
        """IP rules first (403 even with good credentials), then credentials (401)."""
        if not self.policy.ip_allowed(ip):
            return Verdict("ip_denied")
        if not self._users:
            return Verdict("allowed")
        if not authorization:
            return Verdict("no_credentials")
        key = hashlib.sha256(authorization).digest()
        user = self._good.get(key)
        if user is not None:
            self._good.move_to_end(key)
            return Verdict("allowed", user)
        parsed = basic_credentials(authorization)
        if parsed is None:
            return Verdict("bad_credentials")
        if self._last is not None and now > self._last:
            self._level = min(self._burst, self._level + (now - self._last) * self._rate)
        self._last = now if self._last is None else max(self._last, now)
        if self._level < 1:
            return Verdict("throttled")
        self._level -= 1
        user, password = parsed
        expected = self._users.get(user)
        # Hash even for an unknown user, so that the time taken does not tell which names exist.
        computed = hash_password(self.tunnel_id, user, password)
        if expected is None or not hmac.compare_digest(computed, expected):
            return Verdict("bad_credentials")
        self._good[key] = user
        if len(self._good) > self.CACHE:
            self._good.popitem(last=False)
        return Verdict("allowed", user)
