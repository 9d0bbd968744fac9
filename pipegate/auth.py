"""
JWT minting and verification for connector logins.

Run as C{python -m pipegate.auth} to mint a token, like C{pipegate token}.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs
import jwt

if TYPE_CHECKING:  # the command line only: a service does not load argparse
    import argparse

ALLOWED_ALGORITHMS = ("HS256", "HS384", "HS512")
MIN_SECRET_BYTES = 32  # what PyJWT asks of an HS256 key
MAX_TTL_DAYS = 3650
LEEWAY_SECONDS = 30
CONNECTION_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
RESERVED_IDS = frozenset({"healthz"})


class ConfigError(ValueError):
    """A setting is missing or invalid; the message is one line naming it."""


class TokenError(ValueError):
    """A token was refused; the message says why (and never contains the token)."""


def valid_connection_id(value: str) -> bool:
    return bool(CONNECTION_ID.match(value)) and value.lower() not in RESERVED_IDS


def parse_algorithms(value: str) -> tuple[str, ...]:
    """Accept a JSON list (C{'["HS256"]'}) or a comma list (C{HS256,HS512})."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"PIPEGATE_JWT_ALGORITHMS: not a JSON list: {e}") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError("PIPEGATE_JWT_ALGORITHMS: must be a list of strings")
    else:
        items = text.split(",")
    algorithms = tuple(i.strip() for i in items if i.strip())
    if not algorithms:
        raise ConfigError("PIPEGATE_JWT_ALGORITHMS: no algorithm given")
    for alg in algorithms:
        if alg not in ALLOWED_ALGORITHMS:
            raise ConfigError(
                f"PIPEGATE_JWT_ALGORITHMS: {alg!r} is not one of {', '.join(ALLOWED_ALGORITHMS)}"
            )
    return algorithms


@attrs.frozen(repr=False)
class JWTSettings:
    secret: str
    algorithms: tuple[str, ...] = ("HS256",)
    issuer: str = "pipegate"
    audience: str = "pipegate"
    ttl_days: float = 21.0

    def __repr__(self) -> str:  # never print the secret
        return f"JWTSettings(algorithms={self.algorithms!r}, issuer={self.issuer!r}, ...)"

    @classmethod
    def from_values(
        cls, secret: str | None, algorithms: str | None = None, issuer: str | None = None,
        audience: str | None = None, ttl_days: str | None = None,
    ) -> JWTSettings:
        if not secret:
            raise ConfigError(
                f"PIPEGATE_JWT_SECRET is not set (export a secret of {MIN_SECRET_BYTES} or more bytes,"
                " e.g. `openssl rand -hex 32`)")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"PIPEGATE_JWT_SECRET is shorter than {MIN_SECRET_BYTES} bytes")
        algs = parse_algorithms(algorithms) if algorithms else ("HS256",)
        ttl = 21.0
        if ttl_days not in (None, ""):
            try:
                ttl = float(ttl_days)
            except ValueError:
                raise ConfigError(f"PIPEGATE_JWT_TTL_DAYS: not a number: {ttl_days!r}") from None
            if not 0 < ttl <= MAX_TTL_DAYS:
                raise ConfigError(f"PIPEGATE_JWT_TTL_DAYS: must be above 0 and at most {MAX_TTL_DAYS}")
        return cls(secret, algs, issuer or "pipegate", audience or "pipegate", ttl)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> JWTSettings:
        return cls.from_values(
            environ.get("PIPEGATE_JWT_SECRET"), environ.get("PIPEGATE_JWT_ALGORITHMS"),
            environ.get("PIPEGATE_JWT_ISSUER"), environ.get("PIPEGATE_JWT_AUDIENCE"),
            environ.get("PIPEGATE_JWT_TTL_DAYS"),
        )


_TTL = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*\Z")
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_ttl(value: str) -> float:
    """C{90s}, C{30m}, C{1h}, C{7d}, C{2w} in seconds; ConfigError names C{--ttl}."""
    match = _TTL.match(value)
    if match is None:
        raise ConfigError(f"--ttl: expected a number with a unit s, m, h, d or w (e.g. 1h, 7d), got {value!r}")
    seconds = float(match.group(1)) * _TTL_UNITS[match.group(2)]
    if not 0 < seconds <= MAX_TTL_DAYS * 86400:
        raise ConfigError(f"--ttl: must be above 0 and at most {MAX_TTL_DAYS}d")
    return seconds


@attrs.frozen
class Claims:
    """What the relay takes from a verified token."""

    sub: str
    jti: str | None = None   # None: a token minted elsewhere without one
    shared: bool = False     # minted with --shared: may serve one tunnel with other shared tokens


def mint(settings: JWTSettings, connection_id: str, now: float, *, shared: bool = False,
         ttl_seconds: float | None = None, jti: str | None = None) -> str:
    """
    Sign a token for C{connection_id} with the first configured algorithm.  It carries a
    unique C{jti} (C{jti} pins it, for callers that print it) and, with C{shared}, the
    claim C{"shared": true}.
    """
    if not valid_connection_id(connection_id):
        raise ConfigError(
            f"connection id {connection_id!r}: use 1-64 of A-Z a-z 0-9 _ - (not 'healthz')"
        )
    issued = int(now)
    claims = {
        "sub": connection_id,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(settings.ttl_days * 86400 if ttl_seconds is None else ttl_seconds),
        "iss": settings.issuer,
        "aud": settings.audience,
        "jti": jti or uuid.uuid4().hex,
    }
    if shared:
        claims["shared"] = True
    return jwt.encode(claims, settings.secret, algorithm=settings.algorithms[0])


def verify(settings: JWTSettings, token: str, now: float) -> str:
    """Return the token's connection id (C{sub}) or raise L{TokenError}."""
    return verify_claims(settings, token, now).sub


def verify_claims(settings: JWTSettings, token: str, now: float) -> Claims:
    """Return the token's L{Claims} or raise L{TokenError}."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("malformed token") from None
    if header.get("alg") not in settings.algorithms:
        raise TokenError(f"token algorithm {header.get('alg')!r} is not allowed")
    try:
        claims = jwt.decode(
            token, settings.secret, algorithms=list(settings.algorithms),
            audience=settings.audience, issuer=settings.issuer, leeway=LEEWAY_SECONDS,
            options={"require": ["sub", "exp", "nbf", "iat", "iss", "aud"],
                     "verify_iat": False},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("token not yet valid") from None
    except jwt.InvalidAudienceError:
        raise TokenError("token audience not accepted") from None
    except jwt.InvalidIssuerError:
        raise TokenError("token issuer not accepted") from None
    except jwt.MissingRequiredClaimError as e:
        raise TokenError(f"token lacks the {e.claim!r} claim") from None
    except jwt.InvalidSignatureError:
        raise TokenError("token signature does not verify") from None
    except jwt.PyJWTError as e:
        raise TokenError(f"invalid token ({type(e).__name__})") from None
    # PyJWT checks exp/nbf against the wall clock; check them against `now` as well so
    # that callers with an injected clock get the same answer.
    if claims["exp"] + LEEWAY_SECONDS < now:
        raise TokenError("token expired")
    if claims["nbf"] - LEEWAY_SECONDS > now:
        raise TokenError("token not yet valid")
    sub = claims["sub"]
    if not isinstance(sub, str) or not valid_connection_id(sub):
        raise TokenError("token subject is not a valid connection id")
    jti = claims.get("jti")
    if jti is not None and (not isinstance(jti, str) or not jti or len(jti) > 128):
        raise TokenError("token jti is not a string of 1-128 characters")
    shared = claims.get("shared", False)
    if not isinstance(shared, bool):
        raise TokenError("token shared claim is not true or false")
    return Claims(sub, jti, shared)


def unverified_subject(token: str) -> str | None:
    """The C{sub} of a token without checking it (for display by a connector)."""
    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        return None
    return sub if isinstance(sub, str) else None


def token_lines(connection_id: str | None, environ: Mapping[str, str], now: float, *,
                shared: bool = False, ttl_seconds: float | None = None, show_id: bool = False) -> str:
    """
    The two lines printed by C{pipegate token} and C{python -m pipegate.auth}; with
    C{show_id} a third, C{Token-id: <jti>} (the id to put in the relay's C{--revoked} file).
    """
    settings = JWTSettings.from_environ(environ)
    cid = connection_id or environ.get("PIPEGATE_CONNECTION_ID") or uuid.uuid4().hex
    jti = uuid.uuid4().hex
    token = mint(settings, cid, now, shared=shared, ttl_seconds=ttl_seconds, jti=jti)
    lines = f"Connection-id: {cid}\nJWT Bearer:    {token}\n"
    if show_id:
        lines += f"Token-id:      {jti}\n"
    return lines


def cmd_token(args: argparse.Namespace) -> int:
    """C{pipegate token} (and C{python -m pipegate.auth}): print a connection id and a JWT."""
    try:
        ttl = parse_ttl(args.ttl) if args.ttl is not None else None
        sys.stdout.write(token_lines(args.connection_id, os.environ, time.time(), shared=args.shared,
                                     ttl_seconds=ttl, show_id=args.show_id))
    except ConfigError as e:
        print(f"pipegate token: {e}", file=sys.stderr)
        return 2
    return 0


def token_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of C{pipegate token}, added to C{parser}."""
    parser.add_argument("-c", "--connection-id", default=None,
                        help="pin the connection id (default: PIPEGATE_CONNECTION_ID, else random)")
    parser.add_argument("--ttl", default=None,
                        help="lifetime, e.g. 1h, 7d, 30m (default: PIPEGATE_JWT_TTL_DAYS, else 21 days)")
    parser.add_argument("--shared", action="store_true",
                        help="claim shared=true: connectors with shared tokens may serve one tunnel together")
    parser.add_argument("--show-id", action="store_true",
                        help="also print the token id (jti), the line to put in a relay's --revoked file")
    parser.set_defaults(func=cmd_token)


def main(argv: list[str] | None = None) -> int:
    """C{python -m pipegate.auth}: the same as C{pipegate token}."""
    import argparse
    parser = argparse.ArgumentParser(prog="pipegate token",
                                     description="Mint a connection id and a JWT (needs PIPEGATE_JWT_SECRET).")
    token_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
