"""
Server TLS that picks its certificate per connection by SNI (the relay's C{--https}).

Every connection starts on a fallback context (a self-signed certificate made at
startup, kept in memory only); pyOpenSSL's servername callback then moves it to the
context of the name the client asked for, when one is installed.  L{SNISelector.install}
replaces a name's context for connections made afterwards; connections already made
keep theirs, so a renewal never drops anyone.  A client without SNI gets the default
name's certificate (the relay's C{--domain}).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from pipegate.tlsreload import options_from_pem

# Names we log "no certificate yet" for, at most: a stranger may send any SNI.
MAX_LOGGED_NAMES = 1024


def self_signed(name: str, days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a fresh self-signed EC certificate for C{name}."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "pipegate")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@implementer(IOpenSSLServerConnectionCreator)
class SNISelector:
    """Certificates by host name, chosen during each handshake."""

    log = Logger()

    def __init__(self, default_name: str) -> None:
        self.default_name = default_name.lower()
        self.contexts: dict[str, SSL.Context] = {}
        chain, key = self_signed(self.default_name or "pipegate.invalid")
        self.fallback = options_from_pem(chain, key).getContext()
        self.fallback.set_tlsext_servername_callback(self._servername)
        self._logged: set[str] = set()

    def install(self, name: str, key_pem: bytes, chain_pem: bytes) -> None:
        """Serve C{chain_pem} (leaf first) for C{name} from the next handshake on."""
        self.contexts[name.lower()] = options_from_pem(chain_pem, key_pem).getContext()

    def has(self, name: str) -> bool:
        return name.lower() in self.contexts

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.fallback, None)

    def _servername(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace").lower().rstrip(".") if raw else self.default_name
        context = self.contexts.get(name)
        if context is not None:
            connection.set_context(context)
            return
        if name not in self._logged and len(self._logged) < MAX_LOGGED_NAMES:
            self._logged.add(name)
            self.log.info("TLS: no certificate for {name!r} yet; the handshake uses the fallback "
                          "(self-signed) certificate", name=name[:253])
