"""Choosing the asset store the settings name."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.config import Settings
from app.storage.base import AssetStore


def make_asset_store(settings: Settings, secret_key: str) -> AssetStore:
    """The configured backend: ``local`` (embedded default) or ``azure``."""
    if settings.asset_store == "azure":
        from app.storage.azure import AzureBlobStore

        if not settings.azure_storage_connection_string:
            raise ValueError("MMS_ASSET_STORE=azure needs MMS_AZURE_STORAGE_CONNECTION_STRING")
        return AzureBlobStore(
            connection_string=settings.azure_storage_connection_string,
            container=settings.azure_storage_container,
        )
    from app.storage.local import LocalAssetStore

    # A key of its own, so a leaked URL signature says nothing about other uses of the secret.
    signing_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"mms.asset-urls.v1").derive(
        secret_key.encode()
    )
    return LocalAssetStore(settings.data_dir / "assets", base_url=settings.resolved_public_url, signing_key=signing_key)
