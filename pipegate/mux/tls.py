"""
TLS for mux links: a node certificate (generated when none is given) and the server
and client sides of Twisted's TLS layer around plain stream endpoints.

Peers are authenticated by the router secret, bound to the TLS session through the
keying-material exporter (see docs/protocol.md section 2); certificate checks are
optional (C{--tls-verify}) on top of that.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet import endpoints, interfaces, ssl
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

# Large enough for a whole mux frame (64 KiB of DATA plus record overhead) in one read.
_BIO_READ = 2**18
# More than the plaintext of one TLS record (16 KiB); OpenSSL returns at most one per call.
_RECV = 2**15


def generated_certificate(name: str = "pipegate-node") -> ssl.PrivateCertificate:
    """A fresh self-signed P-256 certificate, valid for ten years."""
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ssl.PrivateCertificate.loadPEM(pem)


def load_certificate(key_path: str, cert_path: str) -> ssl.PrivateCertificate:
    with open(cert_path, "rb") as f:
        cert = f.read()
    with open(key_path, "rb") as f:
        key = f.read()
    return ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)


class LinkTLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS layer, with the record work batched per write and per read.

    The base class feeds OpenSSL 16 KiB per C{SSL_write} and writes the send BIO to
    the socket after each, and hands every decrypted record to the protocol on its
    own: a 64 KiB mux frame costs five transport writes on one side and five
    C{dataReceived} calls on the other, each a dozen Python calls. Here a write goes
    to OpenSSL whole (a memory BIO takes all of it), the send BIO is drained into
    one transport write, and the plaintext of everything received is delivered in
    one C{dataReceived}. Handshake, errors, close and producers are the base class's.
    A 64 KiB frame is one C{SSL_write}, one C{bio_read} and one transport write
    instead of 5, 5 and 5 (with L{whole_writes}).

    C{raw_bytes_received} tells a link whether its peer sent anything at all: a plain
    TCP probe (a balancer's health check, C{nc -z}) sends nothing.

    Overrides private methods of C{TLSMemoryBIOProtocol}; tests/test_mux_tls.py checks
    that they are still there with the signatures relied on here.
    """

    raw_bytes_received = 0

    def dataReceived(self, data):
        self.raw_bytes_received += len(data)
        super().dataReceived(data)

    def _write(self, bytes):
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        data = memoryview(bytes)
        while data:
            try:
                sent = connection.send(data)
            except WantReadError:
                self._bufferedWrite(data.tobytes())
                break
            except Error:
                self._tlsShutdownFinished(Failure())
                return
            data = data[sent:]
        self._flushSendBIO()

    def _flushSendBIO(self):
        connection = self._tlsConnection
        chunks = []
        while True:
            try:
                chunk = connection.bio_read(_BIO_READ)
            except WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < _BIO_READ:
                break
        if chunks:
            self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _flushReceiveBIO(self):
        connection = self._tlsConnection
        chunks = []
        while not self._lostTLSConnection:
            try:
                chunks.append(connection.recv(_RECV))
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(chunks)
                chunks = []
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                failure = Failure()
                self._deliver(chunks)
                chunks = []
                self._tlsShutdownFinished(failure)
        self._deliver(chunks)
        self._flushSendBIO()

    def _deliver(self, chunks):
        if chunks and not self._aborted:
            ProtocolWrapper.dataReceived(self, chunks[0] if len(chunks) == 1 else b"".join(chunks))


def whole_writes(connection) -> None:
    """
    Let one C{SSL_write} take a whole buffer.

    pyOpenSSL turns on C{SSL_MODE_ENABLE_PARTIAL_WRITE}, with which C{SSL_write}
    returns after each 16 KiB record; into a memory BIO, which never blocks, it
    can write every record of the buffer in one call instead. (No public call
    clears a mode on one connection: pyOpenSSL's C{_ssl} and C{_lib}.)
    """
    lib, ssl_pointer = getattr(SSL, "_lib", None), getattr(connection, "_ssl", None)
    if lib is None or ssl_pointer is None or not hasattr(lib, "SSL_clear_mode"):
        return  # a pyOpenSSL without these internals: partial writes, still correct (the loop in _write)
    lib.SSL_clear_mode(ssl_pointer, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)


class LinkTLSFactory(TLSMemoryBIOFactory):
    """C{TLSMemoryBIOFactory} making L{LinkTLSProtocol}s with whole writes."""

    protocol = LinkTLSProtocol

    def __init__(self, contextFactory, isClient: bool, wrappedFactory, clock=None) -> None:
        super().__init__(contextFactory, isClient, wrappedFactory, clock)
        create = self._creatorCallable

        def creator(protocol):
            connection = create(protocol)
            whole_writes(connection)
            return connection
        self._creatorCallable = creator


@implementer(interfaces.IStreamClientEndpoint)
class _LinkTLSClientEndpoint:
    """C{endpoints.wrapClientTLS} with L{LinkTLSFactory}."""

    def __init__(self, creator, wrapped) -> None:
        self._creator = creator
        self._wrapped = wrapped

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
    return _LinkTLSClientEndpoint(creator, plain)
