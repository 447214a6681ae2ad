"""The service's own image store (``app.image_store``) behind the remote registry client's calls.

In the embedded default there is no registry: the oci builder writes into the layout under
the data folder, and the service serves it read-only at ``/v2/``. This adapter gives the
builder the same calls ``RemoteRegistryClient`` offers (manifests, blobs, push with mount),
and fails with the same ``RemoteRegistryError``, so one build path serves both modes. A blob
is readable through a repository only when linked to it, as a registry would, so one
tenant's image cannot be read through another's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Self

import stamina

from app.image_store.oci_layout import OciLayout
from mms_client.retrying import attempts
from workers.oci.media import INDEX_TYPES
from workers.oci.remote_registry import Manifest, RemoteRegistryError

__all__ = ["ImageStoreClient"]

_CHUNK = 1 << 20


class ImageStoreClient:
    """``RemoteRegistryClient``'s calls over an ``OciLayout``; ``host`` is the address clients pull from."""

    def __init__(self, layout: OciLayout, host: str) -> None:
        self.layout = layout
        self.host = host

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        return None

    # -- manifests ---------------------------------------------------------------------

    def get_manifest(
        self, repository: str, reference: str, *, platform: tuple[str, str] = ("linux", "amd64")
    ) -> Manifest:
        manifest = self._manifest(repository, reference)
        if manifest is None:
            raise RemoteRegistryError(f"{self.host}/{repository}:{reference}: not found", 404, "MANIFEST_UNKNOWN")
        if manifest.media_type in INDEX_TYPES:
            for entry in manifest.body.get("manifests", []):
                plat = entry.get("platform") or {}
                if (plat.get("os"), plat.get("architecture")) == platform:
                    return self.get_manifest(repository, entry["digest"], platform=platform)
            raise RemoteRegistryError(
                f"{self.host}/{repository}:{reference} has no image for {platform[0]}/{platform[1]}",
                404,
                "MANIFEST_UNKNOWN",
            )
        return manifest

    def find_manifest(self, repository: str, reference: str) -> Manifest | None:
        return self._manifest(repository, reference)

    def _manifest(self, repository: str, reference: str) -> Manifest | None:
        try:
            found = self.layout.resolve(repository, reference)
        except ValueError as exc:
            raise RemoteRegistryError(str(exc), 400, "NAME_INVALID") from None
        if found is None:
            return None
        raw = self.layout.blob_path(found.digest).read_bytes()
        return Manifest(raw, found.media_type, found.digest, json.loads(raw))

    def put_manifest(self, repository: str, tag: str, raw: bytes, media_type: str) -> str:
        try:
            return self.layout.put_manifest(repository, tag, raw, media_type)
        except ValueError as exc:
            raise RemoteRegistryError(f"{self.host}/{repository}:{tag}: {exc}", 400, "MANIFEST_INVALID") from None

    # -- blobs -------------------------------------------------------------------------

    def blob_size(self, repository: str, digest: str) -> int | None:
        if not self.layout.is_linked(repository, digest):
            return None
        return self.layout.has_blob(digest)

    def get_blob(self, repository: str, digest: str, max_bytes: int = 64 << 20) -> bytes:
        with self._open(repository, digest) as handle:
            data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise RemoteRegistryError(f"blob {digest} is larger than {max_bytes} bytes")
        return data

    def download_blob(self, repository: str, digest: str, dest: Path) -> int:
        size = 0
        with self._open(repository, digest) as handle, dest.open("wb") as out:
            while chunk := handle.read(_CHUNK):
                out.write(chunk)
                size += len(chunk)
        return size

    @contextmanager
    def open_blob(self, repository: str, digest: str) -> Iterator[Iterator[bytes]]:
        with self._open(repository, digest) as handle:
            yield iter(lambda: handle.read(_CHUNK), b"")

    @contextmanager
    def _open(self, repository: str, digest: str) -> Iterator[BinaryIO]:
        if not self.layout.is_linked(repository, digest):
            raise RemoteRegistryError(f"{self.host}/{repository}: blob {digest} not found", 404, "BLOB_UNKNOWN")
        with self.layout.open_blob(digest) as handle:
            yield handle

    def retries(self) -> Iterator[stamina.Attempt]:
        """One attempt: nothing a local layout does fails for a while and then works."""
        return attempts(lambda exc: False, tries=1)

    def upload_stream(self, repository: str, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store a blob whose digest is known only at its end; returns (digest, size)."""
        staging = self._staging()
        hasher, size = hashlib.sha256(), 0
        try:
            with staging.open("wb") as out:
                for chunk in chunks:
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            digest = f"sha256:{hasher.hexdigest()}"
            self.layout.put_blob_file(staging, digest)
        finally:
            staging.unlink(missing_ok=True)
        return digest, size

    def _staging(self) -> Path:
        incoming = self.layout.root / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        return incoming / f"push-{os.getpid()}-{secrets.token_hex(8)}"

    def push_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        body: Callable[[], Iterable[bytes]],
        *,
        mount_from: str | None = None,
    ) -> str:
        """Store the blob; ``present`` when the repository has it, ``mounted`` when
        ``mount_from`` (a repository the builder chose) does (the manifest links it), else
        ``uploaded``: its bytes are read and checked even when the store holds them for
        another repository, since a digest alone (which any manifest can name) is no proof
        of having the content."""
        # A blob found is marked in use: garbage collection spares it until the manifest is in.
        if self.layout.is_linked(repository, digest):
            self.layout.touch_blob(repository, digest)
            return "present"
        if mount_from and self.layout.is_linked(mount_from, digest):
            self.layout.touch_blob(repository, digest)
            return "mounted"
        staging = self._staging()
        hasher, written = hashlib.sha256(), 0
        try:
            with staging.open("wb") as out:
                for chunk in body():
                    hasher.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
            if f"sha256:{hasher.hexdigest()}" != digest or written != size:
                raise RemoteRegistryError(
                    f"blob {digest}: the content does not match its digest and size ({written} bytes)",
                    400,
                    "DIGEST_INVALID",
                )
            self.layout.put_blob_file(staging, digest)
        finally:
            staging.unlink(missing_ok=True)
        return "uploaded"
