"""
HAProxy PROXY protocol, versions 1 (text) and 2 (binary): building headers that
tell a service the original client address, and parsing them back.

Pure functions, no I/O.  Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

Parsers return C{(info, rest)} where C{rest} is whatever followed the header and
C{info} is a dict::

    {"version": 1 | 2,
     "command": "PROXY" | "LOCAL",
     "family": "inet" | "inet6" | "unix" | "unspec",
     "protocol": "tcp" | "udp" | None,
     "src_ip": str | None, "src_port": int | None,
     "dst_ip": str | None, "dst_port": int | None,
     "tlvs": [(type, value), ...]}          # always [] for version 1

For C{"unix"} the paths are in C{src_ip}/C{dst_ip} and the ports are C{None}.
Malformed input raises L{ValueError}; input that is a valid but unfinished prefix
of a header raises L{Incomplete} (a L{ValueError} too), so a streaming reader can
wait for more bytes and a one-shot validator can treat both alike.
"""

from __future__ import annotations

import ipaddress
import struct

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107          # the whole line, "PROXY" to CRLF inclusive
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16        # signature, version/command, family/transport, length

_V2_VERSION = 0x20
_V2_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_FAMILIES = {0x0: "unspec", 0x1: "inet", 0x2: "inet6", 0x3: "unix"}
_V2_TRANSPORTS = {0x0: None, 0x1: "tcp", 0x2: "udp"}
_V2_ADDRESS_LENGTHS = {"unspec": 0, "inet": 12, "inet6": 36, "unix": 216}
_V2_TRANSPORT_BITS = {"tcp": 0x1, "udp": 0x2}
_V2_FAMILY_BITS = {"inet": 0x10, "inet6": 0x20}


class Incomplete(ValueError):
    """The bytes so far are a valid prefix of a header: read more and retry."""


def _protocol(protocol: str) -> str:
    p = protocol.lower() if isinstance(protocol, str) else None
    if p not in ("tcp", "udp"):
        raise ValueError(f"protocol must be 'tcp' or 'udp', not {protocol!r}")
    return p


def _port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port!r}")
    return port


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an address for a header; an IPv6 zone (C{%eth0}) cannot be carried, so drop it."""
    if not isinstance(ip, str):
        raise ValueError(f"not an IP address: {ip!r}")
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        raise ValueError(f"not an IP address: {ip!r}") from None


def _pair(src_ip: str, dst_ip: str):
    """Both addresses, in the same family where possible (v4-mapped IPv6 is unmapped
    when the other side is IPv4), or C{None} if the families differ."""
    src, dst = _address(src_ip), _address(dst_ip)
    if src.version != dst.version:
        if src.version == 6 and src.ipv4_mapped is not None:
            src = src.ipv4_mapped
        elif dst.version == 6 and dst.ipv4_mapped is not None:
            dst = dst.ipv4_mapped
        else:
            return None
    return src, dst


def v1_header(protocol: str, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> bytes:
    """
    A version 1 header: C{PROXY TCP4 src dst sport dport\\r\\n} (or TCP6).  Version 1
    carries TCP only, so UDP, and addresses of different families, give
    C{PROXY UNKNOWN\\r\\n} (the receiver then uses the real connection's addresses).
    """
    p = _protocol(protocol)
    _port(src_port)
    _port(dst_port)
    pair = _pair(src_ip, dst_ip)
    if p != "tcp" or pair is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = pair
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {src_port} {dst_port}\r\n".encode("ascii")


def v2_header(protocol: str, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> bytes:
    """
    A version 2 header, command PROXY, AF_INET or AF_INET6, STREAM for TCP or DGRAM
    for UDP, no TLVs.  Addresses of different families give a LOCAL header with
    AF_UNSPEC and no address block (the receiver uses the real connection's).
    """
    p = _protocol(protocol)
    _port(src_port)
    _port(dst_port)
    pair = _pair(src_ip, dst_ip)
    if pair is None:
        return V2_SIGNATURE + bytes([_V2_VERSION | 0x0, 0x00]) + struct.pack("!H", 0)
    src, dst = pair
    family = "inet" if src.version == 4 else "inet6"
    block = src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)
    return (V2_SIGNATURE + bytes([_V2_VERSION | 0x1, _V2_FAMILY_BITS[family] | _V2_TRANSPORT_BITS[p]])
            + struct.pack("!H", len(block)) + block)


def header(version: str, protocol: str, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> bytes:
    """L{v1_header} or L{v2_header}, by C{version} C{"v1"} or C{"v2"}."""
    if version == "v1":
        return v1_header(protocol, src_ip, src_port, dst_ip, dst_port)
    if version == "v2":
        return v2_header(protocol, src_ip, src_port, dst_ip, dst_port)
    raise ValueError(f"PROXY protocol version must be 'v1' or 'v2', not {version!r}")


def _info(version, command, family, protocol, src_ip=None, src_port=None,
          dst_ip=None, dst_port=None, tlvs=()) -> dict:
    return {"version": version, "command": command, "family": family, "protocol": protocol,
            "src_ip": src_ip, "src_port": src_port, "dst_ip": dst_ip, "dst_port": dst_port,
            "tlvs": list(tlvs)}


def _v1_port(text: str) -> int:
    # Decimal, 0..65535, no sign, no leading zeroes.
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ValueError(f"PROXY v1: bad port {text!r}")
    return _port(int(text))


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"PROXY v1: bad address {text!r}") from None
    if address.version != version:
        raise ValueError(f"PROXY v1: {text!r} is not an IPv{version} address")
    if version == 6 and address.scope_id is not None:
        raise ValueError(f"PROXY v1: bad address {text!r}")
    return str(address)


def _printable(line: bytes) -> bool:
    return all(0x20 <= b <= 0x7E for b in line)


def parse_v1(data: bytes) -> tuple[dict, bytes]:
    """Parse a version 1 header at the start of C{data}; return C{(info, rest)}."""
    data = bytes(data)
    if not data.startswith(V1_PREFIX):
        if V1_PREFIX.startswith(data):
            raise Incomplete("PROXY v1: header incomplete")
        raise ValueError("PROXY v1: no 'PROXY ' signature")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ValueError(f"PROXY v1: no CRLF within {V1_MAX_LENGTH} bytes")
        body = data[:-1] if data.endswith(b"\r") else data
        if not _printable(body):
            raise ValueError("PROXY v1: header is not printable ASCII")
        raise Incomplete("PROXY v1: header incomplete")
    line, rest = data[:end], data[end + 2:]
    if not _printable(line):
        raise ValueError("PROXY v1: header is not printable ASCII")
    parts = line.decode("ascii").split(" ")
    if parts[1] == "UNKNOWN":
        # The receiver must ignore anything after UNKNOWN up to the CRLF.
        return _info(1, "PROXY", "unspec", None), rest
    if parts[1] not in ("TCP4", "TCP6"):
        raise ValueError(f"PROXY v1: unknown protocol {parts[1]!r}")
    if len(parts) != 6:
        raise ValueError("PROXY v1: expected 'PROXY TCPn src dst sport dport'")
    version = 4 if parts[1] == "TCP4" else 6
    return _info(1, "PROXY", "inet" if version == 4 else "inet6", "tcp",
                 _v1_address(parts[2], version), _v1_port(parts[4]),
                 _v1_address(parts[3], version), _v1_port(parts[5])), rest


def _tlvs(block: bytes) -> list[tuple[int, bytes]]:
    tlvs, i = [], 0
    while i < len(block):
        if len(block) - i < 3:
            raise ValueError("PROXY v2: truncated TLV")
        kind, length = block[i], struct.unpack_from("!H", block, i + 1)[0]
        if len(block) - i - 3 < length:
            raise ValueError("PROXY v2: TLV overruns the header")
        tlvs.append((kind, block[i + 3:i + 3 + length]))
        i += 3 + length
    return tlvs


def parse_v2(data: bytes) -> tuple[dict, bytes]:
    """Parse a version 2 header at the start of C{data}; return C{(info, rest)}."""
    data = bytes(data)
    head = data[:len(V2_SIGNATURE)]
    if head != V2_SIGNATURE:
        if V2_SIGNATURE.startswith(head):
            raise Incomplete("PROXY v2: header incomplete")
        raise ValueError("PROXY v2: bad signature")
    if len(data) < V2_HEADER_LENGTH:
        raise Incomplete("PROXY v2: header incomplete")
    version_command, family_transport = data[12], data[13]
    length = struct.unpack_from("!H", data, 14)[0]
    if version_command & 0xF0 != _V2_VERSION:
        raise ValueError(f"PROXY v2: bad version {version_command >> 4}")
    command = _V2_COMMANDS.get(version_command & 0x0F)
    family = _V2_FAMILIES.get(family_transport >> 4)
    if command is None:
        raise ValueError(f"PROXY v2: bad command {version_command & 0x0F}")
    if family is None or (family_transport & 0x0F) not in _V2_TRANSPORTS:
        raise ValueError(f"PROXY v2: bad family/transport 0x{family_transport:02x}")
    protocol = _V2_TRANSPORTS[family_transport & 0x0F]
    # LOCAL: the receiver must use the real connection's addresses and discard the
    # whole block, so it need not hold addresses.
    needed = 0 if command == "LOCAL" else _V2_ADDRESS_LENGTHS[family]
    if length < needed:
        raise ValueError(f"PROXY v2: length {length} too short for {family} addresses")
    if len(data) < V2_HEADER_LENGTH + length:
        raise Incomplete("PROXY v2: header incomplete")
    block = data[V2_HEADER_LENGTH:V2_HEADER_LENGTH + length]
    rest = data[V2_HEADER_LENGTH + length:]
    if command == "LOCAL":
        return _info(2, command, family, protocol), rest
    tlvs = _tlvs(block[needed:])
    if family == "unspec":
        return _info(2, command, family, protocol, tlvs=tlvs), rest
    if family == "unix":
        src, dst = (p.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    for p in (block[:108], block[108:216]))
        return _info(2, command, family, protocol, src, None, dst, None, tlvs), rest
    width = 4 if family == "inet" else 16
    src = ipaddress.ip_address(block[:width])
    dst = ipaddress.ip_address(block[width:2 * width])
    src_port, dst_port = struct.unpack_from("!HH", block, 2 * width)
    return _info(2, command, family, protocol, str(src), src_port, str(dst), dst_port, tlvs), rest


def parse(data: bytes) -> tuple[dict, bytes]:
    """Parse either version, told apart by the first byte."""
    data = bytes(data)
    if not data:
        raise Incomplete("PROXY: header incomplete")
    if data[:1] == V2_SIGNATURE[:1]:
        return parse_v2(data)
    return parse_v1(data)
