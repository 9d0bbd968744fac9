"""
One ACME (RFC 8555) order, start to finish, with certbot's C{acme} library.

Everything here blocks (the library speaks HTTP with C{requests}): the relay runs
L{Issuer.issue} in a bounded thread pool (L{pipegate.http.acme.AcmeManager}), never on
the reactor thread.  It logs nothing itself; outcomes go back to the reactor thread as
an L{Issued} or an L{AcmeFailure}, and the manager logs them.

This module is imported only at the first order (L{pipegate.http.acme.LazyIssuer}):
C{acme}, C{josepy} and C{requests} cost about 5 MiB of resident memory that a relay
without ACME, or one restarted with valid certificates, does not need.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time
from collections.abc import Callable

import attrs
import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pipegate.http.certstore import CertStore, StoredCertificate

USER_AGENT = "pipegate-acme"


@attrs.frozen
class Issued:
    certificate: StoredCertificate
    # The CA's suggested renewal time (ARI), as POSIX seconds, when it offers one.
    renew_at: float | None = None


class AcmeFailure(Exception):
    """
    An order that did not end in a certificate.  C{kind}: C{unreachable} (the CA's
    directory or API could not be reached), C{challenge} (validation failed), C{ca_error}
    (the CA said no), C{rate_limited}, C{timeout}, C{cancelled}.  C{problem}: the CA's
    problem document(s) as text, or the network error.
    """

    def __init__(self, kind: str, problem: str, retry_after: float | None = None) -> None:
        super().__init__(kind, problem, retry_after)
        self.kind = kind
        self.problem = problem
        self.retry_after = retry_after   # seconds, from the CA's Retry-After header

    @property
    def rate_limited(self) -> bool:
        return self.kind == "rate_limited"

    def __str__(self) -> str:
        return f"{self.kind}: {self.problem}"


def _problem(error: messages.Error) -> str:
    """RFC 7807 problem document as one line (type, detail, subproblems)."""
    text = f"{error.typ}: {error.detail or error.description or error.title or ''}".strip()
    for sub in error.subproblems or ():
        ident = getattr(sub.identifier, "value", "") if getattr(sub, "identifier", None) else ""
        text += f"; [{ident}] {sub.typ}: {sub.detail or ''}"
    return text


def _unreachable(error: requests.RequestException, url: str) -> str:
    """
    A network failure in a few words: requests wraps the cause (refused, unknown host,
    certificate not trusted) two or three levels deep in text an operator has to dig through.
    """
    seen: set[int] = set()
    stack: list = [error]
    cause = None
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return (f"cannot reach {url}: certificate verify failed: {item.verify_message} "
                    "(a CA of your own: --acme-ca-file)")
        if isinstance(item, socket.gaierror):
            return f"cannot reach {url}: unknown host name ({item.strerror})"
        if isinstance(item, OSError) and item.strerror and cause is None:
            cause = item.strerror
        stack.extend([getattr(item, "reason", None), item.__cause__, item.__context__, *item.args])
    if cause is None and isinstance(error, requests.Timeout):
        cause = "timed out"
    return f"cannot reach {url}: {cause or f'{type(error).__name__}: {error}'}"


class Issuer:
    """
    Orders certificates from one ACME directory with HTTP-01.  C{publish(token, text)}
    and C{withdraw(token)} make the relay's plain listener answer
    C{/.well-known/acme-challenge/<token>}; they are called from the issuing thread and
    must be thread-safe.
    """

    def __init__(self, directory_url: str, store: CertStore, publish: Callable[[str, str], None],
                 withdraw: Callable[[str], None], email: str | None = None, ca_file: str | None = None,
                 timeout: float = 30.0, poll_timeout: float = 90.0) -> None:
        self.directory_url = directory_url
        self.store = store
        self.publish = publish
        self.withdraw = withdraw
        self.email = email
        self.verify: bool | str = ca_file or True
        self.timeout = timeout
        self.poll_timeout = poll_timeout
        self.cancelled = threading.Event()
        self._account_lock = threading.Lock()
        self._jwk: jose.JWKEC | None = None

    def cancel(self) -> None:
        """Make orders in progress stop at their next step (service stopping)."""
        self.cancelled.set()

    def _check(self) -> None:
        if self.cancelled.is_set():
            raise AcmeFailure("cancelled", "the relay is stopping")

    def issue(self, name: str) -> Issued:
        """Order, validate and download a certificate for C{name}; save it in the store."""
        retry_after: list[float] = []

        def note_retry_after(response, *args, **kwargs):
            if response.status_code in (429, 503) and "Retry-After" in response.headers:
                when = client.ClientV2.retry_after(response, 0)
                retry_after.append(max(0.0, (when - datetime.datetime.now()).total_seconds()))

        try:
            return self._issue(name, note_retry_after)
        except AcmeFailure:
            raise
        except messages.Error as e:
            kind = "rate_limited" if e.code == "rateLimited" else "ca_error"
            raise AcmeFailure(kind, _problem(e), retry_after[-1] if retry_after else None) from None
        except errors.ValidationError as e:
            problems = []
            for authzr in e.failed_authzrs:
                for challb in authzr.body.challenges:
                    if challb.error is not None:
                        problems.append(f"[{authzr.body.identifier.value}] {_problem(challb.error)}")
            raise AcmeFailure("challenge", "; ".join(problems) or "authorization invalid") from None
        except errors.TimeoutError:
            raise AcmeFailure("timeout", f"no certificate within {self.poll_timeout:g} s") from None
        except requests.RequestException as e:
            raise AcmeFailure("unreachable", _unreachable(e, self.directory_url)) from None
        except errors.Error as e:
            raise AcmeFailure("ca_error", f"{type(e).__name__}: {e}",
                              retry_after[-1] if retry_after else None) from None

    def _network(self, hook) -> client.ClientNetwork:
        with self._account_lock:
            if self._jwk is None:
                self._jwk = jose.JWKEC(key=self.store.account_key())
        net = client.ClientNetwork(self._jwk, alg=jose.ES256, verify_ssl=self.verify,
                                   user_agent=USER_AGENT, timeout=int(self.timeout))
        net.session.hooks["response"].append(hook)   # requests' public hook API
        return net

    def _account(self, acme: client.ClientV2, net: client.ClientNetwork, fresh: bool = False) -> None:
        with self._account_lock:
            uri = None if fresh else self.store.account_uri(self.directory_url)
            if uri is None:
                registration = messages.NewRegistration.from_data(
                    email=self.email, terms_of_service_agreed=True)
                try:
                    uri = acme.new_account(registration).uri
                except errors.ConflictError as e:   # this key has an account already
                    uri = e.location
                self.store.save_account_uri(self.directory_url, uri)
            net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())

    def _issue(self, name: str, hook) -> Issued:
        self._check()
        net = self._network(hook)
        try:
            acme = client.ClientV2(client.ClientV2.get_directory(self.directory_url, net), net)
            self._check()
            self._account(acme, net)
            key = ec.generate_private_key(ec.SECP256R1())
            key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            csr = crypto_util.make_csr(key_pem, [name])
            try:
                order = acme.new_order(csr)
            except messages.Error as e:
                if e.code != "accountDoesNotExist":
                    raise
                self._account(acme, net, fresh=True)   # the CA forgot us (a reset test CA)
                order = acme.new_order(csr)
            published = []
            try:
                for authzr in order.authorizations:
                    self._check()
                    if authzr.body.status == messages.STATUS_VALID:
                        continue   # the CA reuses an earlier validation
                    challb = next((c for c in authzr.body.challenges
                                   if isinstance(c.chall, challenges.HTTP01)), None)
                    if challb is None:
                        raise AcmeFailure("ca_error", f"no http-01 challenge offered for {name}")
                    response, validation = challb.response_and_validation(net.key)
                    token = challb.chall.encode("token")
                    self.publish(token, validation)
                    published.append(token)
                    acme.answer_challenge(challb, response)
                started = time.monotonic()
                self._wait_for_validation(acme, order, started)
                self._check()
                remaining = max(1.0, self.poll_timeout - (time.monotonic() - started))
                order = acme.finalize_order(order, datetime.datetime.now() + datetime.timedelta(seconds=remaining))
            finally:
                for token in published:
                    self.withdraw(token)
            chain = order.fullchain_pem.encode()
            stored = self.store.save(name, key_pem, chain)
            return Issued(stored, self._renew_at(acme, chain))
        finally:
            net.session.close()

    def _wait_for_validation(self, acme: client.ClientV2, order: messages.OrderResource, started: float) -> None:
        """
        Poll the order's authorizations until all are valid.  The library's own loop
        (poll_and_finalize) sleeps without looking at L{cancel}; this one waits on it, so
        a stopping relay is not held up for the whole polling deadline.
        """
        pending = [a for a in order.authorizations if a.body.status != messages.STATUS_VALID]
        while pending:
            self._check()
            if time.monotonic() - started > self.poll_timeout:
                raise errors.TimeoutError()
            waiting, pause = [], 1.0
            for authzr in pending:
                authzr, response = acme.poll(authzr)
                if authzr.body.status == messages.STATUS_INVALID:
                    raise errors.ValidationError([authzr])
                if authzr.body.status != messages.STATUS_VALID:
                    waiting.append(authzr)
                    when = acme.retry_after(response, 1)
                    pause = max(pause, (when - datetime.datetime.now()).total_seconds())
            pending = waiting
            if pending:
                self.cancelled.wait(min(pause, 10.0))

    def _renew_at(self, acme: client.ClientV2, chain: bytes) -> float | None:
        """The CA's renewal window (ARI), if its directory has C{renewalInfo}."""
        try:
            acme.directory["renewalInfo"]
        except KeyError:
            return None
        try:
            when, _ = acme.renewal_time(chain)
        except Exception:   # only a hint: the certificate is saved, fall back to 2/3 of its life
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.astimezone()
        return when.timestamp()
