"""The asset store contract every backend fulfils."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol


class StorageError(RuntimeError):
    """The backend failed (unreachable, refused, out of space); the message is safe to log."""


@dataclass(frozen=True)
class StoredObject:
    key: str  # backend-relative name, e.g. "<account id>/<asset id>/<file name>"
    size: int


class AssetStore(Protocol):
    """Keeps uploaded files and hands out time-limited read URLs for them."""

    name: str  # "local" or "azure"

    def put_file(self, key: str, source: Path, *, content_type: str) -> StoredObject:
        """Store the file at ``source`` under ``key``, replacing nothing: keys are unique."""

    def read_url(self, key: str, *, expires_at: datetime) -> str:
        """A URL that lets anyone holding it read ``key`` until ``expires_at`` (a SAS URL)."""

    def delete(self, key: str) -> None:
        """Remove ``key``; no error when it is already gone."""

    def owns_url(self, url: str) -> bool:
        """Whether ``url`` points into this store (so it can be checked as one of ours)."""

    def read_small(self, key: str, *, max_bytes: int) -> bytes | None:
        """The content of ``key`` when it holds at most ``max_bytes``, else None; StorageError
        when it cannot be read."""

    def key_of(self, url: str) -> str | None:
        """The key ``url`` reads (its first segment is the account's id), or None when the
        URL is not this store's. The URL's signature is not checked here."""
