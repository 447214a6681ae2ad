"""The embedded default store: files under the data folder, read through signed URLs.

A read URL looks like a SAS: ``{base}/blobs/{key}?sp=r&se={expiry}&sig={hmac}``, the HMAC
covering the key, the permission and the expiry, so none of them can be changed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit

from app.storage.base import StorageError, StoredObject

READ = "r"


class SignatureRefused(Exception):
    """A signed URL that is tampered with, expired or lacks the permission asked for."""


def _format_expiry(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalAssetStore:
    name = "local"

    def __init__(self, root: Path, *, base_url: str, signing_key: bytes) -> None:
        self._objects = root / "objects"
        self._meta = root / "meta"
        self._base_url = base_url.rstrip("/")
        self._key = signing_key

    def _path(self, key: str, under: Path) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or any(p in ("", ".", "..") or "\\" in p for p in parts) or key.startswith("/"):
            raise SignatureRefused("the blob name is not valid")
        return under.joinpath(*parts)

    def put_file(self, key: str, source: Path, *, content_type: str) -> StoredObject:
        target = self._path(key, self._objects)
        meta = self._path(key, self._meta)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps({"contentType": content_type}))
            # A rename within one file system is atomic: readers see all of the file or none.
            staging = target.with_name(f".{target.name}.incoming")
            shutil.copyfile(source, staging)
            os.replace(staging, target)
            return StoredObject(key=key, size=target.stat().st_size)
        except OSError as exc:
            raise StorageError(f"could not store the asset: {exc.strerror}") from None

    def _signature(self, key: str, permission: str, expiry: str) -> str:
        message = f"{key}\n{permission}\n{expiry}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def read_url(self, key: str, *, expires_at: datetime) -> str:
        expiry = _format_expiry(expires_at)
        signature = self._signature(key, READ, expiry)
        return f"{self._base_url}/blobs/{quote(key)}?sp={READ}&se={quote(expiry)}&sig={signature}"

    def delete(self, key: str) -> None:
        for under in (self._objects, self._meta):
            self._path(key, under).unlink(missing_ok=True)

    def owns_url(self, url: str) -> bool:
        return url.startswith(f"{self._base_url}/blobs/")

    def read_small(self, key: str, *, max_bytes: int) -> bytes | None:
        try:
            path = self._path(key, self._objects)
            with path.open("rb") as f:
                data = f.read(max_bytes + 1)
        except (OSError, SignatureRefused) as exc:
            raise StorageError(f"could not read the asset: {exc}") from None
        return data if len(data) <= max_bytes else None

    def key_of(self, url: str) -> str | None:
        if not self.owns_url(url):
            return None
        key = unquote(urlsplit(url).path.split("/blobs/", 1)[1])
        parts = PurePosixPath(key).parts
        return key if parts and not any(p in (".", "..") for p in parts) else None

    def check_signature(self, key: str, *, permission: str, expiry: str, signature: str, now: datetime) -> None:
        """Refuse unless ``signature`` is ours for this key, grants ``permission`` and is not expired."""
        expected = self._signature(key, permission, expiry)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise SignatureRefused("the signature does not match")
        if READ not in permission:
            raise SignatureRefused("the signature does not grant read access")
        try:
            expires = datetime.strptime(expiry, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            raise SignatureRefused("the expiry is not valid") from None
        if expires <= now:
            raise SignatureRefused("the signed URL has expired")

    def check_url(self, url: str, *, now: datetime) -> None:
        """Check one of our read URLs as the blob route would."""
        parts = urlsplit(url)
        key = unquote(parts.path.split("/blobs/", 1)[1])
        params = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        self.check_signature(
            key,
            permission=unquote(params.get("sp", "")),
            expiry=unquote(params.get("se", "")),
            signature=unquote(params.get("sig", "")),
            now=now,
        )

    def open(self, key: str) -> tuple[Path, str]:
        """The file behind ``key`` and its content type; FileNotFoundError when gone."""
        path = self._path(key, self._objects)
        if not path.is_file():
            raise FileNotFoundError(key)
        try:
            content_type = json.loads(self._path(key, self._meta).read_text())["contentType"]
        except (OSError, ValueError, KeyError):
            content_type = "application/octet-stream"
        return path, content_type
