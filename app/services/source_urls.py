"""Checks on the URLs a model or manifest points at, made when it is registered.

A URL into our own local store must carry a valid signature; an Azure SAS URL must grant
read, must not have expired, and must be https outside development. Messages never
repeat a URL's query string: it holds the signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import ValidationFailed
from app.orm.base import utcnow
from app.storage.base import AssetStore
from app.storage.local import LocalAssetStore, SignatureRefused
from app.storage.sas import check_azure_sas_url


@dataclass(frozen=True)
class SourceUrlPolicy:
    store: AssetStore
    require_https: bool

    def check(self, url: str, *, field: str) -> None:
        """A 400 naming ``field`` when ``url`` cannot be read as it stands."""
        now = utcnow()
        try:
            if isinstance(self.store, LocalAssetStore) and self.store.owns_url(url):
                self.store.check_url(url, now=now)
            else:
                check_azure_sas_url(url, now=now, require_https=self.require_https)
        except (SignatureRefused, ValueError) as exc:
            message = f"{field}: {str(exc).removeprefix('url: ')}"
            raise ValidationFailed(
                f"Invalid request: {message}", details=[{"code": "InvalidUrl", "message": message}]
            ) from None
