"""Assets: files uploaded to the configured store and handed back as signed read URLs."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from app.errors import BadRequest, ServiceError
from app.orm import Asset
from app.orm.base import utcnow
from app.services.accounts import AccountRef
from app.services.lookup import get_in_account
from app.storage.base import AssetStore, StorageError

_NAME = re.compile(r"^[^/\\\x00-\x1f]{1,255}$")


class StorageUnavailable(ServiceError):
    status_code = 503
    code = "StorageUnavailable"


def check_asset_name(name: str) -> str:
    """The file name of an upload, or a 400 that says what a name may hold."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise BadRequest(
            "name must be a file name of 1-255 characters without '/', '\\' or control characters",
            code="InvalidAssetName",
        )
    return name


def create_asset(
    session: Session,
    account: AccountRef,
    store: AssetStore,
    *,
    name: str,
    content_type: str,
    source: Path,
    sha256: str,
    created_by: str | None,
) -> Asset:
    """Store an uploaded file and record it."""
    asset_id = uuid.uuid4()
    key = f"{account.id}/{asset_id}/{check_asset_name(name)}"
    try:
        stored = store.put_file(key, source, content_type=content_type)
    except StorageError as exc:
        raise StorageUnavailable(f"the asset store could not take the file: {exc}") from None
    asset = Asset(
        id=asset_id,
        account_id=account.id,
        name=name,
        mime_type=content_type,
        size=stored.size,
        sha256=sha256,
        store=store.name,
        storage_key=key,
        created_by=created_by,
    )
    session.add(asset)
    session.flush()
    return asset


def read_url(store: AssetStore, asset: Asset, *, ttl_days: int) -> tuple[str, datetime]:
    """A fresh read URL for the asset and when it expires."""
    expires_at = (utcnow() + timedelta(days=ttl_days)).replace(microsecond=0)
    return store.read_url(asset.storage_key, expires_at=expires_at), expires_at


def get_asset(session: Session, account: AccountRef, *, asset_id: str) -> Asset:
    """One asset of the account, or 404."""
    return get_in_account(session, Asset, account, asset_id, kind="asset")


def delete_asset(session: Session, account: AccountRef, store: AssetStore, *, asset_id: str) -> None:
    """Forget the asset and remove its file; URLs handed out for it stop working."""
    asset = get_asset(session, account, asset_id=asset_id)
    session.delete(asset)
    session.flush()
    try:
        store.delete(asset.storage_key)
    except StorageError as exc:
        raise StorageUnavailable(f"the asset store could not delete the file: {exc}") from None
