"""
The options of automatic HTTPS (C{--acme-directory}, C{--https}, ...) and their checks,
apart from the ACME machinery (pipegate/http/acme.py): a relay without
C{--acme-directory} never imports that (about 0.8 MiB of resident memory).
"""

from __future__ import annotations

from twisted.python import usage

from pipegate.config import positive_int

DEFAULT_STATE = "/var/lib/pipegate/acme"


ACME_FLAGS = [
    ["https-redirect", None, "With --https: answer every plain-HTTP request except ACME challenges "
                             "with a 308 redirect to https."],
]
ACME_PARAMETERS = [
    ["acme-directory", None, None, "ACME directory URL; turns automatic HTTPS on (needs --domain and --https)."],
    ["https", None, None, "Server endpoint of the TLS listener that serves the ACME certificates by SNI, "
                          "e.g. tcp:443."],
    ["acme-state", None, DEFAULT_STATE, "Directory for the ACME account key, certificate keys and certificates."],
    ["acme-email", None, None, "Contact e-mail for the ACME account (optional)."],
    ["acme-ca-file", None, None, "PEM file of CA certificates to trust for the ACME server's own HTTPS."],
    ["acme-max-orders", None, "2", "ACME orders in progress at once; more wait in a queue.", positive_int],
]


class AcmeOptions:
    """Checks of the ACME options, for an L{EnvOptions} that lists the ones above."""

    def check_acme(self) -> None:
        directory = self["acme-directory"]
        if self["https-redirect"] and not self["https"]:
            raise usage.UsageError("--https-redirect: needs --https")
        if not directory:
            if self["https"]:
                raise usage.UsageError("--https: needs --acme-directory (the certificates come from ACME)")
            return
        if not directory.startswith(("https://", "http://")):
            raise usage.UsageError(f"--acme-directory: {directory!r} is not an http(s) URL")
        if not self["https"]:
            raise usage.UsageError("--acme-directory: needs --https (the listener that serves the certificates)")
        if not self["domain"] or not self["domain"].strip("."):
            raise usage.UsageError("--acme-directory: needs --domain (the name to get certificates for)")
        from pipegate.http.certstore import CertStore, StoreError, valid_host_name

        domain = self["domain"].strip(".").lower()
        if not valid_host_name(domain):
            raise usage.UsageError(f"--domain: {domain!r} is not a host name ACME can certify")
        from pipegate.config import check_server_endpoint

        check_server_endpoint("https", self["https"])
        ca_file = self["acme-ca-file"]
        if ca_file:
            try:
                with open(ca_file, "rb") as f:
                    if b"-----BEGIN CERTIFICATE-----" not in f.read():
                        raise usage.UsageError(f"--acme-ca-file: {ca_file}: no PEM certificate")
            except OSError as e:
                raise usage.UsageError(f"--acme-ca-file: {ca_file}: {e.strerror}") from None
        email = self["acme-email"]
        if email is not None and (email.count("@") != 1 or any(c.isspace() for c in email)):
            raise usage.UsageError(f"--acme-email: {email!r} is not an e-mail address")
        store = CertStore(self["acme-state"])
        try:
            store.prepare()
        except StoreError as e:
            raise usage.UsageError(f"--acme-state: {e}") from None
        self["acme-store"] = store


def acme_for(options, relay, reactor):
    """The ACME parts for C{pipegate-server} (L{pipegate.http.acme.AcmeWiring}), or None without C{--acme-directory}."""
    if not options.get("acme-directory"):
        return None
    from pipegate.http.acme import acme_for

    return acme_for(options, relay, reactor)
