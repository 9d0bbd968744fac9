"""
TLS on a listener from PEM files that can be reloaded (SIGHUP) without a restart.

L{ReloadingServerTLS} hands every new connection an C{SSL.Connection} built from the
current certificate; a reload swaps the certificate for connections made afterwards,
while connections already made keep theirs.  A failed reload (missing file, key not
matching) logs why and keeps serving the old certificate.
"""

from __future__ import annotations

import signal

from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer


class CertificateError(ValueError):
    pass


def load_options(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """CertificateOptions from a PEM certificate (chain) file and a PEM key file."""
    try:
        with open(cert_path, "rb") as f:
            chain_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise CertificateError(f"{e.filename}: {e.strerror}") from None
    if not chain_pem.strip():
        raise CertificateError(f"{cert_path}: no certificate")
    return options_from_pem(chain_pem, key_pem)


def options_from_pem(chain_pem: bytes, key_pem: bytes) -> ssl.CertificateOptions:
    """
    CertificateOptions from PEM text: the first certificate is the server's, the rest
    its chain (sent to clients); L{CertificateError} if unreadable or not matching.
    """
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
        marker = b"-----END CERTIFICATE-----"
        blocks = [b + marker for b in chain_pem.split(marker) if b.strip()]
        certs = [crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks]
    except crypto.Error as e:
        raise CertificateError(f"cannot read the certificate or key: {e}") from None
    if not certs:
        raise CertificateError("no certificate")
    options = ssl.CertificateOptions(privateKey=key, certificate=certs[0], extraCertChain=certs[1:])
    try:
        options.getContext().check_privatekey()
    except SSL.Error:
        raise CertificateError("the key does not match the certificate") from None
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingServerTLS:
    """Server TLS whose certificate can be replaced with L{reload}."""

    log = Logger()

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.options = load_options(cert_path, key_path)

    def reload(self) -> bool:
        try:
            self.options = load_options(self.cert_path, self.key_path)
        except CertificateError as e:
            self.log.error("TLS reload failed, keeping the previous certificate: {error}", error=e)
            return False
        self.log.info("TLS certificate reloaded from {path}", path=self.cert_path)
        return True

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.options.getContext(), None)


def nothing_to_reload() -> None:
    Logger().info("SIGHUP: nothing to reload (no --tls-cert)")


class ReloadOnSignal(service.Service):
    """Calls C{reload()} on the reactor thread when the process gets C{signum} (SIGHUP)."""

    def __init__(self, reload, reactor, signum: int = signal.SIGHUP) -> None:
        self.reload = reload
        self.reactor = reactor
        self.signum = signum
        self._previous = None
        self._installed = False

    def privilegedStartService(self):
        # twistd listens (and logs "starting on") in privilegedStartService, before any
        # startService: install the handler now so that a SIGHUP sent as soon as the port
        # answers finds it, instead of the default action, which ends the process.
        super().privilegedStartService()
        self._install()

    def startService(self):
        super().startService()
        self._install()

    def _install(self):
        if not self._installed:
            self._installed = True
            self._previous = signal.signal(
                self.signum, lambda *_: self.reactor.callFromThread(self.reload))

    def stopService(self):
        if self._installed:
            self._installed = False
            if self._previous is not None:  # None: a handler set outside Python, not restorable
                signal.signal(self.signum, self._previous)
            self._previous = None
        return super().stopService()
