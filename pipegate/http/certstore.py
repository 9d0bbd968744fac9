"""
The ACME state directory (C{--acme-state}): the account key, the account's URL, and one
file per name holding that name's private key and certificate chain.

Layout (the directory is mode 0700, every file 0600)::

    account.key          PEM private key of the ACME account (EC P-256)
    account.json         {"directory": URL, "uri": account URL} of the registration
    certs/<name>.pem     PEM private key, then the certificate, then its chain

Keeping a name's key and chain in one file means a single rename replaces both, so a
reader never sees a new key with an old certificate.  Every write goes to a temporary
file in the same directory, is flushed and fsynced, renamed over the old file, and the
directory is fsynced: a crash leaves either the old file or the new one, never half a key.

Blocking file I/O: call from the issuing thread or at startup, not from a hot path.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import stat

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# A host name as we order it: lower-case LDH labels (RFC 1123), dot-separated, no
# wildcard.  This is also what makes "<name>.pem" a safe file name.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")   # used with fullmatch
_CERT_MARK = b"-----BEGIN CERTIFICATE-----"


class StoreError(Exception):
    """The state directory cannot be used (permissions, not a directory, ...)."""


def valid_host_name(name: str) -> bool:
    return len(name) <= 253 and bool(HOST_NAME.fullmatch(name))


@attrs.frozen
class StoredCertificate:
    """A name's key and chain as PEM, with the leaf's validity as POSIX seconds."""

    name: str
    key_pem: bytes
    chain_pem: bytes            # leaf first, then the intermediates
    not_before: float
    not_after: float

    @classmethod
    def from_pem(cls, name: str, key_pem: bytes, chain_pem: bytes) -> StoredCertificate:
        leaf = x509.load_pem_x509_certificate(chain_pem)
        return cls(name, key_pem, chain_pem, leaf.not_valid_before_utc.timestamp(),
                   leaf.not_valid_after_utc.timestamp())

    def expiry(self) -> str:
        """notAfter as an ISO 8601 UTC string."""
        return datetime.datetime.fromtimestamp(self.not_after, datetime.timezone.utc).isoformat()


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write C{data} to C{path} all or nothing: temporary file, fsync, rename, fsync dir."""
    directory = os.path.dirname(path) or "."
    temporary = f"{path}.tmp.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)   # O_CREAT's mode is masked by the umask; this is not
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    os.replace(temporary, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _ensure_private_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise StoreError(f"{path}: not a directory")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(path, 0o700)
        if not os.access(path, os.W_OK | os.X_OK):
            raise StoreError(f"{path}: not writable")
    except OSError as e:
        raise StoreError(f"{e.filename or path}: {e.strerror}") from None


class CertStore:
    """The files under one C{--acme-state} directory."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.certs = os.path.join(self.path, "certs")

    def prepare(self) -> None:
        """
        Create the directories (0700) or fix their modes, and remove temporary files a
        crash left behind; L{StoreError} if unusable.
        """
        _ensure_private_dir(self.path)
        _ensure_private_dir(self.certs)
        for directory in (self.path, self.certs):   # leftovers of a write cut short by a crash
            for entry in os.listdir(directory):
                if ".tmp." in entry:
                    try:
                        os.unlink(os.path.join(directory, entry))
                    except OSError:
                        pass

    # -- account
    def account_key(self) -> ec.EllipticCurvePrivateKey:
        """The account key, made and saved on first use."""
        path = os.path.join(self.path, "account.key")
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
            if isinstance(key, ec.EllipticCurvePrivateKey):
                return key
        except FileNotFoundError:
            pass
        key = ec.generate_private_key(ec.SECP256R1())
        atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
        return key

    def account_uri(self, directory: str) -> str | None:
        """The account URL registered at C{directory}, if any (another CA: None)."""
        try:
            with open(os.path.join(self.path, "account.json"), "rb") as f:
                saved = json.loads(f.read())
        except (OSError, ValueError):
            return None
        if isinstance(saved, dict) and saved.get("directory") == directory and isinstance(saved.get("uri"), str):
            return saved["uri"]
        return None

    def save_account_uri(self, directory: str, uri: str) -> None:
        atomic_write(os.path.join(self.path, "account.json"),
                     json.dumps({"directory": directory, "uri": uri}).encode())

    # -- certificates
    def _cert_path(self, name: str) -> str:
        if not valid_host_name(name):
            raise ValueError(f"not a host name: {name!r}")
        return os.path.join(self.certs, name + ".pem")

    def save(self, name: str, key_pem: bytes, chain_pem: bytes) -> StoredCertificate:
        stored = StoredCertificate.from_pem(name, key_pem, chain_pem)
        atomic_write(self._cert_path(name), key_pem.rstrip(b"\n") + b"\n" + chain_pem)
        return stored

    def load(self, name: str) -> StoredCertificate | None:
        try:
            with open(self._cert_path(name), "rb") as f:
                data = f.read()
        except OSError:
            return None
        cut = data.find(_CERT_MARK)
        if cut <= 0:
            return None
        try:
            return StoredCertificate.from_pem(name, data[:cut], data[cut:])
        except ValueError:
            return None

    def load_all(self) -> list[StoredCertificate]:
        """Every readable certificate in the store (unreadable files are skipped)."""
        try:
            names = sorted(os.listdir(self.certs))
        except OSError:
            return []
        found = []
        for entry in names:
            if entry.endswith(".pem") and valid_host_name(entry[:-4]):
                stored = self.load(entry[:-4])
                if stored is not None:
                    found.append(stored)
        return found
