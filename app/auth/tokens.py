"""Issuing the service's own tokens and checking every bearer token.

python-jose 3.5 accepts a token with no ``exp`` or ``aud`` unless told to require them,
ignores ``kid`` when handed a whole key set, and with an open algorithm list accepts an
HS256 token signed with the RSA public key as its secret. So: the header must say RS256
and name a ``kid``; the issuer must be on the allow-list; the one key with that ``kid`` is
passed alone; ``exp``, ``aud`` and ``iss`` are required.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jose import JWTError, jwt

from app.auth.keys import KeySource, PrivateKey, construct_rs256_key
from app.errors import Unauthorized

ALGORITHM = "RS256"


class KeyNotAtHand(Unauthorized):
    """``verify(keys_at_hand=True)`` met a key it would have to load (from the database or a JWKS URL)."""


@dataclass(frozen=True)
class TrustedIssuerKeys:
    issuer: str
    audience: str
    keys: KeySource


@dataclass(frozen=True)
class VerifiedToken:
    issuer: str
    subject: str
    claims: dict[str, Any]


def sign_token(
    key: PrivateKey,
    *,
    issuer: str,
    audience: str,
    subject: str,
    ttl_seconds: int,
    issued_at: int | None = None,
    claims: Mapping[str, Any] | None = None,
) -> str:
    """A token signed with ``key``: the registered claims (``iat`` = ``issued_at``, now by
    default), then ``claims``. Every token the service issues is made here."""
    now = int(time.time()) if issued_at is None else issued_at
    registered = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode({**registered, **(claims or {})}, key.pem, algorithm=ALGORITHM, headers={"kid": key.kid})


def issue_token(key: PrivateKey, *, issuer: str, audience: str, subject: str, ttl_seconds: int) -> str:
    """A signed access token for ``subject``."""
    return sign_token(
        key, issuer=issuer, audience=audience, subject=subject, ttl_seconds=ttl_seconds, claims={"appid": subject}
    )


class TokenVerifier:
    """Checks bearer tokens against the trusted issuers, each with its own key source."""

    def __init__(self, issuers: list[TrustedIssuerKeys], leeway_seconds: int) -> None:
        self._issuers = {trusted.issuer: trusted for trusted in issuers}
        self._leeway = leeway_seconds

    def verify(self, token: str, *, keys_at_hand: bool = False) -> VerifiedToken:
        """The token's issuer, subject and claims, or Unauthorized saying what is wrong.

        ``keys_at_hand``: never load keys (no database or network), for callers on the event loop.
        """
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.get_unverified_claims(token)
        except JWTError:
            raise Unauthorized("the bearer token is malformed") from None
        if header.get("alg") != ALGORITHM:
            raise Unauthorized(f"tokens must be signed with {ALGORITHM}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("the token header names no key (kid)")
        trusted = self._issuers.get(unverified.get("iss")) if isinstance(unverified, dict) else None
        if trusted is None:
            raise Unauthorized("the token's issuer is not trusted")
        jwk_dict = trusted.keys.public_key(kid, refresh=not keys_at_hand)
        if jwk_dict is None:
            if keys_at_hand:
                raise KeyNotAtHand("the token is signed with a key not loaded yet")
            raise Unauthorized("the token is signed with an unknown key")
        try:
            claims = jwt.decode(
                token,
                construct_rs256_key(jwk_dict),
                algorithms=[ALGORITHM],
                audience=trusted.audience,
                issuer=trusted.issuer,
                options={
                    "require_exp": True,
                    "require_aud": True,
                    "require_iss": True,
                    "leeway": self._leeway,
                },
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired; get a new one") from None
        except (JWTError, ValueError) as exc:
            raise Unauthorized(f"the token is not valid: {_reason(exc)}") from None
        # AAD puts the stable object id in oid; our own tokens use sub.
        subject = claims.get("oid") or claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("the token names no subject")
        return VerifiedToken(issuer=trusted.issuer, subject=subject, claims=claims)


def _reason(exc: Exception) -> str:
    text = str(exc).rstrip(".") or "bad token"
    # Keep the WWW-Authenticate header well-formed.
    return text.replace('"', "'")[:120]
