"""Sealing secrets at rest (signing keys, registry passwords) with a key from settings."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["Sealer", "UnsealError"]


class UnsealError(RuntimeError):
    """A sealed value could not be opened: the secret key changed or the value was altered."""


class Sealer:
    """Authenticated encryption (Fernet) under a key derived from MMS_SECRET_KEY."""

    def __init__(self, secret_key: str) -> None:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"mms.sealing.v1").derive(
            secret_key.encode()
        )
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))
        # A second key from the same secret, for digests (another info: never the sealing key).
        self._digest_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"mms.digest.v1").derive(
            secret_key.encode()
        )

    def seal(self, plaintext: bytes) -> str:
        return self._fernet.encrypt(plaintext).decode("ascii")

    def digest(self, secret: bytes) -> str:
        """HMAC-SHA256 of ``secret`` (hex): compared with hmac.compare_digest, never reversed."""
        return hmac.new(self._digest_key, secret, hashlib.sha256).hexdigest()

    def unseal(self, sealed: str) -> bytes:
        try:
            return self._fernet.decrypt(sealed.encode("ascii"))
        except InvalidToken as exc:
            raise UnsealError("a sealed secret could not be opened; was MMS_SECRET_KEY changed?") from exc
