"""Issuing the service's own tokens and checking every bearer token.

python-jose 3.5 accepts a token with no ``exp`` or ``aud`` unless told to require them,
ignores ``kid`` when handed a whole key set, and with an open algorithm list accepts an
HS256 token signed with the RSA public key as its secret. So: the header must say RS256
and name a ``kid``; the issuer must be on the allow-list; the one key with that ``kid`` is
passed alone; ``exp``, ``aud`` and ``iss`` are required.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
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
    claims: Mapping[str, Any]  # read-only: a remembered token's are every later request's too


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


@dataclass(frozen=True)
class _Checked:
    """A token whose signature and claims passed, and what that depended on besides its bytes."""

    verified: VerifiedToken
    keys: KeySource
    kid: str
    jwk: dict[str, Any]  # the key object it was checked with, as its source held it then
    expires: int
    not_before: int | None


class TokenVerifier:
    """Checks bearer tokens against the trusted issuers, each with its own key source.

    A client sends the same token on every request until it expires, and checking it again
    (three parses and the RSA check in jose) was the largest cost of an authenticated GET
    (issue 20). So a token that passed is remembered by its exact text, and taken again only
    while what its check depended on still holds: the signature is a function of those bytes
    and the key, so the same key object must still be the one its source holds for the kid
    (a reloaded key set makes new objects: every remembered token is checked anew), and the
    times (``exp``, ``nbf`` with the leeway) are compared again at each use. Anything else in
    the token is in its bytes. A token that fails is never remembered.
    """

    # Tokens, about 1.5 KB each with what is kept (6 MB at most); more live ones cost only re-checks.
    MEMO_SIZE = 4096

    def __init__(self, issuers: list[TrustedIssuerKeys], leeway_seconds: int) -> None:
        self._issuers = {trusted.issuer: trusted for trusted in issuers}
        self._leeway = leeway_seconds
        self._memo: dict[str, _Checked] = {}
        self._memo_lock = threading.Lock()  # verify runs on the event loop and in threads

    def verify(self, token: str, *, keys_at_hand: bool = False) -> VerifiedToken:
        """The token's issuer, subject and claims, or Unauthorized saying what is wrong.

        ``keys_at_hand``: never load keys (no database or network), for callers on the event loop.
        """
        checked = self._memo.get(token)
        if checked is not None and self._still_holds(checked):
            return checked.verified
        verified, checked = self._check(token, keys_at_hand=keys_at_hand)
        if checked is not None:
            with self._memo_lock:
                self._memo.pop(token, None)
                if len(self._memo) >= self.MEMO_SIZE:
                    del self._memo[next(iter(self._memo))]  # the oldest
                self._memo[token] = checked
        return verified

    def _still_holds(self, checked: _Checked) -> bool:
        # Integer seconds and the comparisons jose makes, so a remembered token expires when a
        # checked one would.
        now = int(time.time())
        if checked.expires < now - self._leeway:
            return False
        if checked.not_before is not None and checked.not_before > now + self._leeway:
            return False
        return checked.keys.public_key(checked.kid, refresh=False) is checked.jwk

    def _check(self, token: str, *, keys_at_hand: bool) -> tuple[VerifiedToken, _Checked | None]:
        """The whole check: the token's parts, its issuer and key, its signature and claims."""
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
        except (JWTError, ValueError, TypeError) as exc:  # TypeError: jose's int() of a list or an object
            raise Unauthorized(f"the token is not valid: {_reason(exc)}") from None
        # AAD puts the stable object id in oid; our own tokens use sub.
        subject = claims.get("oid") or claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("the token names no subject")
        verified = VerifiedToken(issuer=trusted.issuer, subject=subject, claims=MappingProxyType(claims))
        expires, not_before = claims.get("exp"), claims.get("nbf")
        if not isinstance(expires, int) or not (not_before is None or isinstance(not_before, int)):
            return verified, None  # times jose reads otherwise (floats): checked anew each time
        return verified, _Checked(verified, trusted.keys, kid, jwk_dict, expires, not_before)


def _reason(exc: Exception) -> str:
    text = str(exc).rstrip(".") or "bad token"
    # Keep the WWW-Authenticate header well-formed.
    return text.replace('"', "'")[:120]
