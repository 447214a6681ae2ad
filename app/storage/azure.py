"""The Azure Blob Storage store: one container, read through SAS URLs."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import (
    BlobSasPermissions,
    BlobServiceClient,
    ContentSettings,
    generate_blob_sas,
)

from app.storage.base import StorageError, StoredObject

# Files above one block go up block by block, so memory stays near
# BLOCK_SIZE * UPLOAD_CONCURRENCY whatever the file's size.
BLOCK_SIZE = 4 * 1024 * 1024
UPLOAD_CONCURRENCY = 2
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _describe(exc: AzureError) -> str:
    """The exception's kind, HTTP status and Azure error code; not its message (it echoes URLs)."""
    parts = [type(exc).__name__]
    status = getattr(exc, "status_code", None)
    if status:
        parts.append(f"HTTP {status}")
    code = getattr(exc, "error_code", None)
    if code:
        parts.append(str(getattr(code, "value", code)))
    return ", ".join(parts)


def _origin_and_path(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or _DEFAULT_PORTS.get(scheme)
    return scheme, (parts.hostname or "").lower(), port, parts.path


class AzureBlobStore:
    name = "azure"

    def __init__(self, *, connection_string: str, container: str) -> None:
        try:
            service = BlobServiceClient.from_connection_string(
                connection_string, max_single_put_size=BLOCK_SIZE, max_block_size=BLOCK_SIZE
            )
        except ValueError:
            raise StorageError("the Azure Storage connection string is not valid") from None
        account_key = getattr(service.credential, "account_key", None)
        if not account_key:
            raise StorageError("the Azure Storage connection string needs an AccountKey to sign read URLs")
        self._account_name: str = service.account_name
        self._account_key: str = account_key
        self._container = service.get_container_client(container)
        # Azurite and other emulators speak plain http; real accounts get https-only SAS.
        self._sas_protocol = "https" if self._container.url.startswith("https:") else "https,http"
        try:
            self._container.create_container()
        except ResourceExistsError:
            pass  # made earlier, or just now by another process
        except AzureError as exc:
            message = f"could not open the Azure container {container!r}: {_describe(exc)}"
            raise StorageError(message) from None

    def put_file(self, key: str, source: Path, *, content_type: str) -> StoredObject:
        blob = self._container.get_blob_client(key)
        try:
            with source.open("rb") as stream:
                size = source.stat().st_size
                # overwrite: keys are unique, so this only ever replaces a retried upload of itself.
                blob.upload_blob(
                    stream,
                    length=size,
                    overwrite=True,
                    content_settings=ContentSettings(content_type=content_type),
                    max_concurrency=UPLOAD_CONCURRENCY,
                )
        except OSError as exc:
            raise StorageError(f"could not read the asset to upload: {exc.strerror}") from None
        except AzureError as exc:
            raise StorageError(f"could not store the asset in Azure: {_describe(exc)}") from None
        return StoredObject(key=key, size=size)

    def read_url(self, key: str, *, expires_at: datetime) -> str:
        sas = generate_blob_sas(
            self._account_name,
            self._container.container_name,
            key,
            account_key=self._account_key,
            permission=BlobSasPermissions(read=True),
            expiry=expires_at,
            protocol=self._sas_protocol,
        )
        return f"{self._container.get_blob_client(key).url}?{sas}"

    def delete(self, key: str) -> None:
        try:
            self._container.get_blob_client(key).delete_blob(delete_snapshots="include")
        except ResourceNotFoundError:
            pass
        except AzureError as exc:
            raise StorageError(f"could not delete the asset in Azure: {_describe(exc)}") from None

    def owns_url(self, url: str) -> bool:
        try:
            scheme, host, port, path = _origin_and_path(url)
            own_scheme, own_host, own_port, own_path = _origin_and_path(self._container.url)
        except ValueError:  # e.g. a port that is not a number
            return False
        prefix = own_path.rstrip("/") + "/"
        if (scheme, host, port) != (own_scheme, own_host, own_port) or not path.startswith(prefix):
            return False
        # "/container/../other" would leave the container once a client normalises it.
        segments = unquote(path[len(prefix) :]).split("/")
        return bool(segments[0]) and not any(s in (".", "..") for s in segments)

    def read_small(self, key: str, *, max_bytes: int) -> bytes | None:
        blob = self._container.get_blob_client(key)
        try:
            if blob.get_blob_properties().size > max_bytes:
                return None
            return blob.download_blob(max_concurrency=1).readall()
        except AzureError as exc:
            raise StorageError(f"could not read the asset in Azure: {_describe(exc)}") from None

    def key_of(self, url: str) -> str | None:
        if not self.owns_url(url):
            return None
        own_path = _origin_and_path(self._container.url)[3]
        return unquote(_origin_and_path(url)[3][len(own_path.rstrip("/")) + 1 :])
