"""Uploading assets, and reading them back through signed URLs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from app.api.deps import AssetId, CallerDep, ContextDep, ReadableAccount, ReadsDep, SessionDep, WritableAccount
from app.api.openapi import errors
from app.api.routing import ApiRoute
from app.api.untrusted import download_headers
from app.api.uploads import spool_body
from app.errors import Forbidden, NotFound
from app.orm import Asset
from app.orm.base import utcnow
from app.schemas.assets import AssetRead
from app.services import assets
from app.storage.base import AssetStore
from app.storage.local import LocalAssetStore, SignatureRefused

router = APIRouter(
    prefix="/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}/assets",
    tags=["assets"],
    route_class=ApiRoute,
)
blob_router = APIRouter(tags=["assets"], route_class=ApiRoute)

_BINARY = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_BODY = {
    "required": True,
    "description": "The file's bytes; its Content-Type (any) is kept as the asset's mimeType.",
    "content": {"application/octet-stream": _BINARY, "application/zip": _BINARY, "text/plain": _BINARY},
}


def to_read(asset: Asset, store: AssetStore, ttl_days: int) -> AssetRead:
    url, expires_at = assets.read_url(store, asset, ttl_days=ttl_days)
    return AssetRead(
        id=str(asset.id),
        name=asset.name,
        mimeType=asset.mime_type,
        size=asset.size,
        sha256=asset.sha256,
        url=url,
        urlExpiresAt=expires_at,
        createdAt=asset.created_at,
    )


@router.post(
    "",
    response_model=AssetRead,
    status_code=status.HTTP_201_CREATED,
    responses=errors(413, 503, s413="The file is larger than MMS_ASSET_MAX_BYTES."),
    # The route reads the raw body itself (app.api.uploads), so FastAPI cannot see it.
    openapi_extra={"requestBody": UPLOAD_BODY},
)
async def upload_asset(
    request: Request,
    name: Annotated[str, Query(description="the file name, e.g. score.py or model.zip")],
    account: WritableAccount,
    caller: CallerDep,
    context: ContextDep,
    session: SessionDep,
) -> AssetRead:
    """Upload a file as the raw request body; the answer carries a signed read URL for it."""
    assets.check_asset_name(name)
    settings = context.settings
    body = await spool_body(request, directory=settings.uploads_dir, max_bytes=settings.asset_max_bytes)
    try:
        # Past the database gate only now, the body on disk (app.api.middleware.RequestSlots).
        async with request.app.state.request_slots.slot():
            asset = await run_in_threadpool(
                assets.create_asset,
                session,
                account,
                context.asset_store,
                name=name,
                content_type=request.headers.get("content-type") or "application/octet-stream",
                source=body.path,
                sha256=body.sha256,
                created_by=caller.subject,
            )
    finally:
        body.path.unlink(missing_ok=True)
    return to_read(asset, context.asset_store, settings.asset_url_ttl_days)


@router.get("/{assetId}", response_model=AssetRead)
async def get_asset(asset_id: AssetId, account: ReadableAccount, context: ContextDep, reads: ReadsDep) -> AssetRead:
    """The asset, with a fresh read URL."""

    def read(session: Session) -> AssetRead:
        asset = assets.get_asset(session, account, asset_id=asset_id)
        return to_read(asset, context.asset_store, context.settings.asset_url_ttl_days)

    return await reads.run(read)


@router.delete("/{assetId}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(503))
def delete_asset(asset_id: AssetId, account: WritableAccount, context: ContextDep, session: SessionDep) -> None:
    assets.delete_asset(session, account, context.asset_store, asset_id=asset_id)


@blob_router.api_route("/blobs/{key:path}", methods=["GET", "HEAD"], include_in_schema=False)
def read_blob(key: str, context: ContextDep, sp: str = "", se: str = "", sig: str = "") -> FileResponse:
    """A local-store file, for whoever holds a valid signed URL (no bearer token: the URL is the key).

    Always a download, never a page of this origin (SECURITY.md): the uploader chose its type.
    """
    store = context.asset_store
    if not isinstance(store, LocalAssetStore):
        raise NotFound("this service keeps assets in another store", code="BlobNotFound")
    try:
        store.check_signature(key, permission=sp, expiry=se, signature=sig, now=utcnow())
        path, content_type = store.open(key)
    except SignatureRefused as exc:
        raise Forbidden(f"the signed URL was refused: {exc}", code="AuthenticationFailed") from None
    except FileNotFoundError:
        raise NotFound("the blob does not exist (the asset may have been deleted)", code="BlobNotFound") from None
    return FileResponse(path, media_type=content_type, headers=download_headers(key.rsplit("/", 1)[-1]))
