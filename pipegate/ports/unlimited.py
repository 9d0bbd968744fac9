"""
The C{/unlimited} override: a caller proves knowledge of the gateway's secret with
a short-lived token naming its own IP, and is granted unlimited use for a while.

Sans-IO: no sockets, no twisted.web.  L{extract_payload} finds the token in a
request, L{UnlimitedGate.check} decides the response (status and JSON body) and
the HTTP layer only has to pass them through and apply a 200's grant.

Token: base64url (padding optional; standard base64 accepted too) of the output
of C{openssl enc -aes-256-cbc -pbkdf2 -iter 10000 -md sha256 -salt}, i.e.
C{b"Salted__" + salt(8) + AES-256-CBC(PKCS#7(plaintext))} with key and IV from
PBKDF2-HMAC-SHA256(secret, salt, 10000, 48); plaintext
C{{"timestamp": epoch_ms, "ip": "..."}} (C{"ts"} accepted for C{"timestamp"}).
There is no MAC, so a token is only as good as its JSON being well-formed after
decryption; the checks below (IP, time window, replay) carry the rest.

Differences from the reference (hypergate.md section 6), on purpose:
  - an invalid token gets no C{detail} (which step failed is not leaked);
  - the replay key is the decrypted C{(ip, timestamp)}, so re-encoding a token
    (base64 vs base64url, padding, whitespace) does not get past it;
  - failed attempts are counted per caller IP, and once an IP reaches
    C{max_failures} within C{failure_window_s} it gets 429 before any PBKDF2 work;
  - replay memory and failure counts are pruned as time passes.
"""

from __future__ import annotations

import base64
import collections
import heapq
import ipaddress
import json
import math
import os
import re
from urllib.parse import parse_qs

import attrs
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from twisted.web import resource

from pipegate.core.budget import source_key
from pipegate.core.bucket import TokenBucket

MAGIC = b"Salted__"
SALT_LENGTH = 8
PBKDF2_ITERATIONS = 10_000
KEY_LENGTH = 32
IV_LENGTH = 16
BLOCK = 16
#: The shortest --unlimited-secret accepted: PBKDF2 over a short passphrase can be guessed
#: offline from one captured token.
MIN_SECRET_CHARS = 16
#: Default PBKDF2 derivations per second, all callers together (--unlimited-kdf-rate); each
#: costs about 6 ms of the reactor's time, so 20/s keeps other traffic's latency flat.
KDF_RATE = 20.0

# A real token is ~100 characters; anything far longer is refused before decoding.
MAX_TOKEN_CHARS = 4096

_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_WHITESPACE = str.maketrans("", "", "\r\n\t")


class TokenInvalid(ValueError):
    """The token could not be decoded, decrypted or parsed.  The message never says which."""

    def __init__(self) -> None:
        super().__init__("invalid token")


def _key_iv(secret: str, salt: bytes) -> tuple[bytes, bytes]:
    derived = PBKDF2HMAC(algorithm=hashes.SHA256(), length=KEY_LENGTH + IV_LENGTH, salt=salt,
                         iterations=PBKDF2_ITERATIONS).derive(secret.encode("utf-8"))
    return derived[:KEY_LENGTH], derived[KEY_LENGTH:]


def _b64decode(token: str) -> bytes:
    # Whitespace from line-wrapped base64 is dropped; a space is a '+' that went
    # through form or query decoding (a token never holds a real space).
    text = token.strip().translate(_WHITESPACE).replace(" ", "+").replace("-", "+").replace("_", "/")
    if not _BASE64.fullmatch(text):
        raise ValueError("not base64")
    text = text.rstrip("=")
    if len(text) % 4 == 1:
        raise ValueError("bad base64 length")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _decrypt(token: str, secret: str) -> dict:
    if not isinstance(token, str) or not isinstance(secret, str) or len(token) > MAX_TOKEN_CHARS:
        raise ValueError("bad token")
    raw = _b64decode(token)
    body = raw[len(MAGIC) + SALT_LENGTH:]
    if not raw.startswith(MAGIC) or not body or len(body) % BLOCK:
        raise ValueError("not OpenSSL salted output")
    key, iv = _key_iv(secret, raw[len(MAGIC):len(MAGIC) + SALT_LENGTH])
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(body) + decryptor.finalize()
    unpadder = padding.PKCS7(BLOCK * 8).unpadder()
    plaintext = unpadder.update(padded) + unpadder.finalize()
    payload = json.loads(plaintext.decode("utf-8"))
    if not isinstance(payload, dict):
        raise ValueError("not a JSON object")
    return payload


def _well_formed(token: str) -> bool:
    """Could C{token} be OpenSSL salted output at all?  (Cheap: no key derivation.)"""
    try:
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            return False
        raw = _b64decode(token)
    except Exception:
        return False
    body = raw[len(MAGIC) + SALT_LENGTH:]
    return raw.startswith(MAGIC) and bool(body) and len(body) % BLOCK == 0


def decrypt_token(token: str, secret: str) -> dict:
    """
    Decode and decrypt a token into its JSON object.  Any failure (base64, header,
    padding, UTF-8, JSON, not an object) raises L{TokenInvalid} with the same
    message, and no chained cause.
    """
    try:
        return _decrypt(token, secret)
    except Exception:
        pass
    raise TokenInvalid()


def _json_number(value: float):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def make_token(secret: str, ip: str, now_ms: float, salt: bytes | None = None) -> str:
    """
    A token for C{ip} stamped C{now_ms}, as the documented openssl pipeline would
    make it: base64url without padding.  C{openssl enc -d -aes-256-cbc -pbkdf2
    -iter 10000 -md sha256} decrypts the decoded bytes.
    """
    if salt is None:
        salt = os.urandom(SALT_LENGTH)
    if len(salt) != SALT_LENGTH:
        raise ValueError(f"salt must be {SALT_LENGTH} bytes")
    if isinstance(now_ms, bool) or not isinstance(now_ms, (int, float)) or not math.isfinite(now_ms):
        raise ValueError(f"now_ms must be a finite number, not {now_ms!r}")
    plaintext = json.dumps({"timestamp": _json_number(now_ms), "ip": ip}, separators=(",", ":"))
    key, iv = _key_iv(secret, salt)
    padder = padding.PKCS7(BLOCK * 8).padder()
    padded = padder.update(plaintext.encode("utf-8")) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    raw = MAGIC + bytes(salt) + encryptor.update(padded) + encryptor.finalize()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def normalise_ip(ip: str) -> str:
    """Canonical text of an IP: zone dropped, IPv4-mapped IPv6 as IPv4, IPv6
    compressed.  Text that is not an IP is returned stripped (it will match nothing
    but itself)."""
    text = ip.strip()
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _timestamp(payload: dict) -> float | None:
    value = payload.get("timestamp")
    if value is None:
        value = payload.get("ts")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _media_type(content_type: bytes | None) -> str:
    if not content_type:
        return ""
    return content_type.split(b";", 1)[0].strip().decode("latin-1").lower()


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    return value.strip() or None


def extract_payload(query_payload: bytes | None, body: bytes, content_type: bytes | None) -> str | None:
    """
    The token of a request: the C{payload} query parameter (already URL-decoded)
    if present and non-empty; else, from the body, C{{"payload": ...}} if it is
    JSON (by content type, or a body starting with C{{}), C{payload=} if it is
    form-encoded (by content type, or a body starting with C{payload=}), or else
    the whole trimmed body.  C{None} when there is none.
    """
    found = _text(query_payload)
    if found is not None:
        return found
    body = (body or b"").strip()
    if not body:
        return None
    media = _media_type(content_type)
    if media == "application/json" or media.endswith("+json") or body.startswith(b"{"):
        try:
            document = json.loads(body.decode("utf-8"))
        except ValueError:
            document = None
        if isinstance(document, dict):
            return _text(document.get("payload"))
        if media == "application/json" or media.endswith("+json"):
            return None
    if media == "application/x-www-form-urlencoded" or body.startswith(b"payload="):
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return _text(fields.get("payload", [None])[0])
    return _text(body)


def _positive(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a positive number, not {value!r}")


def _secret(instance, attribute, value) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError("the unlimited secret must be a non-empty string")


def _at_least_one(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, not {value!r}")


@attrs.define
class UnlimitedGate:
    """
    Decides C{/unlimited} requests.  Mutable: it remembers accepted tokens (for
    replay detection) and recent failures per caller IP (for rate limiting); both
    are pruned as C{now_ms} advances, and the failure table is capped at
    C{max_tracked_ips} (oldest evicted first).
    """

    secret: str = attrs.field(validator=_secret, repr=False)
    window_s: float = attrs.field(default=300, validator=_positive)
    grant_s: float = attrs.field(default=1800, validator=_positive)
    max_failures: int = attrs.field(default=10, validator=_at_least_one)
    failure_window_s: float = attrs.field(default=60, validator=_positive)
    max_tracked_ips: int = attrs.field(default=65_536, validator=_at_least_one)
    # PBKDF2 work, all callers together: at most kdf_rate derivations per second (bursts of
    # kdf_rate); past it a caller gets 503 before any work.  Derivations run one at a time
    # on the reactor thread, so their concurrency is 1.
    kdf_rate: float = attrs.field(default=KDF_RATE, validator=_positive)
    _kdf: TokenBucket | None = attrs.field(default=None, init=False, repr=False)
    kdf_refused: int = attrs.field(default=0, init=False)
    # (ip, timestamp) -> forget after (ms); a heap orders the forgetting.
    _seen: dict = attrs.field(factory=dict, init=False, repr=False)
    _seen_heap: list = attrs.field(factory=list, init=False, repr=False)
    # ip -> deque of failure times (ms), least recently failed first.
    _failures: collections.OrderedDict = attrs.field(factory=collections.OrderedDict, init=False, repr=False)

    def check(self, payload: str | None, caller_ip: str | None, now_ms: float) -> tuple[int, dict]:
        """The response to a request carrying C{payload} from C{caller_ip} at C{now_ms}."""
        if payload is None or not payload.strip():
            return 400, {"error": "missing_payload"}
        if caller_ip is None or not caller_ip.strip():
            return 400, {"error": "missing_caller_ip"}
        caller = normalise_ip(caller_ip)
        source = source_key(caller)   # failures of an IPv6 caller count for its /64
        self._prune(now_ms)
        if self.failures(caller, now_ms) >= self.max_failures:
            return 429, {"error": "too_many_attempts"}
        if not _well_formed(payload):  # refused without key derivation
            self._fail(source, now_ms)
            return 403, {"error": "invalid_token"}
        if self._kdf is None:
            self._kdf = TokenBucket(self.kdf_rate, max(1.0, self.kdf_rate), now=now_ms / 1000)
        if self._kdf.level(now_ms / 1000) < 1:
            self.kdf_refused += 1
            return 503, {"error": "busy"}
        self._kdf.take(1, now_ms / 1000)
        status, body = self._decide(payload, caller, now_ms)
        if status != 200:
            self._fail(source, now_ms)
        return status, body

    def failures(self, caller_ip: str, now_ms: float) -> int:
        """
        Failed attempts by C{caller_ip} counted within the failure window before C{now_ms};
        an IPv6 caller's are those of its whole /64 (L{source_key}).
        """
        times = self._failures.get(source_key(normalise_ip(caller_ip)))
        if not times:
            return 0
        horizon = now_ms - self.failure_window_s * 1000
        return sum(1 for t in times if t > horizon)

    def _decide(self, payload: str, caller: str, now_ms: float) -> tuple[int, dict]:
        try:
            claims = decrypt_token(payload, self.secret)
        except TokenInvalid:
            return 403, {"error": "invalid_token"}
        ip = claims.get("ip")
        timestamp = _timestamp(claims)
        if not isinstance(ip, str) or not ip.strip() or timestamp is None:
            return 400, {"error": "invalid_payload"}
        ip = normalise_ip(ip)
        if ip != caller:
            return 403, {"error": "ip_mismatch", "callerIp": caller}
        window_ms = self.window_s * 1000
        if abs(now_ms - timestamp) > window_ms:
            return 403, {"error": "timestamp_out_of_window"}
        key = (ip, timestamp)
        if key in self._seen:
            return 409, {"error": "replay_detected"}
        # Long enough that the timestamp check refuses the token by the time it is forgotten.
        forget = max(timestamp, now_ms) + window_ms
        self._seen[key] = forget
        heapq.heappush(self._seen_heap, (forget, key))
        return 200, {"ok": True, "ip": ip, "expireAt": _json_number(now_ms + self.grant_s * 1000)}

    def _fail(self, caller: str, now_ms: float) -> None:
        times = self._failures.pop(caller, None)
        if times is None:
            times = collections.deque(maxlen=self.max_failures)
        times.append(now_ms)
        self._failures[caller] = times
        while len(self._failures) > self.max_tracked_ips:
            self._failures.popitem(last=False)

    def _prune(self, now_ms: float) -> None:
        while self._seen_heap and self._seen_heap[0][0] < now_ms:
            _, key = heapq.heappop(self._seen_heap)
            self._seen.pop(key, None)
        horizon = now_ms - self.failure_window_s * 1000
        while self._failures:
            ip, times = next(iter(self._failures.items()))
            if times[-1] > horizon:
                break
            del self._failures[ip]

    @property
    def remembered_tokens(self) -> int:
        """How many accepted tokens are held for replay detection."""
        return len(self._seen)

    @property
    def tracked_ips(self) -> int:
        """How many caller IPs have failures on record."""
        return len(self._failures)


class UnlimitedResource(resource.Resource):
    """
    C{/unlimited} on the gateway: a valid token grants its IP unlimited, admitted access
    for new connections until the grant expires.
    """

    isLeaf = True

    def __init__(self, gate: UnlimitedGate, grants, clock) -> None:
        super().__init__()
        self.gate = gate
        self.grants = grants
        self.clock = clock

    def render(self, request):
        request.setHeader(b"content-type", b"application/json")
        if request.path != b"/unlimited":
            request.setResponseCode(404)
            return b'{"error": "not_found"}'
        if request.method not in (b"GET", b"POST"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, POST")
            return b'{"error": "method_not_allowed"}'
        query = (request.args.get(b"payload") or [None])[0]
        payload = extract_payload(query, request.content.read(65536),
                                  request.getHeader(b"content-type"))
        caller = getattr(request.getClientAddress(), "host", None)
        now_ms = self.clock.seconds() * 1000
        status, body = self.gate.check(payload, caller, now_ms)
        if status == 200:
            body["expireAt"] = int(self.grants.grant(body["ip"], now_ms, self.gate.grant_s))
        elif status == 503:
            request.setHeader(b"retry-after", b"1")
        request.setResponseCode(status)
        return json.dumps(body).encode()
