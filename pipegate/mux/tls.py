"""
TLS for mux links: a node certificate (generated when none is given) and the server
and client sides of Twisted's TLS layer around plain stream endpoints.

Peers are authenticated by the router secret, bound to the TLS session through the
keying-material exporter (see docs/protocol.md section 2); certificate checks are
optional (C{--tls-verify}) on top of that.
"""

from __future__ import annotations

import datetime
from types import MethodType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import endpoints, interfaces, ssl
from zope.interface import implementer

from pipegate._compat import BatchedTLSFactory, BatchedTLSProtocol


def generated_certificate(name: str = "pipegate-node") -> ssl.PrivateCertificate:
    """
    A fresh self-signed P-256 certificate, valid for ten years.  It names C{name} in a
    subjectAltName too: a peer with --tls-verify then sees a name mismatch it can report
    (Twisted logs a certificate without any subjectAltName as a critical traceback).
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ssl.PrivateCertificate.loadPEM(pem)


def tls_failure(reason) -> str | None:
    """Why a TLS handshake failed, in a few words, from a C{connectionLost} reason; else None."""
    from OpenSSL import SSL
    from service_identity import VerificationError

    if reason is None:
        return None
    if reason.check(VerificationError):
        names = [getattr(getattr(e, "mismatched_id", None), "hostname", None) or
                 getattr(getattr(e, "mismatched_id", None), "ip", None) for e in reason.value.errors]
        wanted = ", ".join(n.decode() if isinstance(n, bytes) else str(n) for n in names if n) or "?"
        return f"certificate verify failed: the peer's certificate is not for {wanted} (--tls-verify)"
    if reason.check(SSL.Error):
        parts = [entry[2] for entry in reason.value.args[0] if isinstance(entry, tuple) and len(entry) == 3] \
            if reason.value.args and isinstance(reason.value.args[0], list) else []
        return "; ".join(p for p in parts if p) or str(reason.value)
    return None


def load_certificate(key_path: str, cert_path: str) -> ssl.PrivateCertificate:
    with open(cert_path, "rb") as f:
        cert = f.read()
    with open(key_path, "rb") as f:
        key = f.read()
    return ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)


class LinkTLSProtocol(BatchedTLSProtocol):
    """
    Twisted's TLS layer, with the record work batched per write and per read
    (L{pipegate._compat.BatchedTLSProtocol}: a 64 KiB mux frame is one C{SSL_write},
    one C{bio_read} and one transport write instead of 5, 5 and 5, and everything
    received is delivered in one C{dataReceived}).

    C{raw_bytes_received} tells a link whether its peer sent anything at all: a plain
    TCP probe (a balancer's health check, C{nc -z}) sends nothing.  It counts the first
    read only (0: nothing yet): after it, reads go to the layer's own C{dataReceived}
    without this one in between (one call less per link read), until the connection is lost.
    """

    raw_bytes_received = 0

    def dataReceived(self, data):
        self.raw_bytes_received += len(data)
        if self.raw_bytes_received:
            self.dataReceived = MethodType(BatchedTLSProtocol.dataReceived, self)
        super().dataReceived(data)

    def connectionLost(self, reason):
        self.__dict__.pop("dataReceived", None)   # (it refers to this layer: no cycle left behind)
        super().connectionLost(reason)


class LinkTLSFactory(BatchedTLSFactory):
    """C{TLSMemoryBIOFactory} making L{LinkTLSProtocol}s with whole writes."""

    protocol = LinkTLSProtocol


@implementer(interfaces.IStreamClientEndpoint)
class _LinkTLSClientEndpoint:
    """C{endpoints.wrapClientTLS} with L{LinkTLSFactory}."""

    def __init__(self, creator, wrapped, description: str = "?") -> None:
        self._creator = creator
        self._wrapped = wrapped
        self._description = description

    def __repr__(self) -> str:   # in ClientService's "Scheduling retry N to connect ..." lines
        return f"<TLS link to {self._description}>"

    def connect(self, factory):
        return self._wrapped.connect(LinkTLSFactory(self._creator, True, factory)).addCallback(
            lambda protocol: protocol.wrappedProtocol)


def server_factory(certificate: ssl.PrivateCertificate, factory):
    options = ssl.CertificateOptions(
        privateKey=certificate.privateKey.original, certificate=certificate.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    return LinkTLSFactory(options, False, factory)


def client_endpoint(reactor, description: str, verify_hostname: str | None = None,
                    ca_file: str | None = None):
    """A client endpoint for C{description} (tcp:HOST:PORT) wrapped in TLS."""
    plain = endpoints.clientFromString(reactor, description)
    if verify_hostname:
        trust = None
        if ca_file:
            with open(ca_file, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        creator = ssl.optionsForClientTLS(verify_hostname, trustRoot=trust)
    else:
        creator = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    return _LinkTLSClientEndpoint(creator, plain, description)
