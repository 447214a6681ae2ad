"""The service's own RS256 signing keys, and the key sources tokens are checked against.

Both issuers, the service's own and external ones, are checked through a ``KeySource``:
the own one reads the public keys from the database, an external one from its JWKS URL.
Either refreshes when it meets an unknown ``kid`` (a key rotated in, or made by another
API process), at most once per ``refresh_min_seconds``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwk
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.orm import SigningKey
from app.sealing import Sealer
from mms_client.retrying import TRANSIENT_STATUSES, Transient, attempts, retry_after, transient_http

log = logging.getLogger("mms.auth.keys")

JWKS_MAX_BYTES = 1 << 20  # an issuer's few keys take a few KiB


@dataclass(frozen=True)
class PrivateKey:
    kid: str
    pem: str


class KeySource(Protocol):
    def public_key(self, kid: str, *, refresh: bool = True) -> dict[str, Any] | None:
        """The JWK with this ``kid``, or None; ``refresh=False``: only if already at hand."""


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _public_jwk(private: rsa.RSAPrivateKey) -> dict[str, str]:
    numbers = private.public_key().public_numbers()
    jwk_ = {"e": _b64url_uint(numbers.e), "kty": "RSA", "n": _b64url_uint(numbers.n)}
    # RFC 7638 thumbprint: a kid that names the key's content.
    canonical = json.dumps(jwk_, separators=(",", ":"), sort_keys=True).encode()
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    return {**jwk_, "kid": kid, "alg": "RS256", "use": "sig"}


def create_signing_key(session: Session, *, sealer: Sealer) -> PrivateKey:
    """Make a new RSA key, store it sealed, and return it."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = _public_jwk(private)
    session.add(
        SigningKey(
            kid=public["kid"],
            sealed_private_key=sealer.seal(pem.encode()),
            public_jwk=json.dumps(public),
        )
    )
    session.flush()
    log.info("auth.signing_key_created", extra={"kid": public["kid"]})
    return PrivateKey(kid=public["kid"], pem=pem)


def newest_signing_key(session: Session, *, sealer: Sealer) -> PrivateKey | None:
    """The newest stored signing key, unsealed, or None when there is none yet."""
    row = session.scalars(select(SigningKey).order_by(SigningKey.created_at.desc(), SigningKey.kid).limit(1)).first()
    if row is None:
        return None
    return PrivateKey(kid=row.kid, pem=sealer.unseal(row.sealed_private_key).decode("ascii"))


def public_jwks(session: Session) -> dict[str, list[dict[str, Any]]]:
    """Every stored public key, as a JWKS document."""
    rows = session.scalars(select(SigningKey).order_by(SigningKey.created_at.desc()))
    return {"keys": [json.loads(row.public_jwk) for row in rows]}


class _RefreshingKeySet:
    """A kid → JWK cache refreshed from ``load`` on a miss, no more often than allowed.

    One load at a time: callers that meet an unknown kid while a load is in flight wait for
    it and use its result rather than load again, and a kid still unknown after it is
    answered None at once until ``refresh_min_seconds`` have passed since the last load (a
    flood of made-up kids costs the issuer one request per period). Known kids never wait.
    """

    def __init__(self, load: Callable[[], dict[str, Any]], refresh_min_seconds: float) -> None:
        self._load = load
        self._refresh_min = refresh_min_seconds
        self._keys: dict[str, dict[str, Any]] = {}
        self._loaded_at = float("-inf")
        self._loads = 0  # loads finished (or failed): a waiter whose wait saw one uses it
        self._lock = threading.Lock()

    def public_key(self, kid: str, *, refresh: bool = True) -> dict[str, Any] | None:
        key = self._keys.get(kid)
        if key is not None or not refresh:
            return key
        loads_before = self._loads
        with self._lock:
            if kid in self._keys or self._loads != loads_before:
                return self._keys.get(kid)  # a load finished while this one waited: its answer
            if time.monotonic() - self._loaded_at < self._refresh_min:
                return None
            self._loaded_at = time.monotonic()
            try:
                document = self._load()
            except Exception:  # a key server that is down must not turn a 401 into a 500
                log.warning("auth.jwks_refresh_failed", exc_info=True)
            else:
                self._keys = {k["kid"]: k for k in document.get("keys", []) if isinstance(k, dict) and "kid" in k}
            finally:
                self._loads += 1
        return self._keys.get(kid)


class OwnKeySource(_RefreshingKeySet):
    """The service's own public keys, read from the database."""

    def __init__(self, session_factory: sessionmaker[Session], refresh_min_seconds: float) -> None:
        def load() -> dict[str, Any]:
            with session_factory() as session:
                return public_jwks(session)

        # Our own keys are cheap to reload; a short floor still stops a kid flood.
        super().__init__(load, min(refresh_min_seconds, 1.0))


class RemoteKeySource(_RefreshingKeySet):
    """An external issuer's public keys, fetched from its JWKS URL."""

    def __init__(self, jwks_uri: str, refresh_min_seconds: float, timeout: float = 5.0) -> None:
        def load() -> dict[str, Any]:
            # Requests wait on this (under the lock): a few quick tries, and a deadline for
            # the whole load, as a slow answer is not bounded by the per-read timeout.
            deadline = time.monotonic() + 2 * timeout
            for attempt in attempts(transient_http, tries=3, timeout=2 * timeout, wait=0.2, wait_max=1.0):
                left = max(deadline - time.monotonic(), 0.1)
                with attempt, httpx.stream("GET", jwks_uri, timeout=min(timeout, left)) as response:
                    if response.status_code in TRANSIENT_STATUSES:
                        raise Transient(
                            f"the JWKS URL answered {response.status_code}",
                            retry_after(response.headers.get("retry-after")),
                        )
                    response.raise_for_status()
                    return json.loads(_read_at_most(response, JWKS_MAX_BYTES, deadline=deadline))
            raise AssertionError("unreachable")

        super().__init__(load, refresh_min_seconds)


def _read_at_most(response: httpx.Response, max_bytes: int, *, deadline: float) -> bytes:
    """The body, or ValueError once it passes ``max_bytes`` or ``deadline`` (monotonic): a
    JWKS URL may stream without end, or slowly."""
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > max_bytes:
            raise ValueError(f"the JWKS document exceeds the limit of {max_bytes >> 20} MiB")
        if time.monotonic() > deadline:
            raise ValueError("the JWKS document took too long to arrive")
    return bytes(data)


def construct_rs256_key(jwk_dict: dict[str, Any]) -> jwk.Key:
    """A verifying key pinned to RS256, whatever the JWK says about itself."""
    if jwk_dict.get("kty") != "RSA":
        raise ValueError("not an RSA key")
    return _rs256_key(json.dumps({k: v for k, v in jwk_dict.items() if k != "alg"}, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _rs256_key(canonical_jwk: str) -> jwk.Key:
    # Building the key object took as long as checking the token with it (32 µs and 34 µs here);
    # the same JWK always gives the same key.
    return jwk.construct(json.loads(canonical_jwk), algorithm="RS256")
