"""
Sans-IO codec for the port plane multiplexer (mux v1): the frames, one at a time.

A link is one TLS connection carrying a stream of length-prefixed frames; see
docs/protocol.md section 2.  Nothing here touches a transport or a reactor: frames are
built from and parsed into attrs objects.  L{pipegate.mux.decoder.FrameDecoder} turns
arbitrary read boundaries into whole frames; L{pipegate.mux.hello} holds admission.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Iterable, Sequence

import attrs

from pipegate.core.codec import FrameError, Reader
from pipegate.core.codec import str8 as _str8, str16 as _str16
from pipegate.core.window import MAX_DATA, checked_increment  # (MAX_DATA: shared with the HTTP plane)

VERSION = 1
MAX_FRAME_SIZE = 1_048_576        # default limit on a frame's declared length (--max-frame-size)
MAX_DATAGRAM = 65_507             # DATAGRAM payload bound (the largest UDP/IPv4 payload)
INITIAL_WINDOW = 262_144          # default per-channel credit (--window)
MAX_WINDOW = 2_097_152            # default credit a channel may grow to (--max-window)
WINDOW_BUDGET = 2_097_152         # default growth shared by all channels of a service (--window-budget)
HUB_MAX_WINDOW = 4_194_304        # default credit a hub lets an end grant (--mux-max-window): the ends' old default
ROUTES_MAX = 4096                 # routes in one ROUTES frame
NONCE_SIZE = 32
MAC_SIZE = 32

HELLO = 0x01
ROUTES = 0x02
OPEN = 0x03
OPEN_OK = 0x04
OPEN_FAIL = 0x05
DATA = 0x06
WINDOW = 0x07
FIN = 0x08
RESET = 0x09
DATAGRAM = 0x0A
PING = 0x0B
PONG = 0x0C
GOAWAY = 0x0D

ROLE_PROVIDER = 1
ROLE_GATEWAY = 2
ROLE_OBSERVER = 3
ROLES = frozenset({ROLE_PROVIDER, ROLE_GATEWAY, ROLE_OBSERVER})

PROTOCOLS = {"tcp": 0, "udp": 1}
_PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">BI")    # type, channel
_PREFIX = PREFIX = struct.Struct(">IBI")   # length, type, channel: _LENGTH and _HEADER in one pack
HEADER_SIZE = _HEADER.size        # the smallest declared length (type + channel)
MIN_MAX_FRAME_SIZE = HEADER_SIZE + MAX_DATA   # a limit below this could not carry full DATA
_MAX_CHANNEL = MAX_CHANNEL = 2**32 - 1   # channel ids are 1 to this



def _strings(value: Iterable[str]) -> tuple[str, ...]:
    # A bare string would otherwise become a tuple of its characters.
    if isinstance(value, (str, bytes)):
        raise TypeError(f"expected a sequence of strings, not {type(value).__name__}")
    return tuple(value)


@attrs.frozen
class Route:
    gate_port: int
    protocol: str                 # "tcp" or "udp"
    service_host: str
    service_port: int
    tags: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    policy: bytes = b""           # opaque JSON, may be empty


@attrs.frozen
class Hello:
    version: int = attrs.field(default=VERSION, kw_only=True)
    role: int
    nonce: bytes
    mac: bytes


@attrs.frozen
class Routes:
    routes: tuple[Route, ...] = attrs.field(default=(), converter=tuple)


@attrs.frozen
class Open:
    channel: int
    gate_port: int
    protocol: str
    client_host: str
    client_port: int
    labels: tuple[str, ...] = attrs.field(default=(), converter=_strings)


@attrs.frozen
class OpenOk:
    channel: int


@attrs.frozen
class OpenFail:
    channel: int
    reason: str


@attrs.frozen
class Data:
    channel: int
    data: bytes


@attrs.frozen
class Window:
    channel: int
    increment: int


@attrs.frozen
class Fin:
    channel: int


@attrs.frozen
class Reset:
    channel: int
    reason: str = ""


@attrs.frozen
class Datagram:
    channel: int
    data: bytes


@attrs.frozen
class Ping:
    token: int


@attrs.frozen
class Pong:
    token: int


@attrs.frozen
class GoAway:
    reason: str = ""


Frame = (Hello | Routes | Open | OpenOk | OpenFail | Data | Window | Fin | Reset | Datagram
         | Ping | Pong | GoAway)


# -- field rules shared by encode and decode ------------------------------------------------

_LINK_LEVEL = {HELLO: "HELLO", ROUTES: "ROUTES", PING: "PING", PONG: "PONG", GOAWAY: "GOAWAY"}
_CHANNEL_LEVEL = {OPEN: "OPEN", OPEN_OK: "OPEN_OK", OPEN_FAIL: "OPEN_FAIL", DATA: "DATA",
                  WINDOW: "WINDOW", FIN: "FIN", RESET: "RESET", DATAGRAM: "DATAGRAM"}


def _check_channel(channel: int, name: str) -> None:
    if not 0 < channel <= _MAX_CHANNEL:
        raise FrameError(f"{name} on channel {channel}")


def _check_envelope(kind: int, channel: int, size: int) -> None:
    """The rules of a frame's type, channel and payload size, the same for encode and decode."""
    if kind in _LINK_LEVEL:
        if channel != 0:
            raise FrameError(f"{_LINK_LEVEL[kind]} on channel {channel}")
    elif kind in _CHANNEL_LEVEL:
        _check_channel(channel, _CHANNEL_LEVEL[kind])
    else:
        raise FrameError(f"unknown frame type {kind:#04x}")
    if kind == DATA and not 0 < size <= MAX_DATA:
        raise FrameError(f"DATA payload of {size} bytes")
    if kind == DATAGRAM and size > MAX_DATAGRAM:
        raise FrameError(f"DATAGRAM payload of {size} bytes")


def _check_port(port: int, what: str) -> None:
    if not 0 < port <= 0xFFFF:
        raise FrameError(f"{what} {port} out of range")


def _check_role(role: int) -> None:
    if role not in ROLES:
        raise FrameError(f"unknown role {role}")


def _check_tag(word: str) -> None:
    if not word or any(c.isspace() for c in word):
        raise FrameError(f"bad route tag {word!r}")


def _check_label(label: str) -> None:
    if not label or "," in label:
        raise FrameError(f"bad label {label!r}")


def _check_service_host(host: str) -> None:
    if not host or any(c.isspace() for c in host):
        raise FrameError(f"bad service host {host!r}")


def _check_client_host(host: str) -> None:
    if not (host.isascii() and _is_ip_address(host)):
        raise FrameError(f"client host {host!r} is not an IP address")


@functools.lru_cache(maxsize=1024)   # every OPEN, sent and received; clients come back
def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _protocol_number(protocol: str) -> int:
    try:
        return PROTOCOLS[protocol]
    except (KeyError, TypeError):
        raise FrameError(f"unknown protocol {protocol!r}") from None


def _protocol_name(number: int) -> str:
    try:
        return _PROTOCOL_NAMES[number]
    except KeyError:
        raise FrameError(f"unknown protocol byte {number}") from None


# -- encoding ---------------------------------------------------------------------------------

def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FrameError(f"text not encodable as UTF-8: {e}") from None


def _encode_route(route: Route) -> bytes:
    _check_port(route.gate_port, "gate port")
    _check_port(route.service_port, "service port")
    _check_service_host(route.service_host)
    for word in route.tags:
        _check_tag(word)
    return b"".join((
        struct.pack(">HBH", route.gate_port, _protocol_number(route.protocol), route.service_port),
        _str8(_utf8(route.service_host)),
        _str16(_utf8(" ".join(route.tags))),
        _str16(route.policy),
    ))


def encode(frame: Frame, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """
    Serialise one frame, 4-byte length prefix included.  Raises L{FrameError} when a field
    is out of bounds or the frame would be refused by a L{FrameDecoder} with the same
    C{max_frame_size}, so a caller learns before sending that e.g. a route list is too big.
    """
    kind = _HEADER_ONLY.get(type(frame))
    if kind is not None and max_frame_size >= HEADER_SIZE:
        # FIN and OPEN_OK, once per tunnelled connection or more: what the general path
        # below does with an empty payload, without its dispatch.
        _check_channel(frame.channel, _CHANNEL_LEVEL[kind])
        return _PREFIX.pack(HEADER_SIZE, kind, frame.channel)
    if type(frame) is Open and not frame.labels and type(frame.gate_port) is int \
            and 0 < frame.gate_port <= 0xFFFF and type(frame.protocol) is str and frame.protocol in PROTOCOLS:
        # An OPEN without labels (one per tunnelled connection), as below (the same checks
        # in the same order), in fewer calls.
        _check_client_host(frame.client_host)
        host = frame.client_host.encode("ascii")
        try:
            head = _OPEN_HEAD.pack(frame.gate_port, PROTOCOLS[frame.protocol], frame.client_port, len(host))
        except struct.error as e:
            raise FrameError(f"field out of range: {e}") from None
        _check_channel(frame.channel, "OPEN")
        size = HEADER_SIZE + len(head) + len(host) + 2
        if size <= max_frame_size:
            return b"".join((_PREFIX.pack(size, OPEN, frame.channel), head, host, b"\0\0"))
    try:
        kind, channel, payload = _encode(frame)
    except struct.error as e:
        raise FrameError(f"field out of range: {e}") from None
    _check_envelope(kind, channel, len(payload))
    size = HEADER_SIZE + len(payload)
    if size > max_frame_size:
        raise FrameError(f"frame of {size} bytes exceeds {max_frame_size}")
    return _PREFIX.pack(size, kind, channel) + payload


_HEADER_ONLY = {Fin: FIN, OpenOk: OPEN_OK}
_OPEN_HEAD = struct.Struct(">HBHB")   # gate port, protocol, client port, client host length


def encode_data(channel: int, chunks: Sequence[bytes | memoryview]) -> bytes:
    """
    DATA frames for C{chunks}, all of one channel, in one buffer: the same bytes as
    C{b"".join(encode(Data(channel, c)) for c in chunks)}, with each payload copied
    once (the hot path of a tunnelled TCP connection; C{chunks} may be memoryviews).
    """
    _check_channel(channel, "DATA")
    if len(chunks) == 1:  # one read, one frame: the common case
        chunk = chunks[0]
        size = len(chunk)
        if not 0 < size <= MAX_DATA:
            raise FrameError(f"DATA payload of {size} bytes")
        return _PREFIX.pack(HEADER_SIZE + size, DATA, channel) + chunk
    parts = []
    for chunk in chunks:
        size = len(chunk)
        if not 0 < size <= MAX_DATA:
            raise FrameError(f"DATA payload of {size} bytes")
        parts.append(_PREFIX.pack(HEADER_SIZE + size, DATA, channel))
        parts.append(chunk)
    return b"".join(parts)


def encode_datagram(channel: int, data: bytes) -> bytes:
    """C{encode(Datagram(channel, data))} without its dispatch (one per UDP datagram carried)."""
    _check_channel(channel, "DATAGRAM")
    if len(data) > MAX_DATAGRAM:
        raise FrameError(f"DATAGRAM payload of {len(data)} bytes")
    return _PREFIX.pack(HEADER_SIZE + len(data), DATAGRAM, channel) + data


def _encode(frame: Frame) -> tuple[int, int, bytes]:
    match frame:
        case Data(channel, data):
            return DATA, channel, bytes(data)
        case Datagram(channel, data):
            return DATAGRAM, channel, bytes(data)
        case Window(channel, increment):
            return WINDOW, channel, struct.pack(">I", checked_increment(increment))
        case Fin(channel):
            return FIN, channel, b""
        case Reset(channel, reason):
            return RESET, channel, _str16(_utf8(reason))
        case OpenOk(channel):
            return OPEN_OK, channel, b""
        case OpenFail(channel, reason):
            return OPEN_FAIL, channel, _str16(_utf8(reason))
        case Open():
            _check_port(frame.gate_port, "gate port")
            _check_client_host(frame.client_host)
            for label in frame.labels:
                _check_label(label)
            return OPEN, frame.channel, b"".join((
                struct.pack(">HBH", frame.gate_port, _protocol_number(frame.protocol),
                            frame.client_port),
                _str8(frame.client_host.encode("ascii")),
                _str16(_utf8(",".join(frame.labels))),
            ))
        case Ping(token):
            return PING, 0, struct.pack(">Q", token)
        case Pong(token):
            return PONG, 0, struct.pack(">Q", token)
        case Hello(version=version, role=role, nonce=nonce, mac=mac):
            _check_role(role)
            if len(nonce) != NONCE_SIZE or len(mac) != MAC_SIZE:
                raise FrameError("HELLO nonce and mac must be 32 bytes each")
            return HELLO, 0, struct.pack(">BB", version, role) + bytes(nonce) + bytes(mac)
        case Routes(routes):
            if len(routes) > ROUTES_MAX:
                raise FrameError(f"{len(routes)} routes in one frame (at most {ROUTES_MAX})")
            return ROUTES, 0, struct.pack(">H", len(routes)) + b"".join(map(_encode_route, routes))
        case GoAway(reason):
            return GOAWAY, 0, _str16(_utf8(reason))
        case _:
            raise TypeError(f"not a frame: {frame!r}")


# -- decoding ---------------------------------------------------------------------------------

class _Reader(Reader):
    """The codec reader plus text, protocol and route fields."""

    def text(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FrameError(f"bad UTF-8: {e}") from None

    def utf8(self) -> str:
        return self.text(self.str16())

    def ascii8(self) -> str:
        raw = self.str8()
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise FrameError(f"non-ASCII client host {raw!r}") from None

    def protocol(self) -> str:
        return _protocol_name(self.u8())

    def route(self) -> Route:
        gate_port, protocol, service_port = self.u16(), self.protocol(), self.u16()
        _check_port(gate_port, "gate port")
        _check_port(service_port, "service port")
        host = self.text(self.str8())
        _check_service_host(host)
        text = self.utf8()
        tags = tuple(text.split(" ")) if text else ()
        for word in tags:
            _check_tag(word)
        return Route(gate_port, protocol, host, service_port, tags, self.str16())


_U16 = struct.Struct(">H")


def _decode_open(channel: int, payload: bytes) -> Open | None:
    """
    An OPEN whose every field is valid, as the general path below reads it, in a few
    steps instead of a reader call per field (one OPEN per tunnelled connection); None
    for anything else, which the general path then reads and refuses with its own error.
    """
    size = len(payload)
    if size < 6:
        return None
    gate_port, number, client_port, host_size = _OPEN_HEAD.unpack_from(payload)
    end = 6 + host_size
    if gate_port == 0 or number not in _PROTOCOL_NAMES or size < end + 2:
        return None
    if end + 2 + _U16.unpack_from(payload, end)[0] != size:
        return None
    raw = payload[6:end]
    if not raw.isascii():
        return None
    host = raw.decode("ascii")
    if not _is_ip_address(host):
        return None
    labels: tuple[str, ...] = ()
    if size > end + 2:
        try:
            labels = tuple(payload[end + 2:].decode("utf-8").split(","))
        except UnicodeDecodeError:
            return None
        for label in labels:
            if not label:   # (a label holds no comma: they were split on commas)
                return None
    return Open(channel, gate_port, _PROTOCOL_NAMES[number], host, client_port, labels)


def decode_body(kind: int, channel: int, payload: bytes) -> Frame:
    """Parse one frame from its type, channel and payload, or raise L{FrameError}."""
    _check_envelope(kind, channel, len(payload))
    if kind == DATA:
        return Data(channel, payload)
    if kind == DATAGRAM:
        return Datagram(channel, payload)
    if kind == OPEN:
        opened = _decode_open(channel, payload)
        if opened is not None:
            return opened
    elif kind == WINDOW and len(payload) == 4:
        # (what the general path below reads, without its reader: one per DATA frames' credit;
        # the increment is a u32, as a frame's length is)
        return Window(channel, checked_increment(_LENGTH.unpack(payload)[0]))
    elif not payload and kind in _HEADER_ONLY_KINDS:
        return _HEADER_ONLY_KINDS[kind](channel)   # FIN, OPEN_OK
    return _decode_general(kind, channel, payload)


_HEADER_ONLY_KINDS = {kind: cls for cls, kind in _HEADER_ONLY.items()}


def _decode_general(kind: int, channel: int, payload: bytes) -> Frame:
    """L{decode_body} of a frame whose envelope was checked, field by field through a reader."""
    r = _Reader(payload)
    frame: Frame
    if kind == WINDOW:
        frame = Window(channel, checked_increment(r.u32()))
    elif kind == FIN:
        frame = Fin(channel)
    elif kind == RESET:
        frame = Reset(channel, r.utf8())
    elif kind == OPEN_OK:
        frame = OpenOk(channel)
    elif kind == OPEN_FAIL:
        frame = OpenFail(channel, r.utf8())
    elif kind == OPEN:
        gate_port, protocol, client_port = r.u16(), r.protocol(), r.u16()
        _check_port(gate_port, "gate port")
        client_host = r.ascii8()
        _check_client_host(client_host)
        text = r.utf8()
        labels = tuple(text.split(",")) if text else ()
        for label in labels:
            _check_label(label)
        frame = Open(channel, gate_port, protocol, client_host, client_port, labels)
    elif kind == PING:
        frame = Ping(r.u64())
    elif kind == PONG:
        frame = Pong(r.u64())
    elif kind == HELLO:
        if len(payload) != 2 + NONCE_SIZE + MAC_SIZE:
            raise FrameError(f"HELLO payload of {len(payload)} bytes")
        version, role = r.u8(), r.u8()
        _check_role(role)
        frame = Hello(version=version, role=role, nonce=r.take(NONCE_SIZE), mac=r.take(MAC_SIZE))
    elif kind == ROUTES:
        count = r.u16()
        if count > ROUTES_MAX:
            raise FrameError(f"{count} routes in one frame (at most {ROUTES_MAX})")
        frame = Routes(tuple(r.route() for _ in range(count)))
    else:  # GOAWAY
        frame = GoAway(r.utf8())
    r.done()
    return frame
