"""
HAProxy PROXY protocol, versions 1 (text) and 2 (binary): building the header that
tells a service the original client address.  (Reading one is Twisted's: the
C{haproxy:} endpoint, twisted.protocols.haproxy; the tests read ours back with it.)

Pure functions, no I/O.  Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct

V1_MAX_LENGTH = 107          # the whole line, "PROXY" to CRLF inclusive
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_V2_VERSION = 0x20
_V2_TRANSPORT_BITS = {"tcp": 0x1, "udp": 0x2}
_V2_FAMILY_BITS = {"inet": 0x10, "inet6": 0x20}


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
