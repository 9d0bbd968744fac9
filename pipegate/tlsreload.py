"""
TLS on a listener from PEM files that can be reloaded (SIGHUP) without a restart.

L{ReloadingServerTLS} hands every new connection an C{SSL.Connection} built from the
current certificate; a reload swaps the certificate for connections made afterwards,
while connections already made keep theirs.  A failed reload (missing file, key not
matching) logs why and keeps serving the old certificate.  A certificate that has expired,
is not valid yet or expires within L{SOON} is loaded all the same (a reload can replace it
without a restart) and named in one warning line (L{validity_problem}).
"""

from __future__ import annotations

import datetime
import signal

from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer


class CertificateError(ValueError):
    """A certificate or key file that cannot serve; C{option} names the file's option."""

    option = "tls-cert"


#: A certificate expiring within this is worth a warning (Let's Encrypt renews 30 days ahead).
SOON = datetime.timedelta(days=14)


def validity_problem(not_before: datetime.datetime, not_after: datetime.datetime,
                     now: datetime.datetime) -> str | None:
    """What is wrong with a certificate's validity period at C{now}, or None."""
    if now > not_after:
        return f"the certificate expired on {not_after.isoformat()}; clients will refuse it"
    if now < not_before:
        return f"the certificate is not valid before {not_before.isoformat()} (check the clock); clients will refuse it"
    if not_after - now < SOON:
        days = (not_after - now).total_seconds() / 86400
        return f"the certificate expires on {not_after.isoformat()}, in {days:.1f} days"
    return None


def certificate_problem(options: ssl.CertificateOptions, clock) -> str | None:
    """L{validity_problem} of the certificate C{options} serve, at C{clock}'s time."""
    cert = options.certificate.to_cryptography()
    now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.timezone.utc)
    return validity_problem(cert.not_valid_before_utc, cert.not_valid_after_utc, now)


def load_options(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """CertificateOptions from a PEM certificate (chain) file and a PEM key file."""
    for path, option in ((cert_path, "tls-cert"), (key_path, "tls-key")):
        try:
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as e:
            error = CertificateError(f"{e.filename}: {e.strerror}")
            error.option = option
            raise error from None
        if option == "tls-cert":
            chain_pem = pem
        else:
            key_pem = pem
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

    def __init__(self, cert_path: str, key_path: str, clock=None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.cert_path = cert_path
        self.key_path = key_path
        self.clock = clock
        self.options = load_options(cert_path, key_path)
        self.problem = certificate_problem(self.options, clock)   # logged by the service at startup

    def warn_problem(self) -> None:
        if self.problem is not None:
            self.log.warn("--tls-cert {path}: {tls_problem}", path=self.cert_path, tls_problem=self.problem)

    def reload(self) -> bool:
        try:
            self.options = load_options(self.cert_path, self.key_path)
        except CertificateError as e:
            self.log.error("TLS reload failed, keeping the previous certificate: {error}", error=e)
            return False
        self.log.info("TLS certificate reloaded from {path}", path=self.cert_path)
        self.problem = certificate_problem(self.options, self.clock)
        self.warn_problem()
        return True

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.options.getContext(), None)


def nothing_to_reload() -> None:
    Logger().info("SIGHUP: nothing to reload (no --tls-cert, no --revoked)")


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
