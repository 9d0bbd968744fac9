"""
Admission on a mux link (docs/protocol.md section 2.4): the HELLO MAC that proves
knowledge of the router secret, bound to this TLS session by the keying-material
exporter, and the router secret's text form.  Sans-IO: the caller reads the exporter
value from TLS and sends or checks the L{pipegate.mux.frames.Hello} frame.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from pipegate.mux.frames import Hello

EXPORTER_LABEL = b"EXPORTER-pipegate-mux-v1"
EXPORTER_LENGTH = 32
_HELLO_CONTEXT = b"pipegate-mux-v1 hello\x00"
_SECRET = re.compile(r"[0-9a-fA-F]{64}")


def hello_mac(secret: bytes, exporter: bytes, role: int, nonce: bytes, is_tls_client: bool) -> bytes:
    """
    The HELLO MAC: HMAC-SHA256 keyed with the router secret over a fixed context, the
    sender's TLS direction, its role, its nonce and the TLS session's exporter value
    (label L{EXPORTER_LABEL}, no context, 32 bytes).  The direction byte stops a peer from
    reflecting our own HELLO back; the exporter binds the HELLO to this TLS session.
    """
    message = _HELLO_CONTEXT + (b"C" if is_tls_client else b"S") + bytes((role,)) + nonce + exporter
    return hmac.new(secret, message, hashlib.sha256).digest()


def verify_hello(secret: bytes, exporter: bytes, hello: Hello, peer_is_tls_client: bool) -> bool:
    """
    Whether the peer's HELLO carries the MAC only a holder of C{secret} on this TLS
    session could compute, compared in constant time.  The version is not covered by
    the MAC; the caller checks it.
    """
    if not 0 <= hello.role <= 0xFF:
        return False
    expected = hello_mac(secret, exporter, hello.role, hello.nonce, peer_is_tls_client)
    return hmac.compare_digest(expected, hello.mac)


def parse_router_secret(text: str) -> bytes:
    """Parse the shared router secret: 64 hex characters, surrounding whitespace ignored."""
    text = text.strip()
    if not _SECRET.fullmatch(text):
        raise ValueError("router secret must be 64 hex characters (pipegate router-secret makes one)")
    return bytes.fromhex(text)
