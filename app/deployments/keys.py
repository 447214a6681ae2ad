"""A service's scoring keys: random, stored sealed (``POST .../keys`` shows them) and as keyed
digests (what the scoring gateway compares, so it never needs to unseal one)."""

from __future__ import annotations

import secrets
from typing import Literal

from app.orm import Service
from app.sealing import Sealer

KeyType = Literal["Primary", "Secondary"]


def new_key() -> str:
    """32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def key_columns(sealer: Sealer, key_type: KeyType, key: str) -> dict[str, str]:
    """The Service columns that hold ``key`` as the primary or secondary key."""
    which = key_type.lower()
    return {f"sealed_{which}_key": sealer.seal(key.encode()), f"{which}_key_digest": sealer.digest(key.encode())}


def new_keys(sealer: Sealer) -> dict[str, str]:
    """The key columns of a new service: a fresh primary and secondary key."""
    return {**key_columns(sealer, "Primary", new_key()), **key_columns(sealer, "Secondary", new_key())}


def read_keys(sealer: Sealer, service: Service) -> tuple[str, str]:
    """The primary and secondary key, unsealed."""
    return (
        sealer.unseal(service.sealed_primary_key).decode(),
        sealer.unseal(service.sealed_secondary_key).decode(),
    )
