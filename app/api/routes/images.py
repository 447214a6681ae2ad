"""Image builds: create (202 + Operation-Location), poll, list, cancel, read the build log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import PlainTextResponse

from app.api.deps import CallerDep, ContextDep, ReadableAccount, SessionDep, WritableAccount
from app.api.links import next_link
from app.api.routes.manifests import to_read as manifest_to_read
from app.orm import CreationState, Image
from app.schemas.common import Page
from app.schemas.images import BaseImageRead, ImageCreate, ImageError, ImageRead, OperationRead
from app.services import base_images, images

PREFIX = "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
router = APIRouter(prefix=PREFIX, tags=["images"])


def _account_url(request: Request) -> str:
    """This request's account URL, e.g. http://host/api/subscriptions/.../accounts/acct."""
    path = request.url.path
    marker = "/accounts/"
    account_end = path.index("/", path.index(marker) + len(marker))
    return str(request.base_url).rstrip("/") + path[:account_end]


def _error(image: Image) -> ImageError | None:
    if image.state in ("Failed", "Cancelled") and image.error:
        return ImageError(code=f"Build{image.state}", message=image.error)
    return None


def to_read(image: Image, request: Request) -> ImageRead:
    account_url = _account_url(request)
    return ImageRead(
        Id=str(image.id),
        Name=image.name,
        Version=image.version,
        Description=image.description,
        CreatedTime=image.created_at,
        CreationState=image.state,
        ImageBuildLogUri=f"{account_url}/images/{image.id}/log",
        ImageLocation=image.image_location,
        ImageType=image.image_type,
        Manifest=manifest_to_read(image.manifest),
        WebserviceType="Realtime",
        ComputeResourceId=image.compute_resource_id,
        Digest=image.digest,
        Builder=image.builder,
        Error=_error(image),
        OperationId=str(image.operation_id),
    )


def to_operation(image: Image, request: Request) -> OperationRead:
    return OperationRead(
        id=str(image.operation_id),
        resourceLocation=f"{_account_url(request)}/images/{image.id}",
        createdTime=image.created_at,
        endTime=image.ended_at,
        state=image.state,
        error=_error(image),
    )


@router.post("/images", response_model=ImageRead, status_code=status.HTTP_202_ACCEPTED)
def create_image(
    request: Request,
    response: Response,
    body: ImageCreate,
    account: WritableAccount,
    caller: CallerDep,
    context: ContextDep,
    session: SessionDep,
) -> ImageRead:
    """Start building an image from a manifest; poll the Operation-Location or the image."""
    image = images.create_image(
        session,
        account,
        body,
        queue=context.build_queue,
        default_builder=context.settings.builder,
        available_builders=context.settings.available_builders,
        created_by=caller.subject,
    )
    response.headers["Operation-Location"] = f"{_account_url(request)}/operations/{image.operation_id}"
    return to_read(image, request)


# How long a poller of an unfinished build is asked to wait (Retry-After), in seconds.
POLL_AFTER_SECONDS = 2


def _retry_after(response: Response, image: Image) -> None:
    if image.creation_state in (CreationState.NOT_STARTED, CreationState.RUNNING):
        response.headers["Retry-After"] = str(POLL_AFTER_SECONDS)


@router.get("/images/{imageId}", response_model=ImageRead)
def get_image(imageId: str, request: Request, response: Response, account: ReadableAccount,  # noqa: N803
              session: SessionDep) -> ImageRead:
    image = images.get_image(session, account, image_id=imageId)
    _retry_after(response, image)
    return to_read(image, request)


@router.get("/images", response_model=Page[ImageRead])
def list_images(
    request: Request,
    account: ReadableAccount,
    session: SessionDep,
    manifest_id: Annotated[str | None, Query(alias="manifestId")] = None,
    manifest_name: Annotated[str | None, Query(alias="manifestName")] = None,
    count: int | None = None,
    skip_token: Annotated[str | None, Query(alias="$skipToken")] = None,
) -> Page[ImageRead]:
    rows, token = images.list_images(
        session, account, manifest_id=manifest_id, manifest_name=manifest_name, count=count, skip_token=skip_token
    )
    return Page(value=[to_read(i, request) for i in rows], nextLink=next_link(request, token))


@router.post("/images/{imageId}/cancel", response_model=ImageRead)
def cancel_image(imageId: str, request: Request, account: WritableAccount, session: SessionDep) -> ImageRead:  # noqa: N803
    """Cancel a queued build at once; a running one stops within a heartbeat."""
    return to_read(images.cancel_image(session, account, image_id=imageId), request)


@router.delete("/images/{imageId}", status_code=status.HTTP_204_NO_CONTENT)
def delete_image(imageId: str, account: WritableAccount, session: SessionDep) -> None:  # noqa: N803
    images.delete_image(session, account, image_id=imageId)


@router.get("/images/{imageId}/log", response_class=PlainTextResponse)
def build_log(imageId: str, account: ReadableAccount, session: SessionDep) -> PlainTextResponse:  # noqa: N803
    """The build log so far; it stays after a failure, whose step and error end it."""
    image = images.get_image(session, account, image_id=imageId)
    return PlainTextResponse(images.read_log(session, image))


@router.get("/operations/{operationId}", response_model=OperationRead)
def get_operation(operationId: str, request: Request, response: Response, account: ReadableAccount,  # noqa: N803
                  session: SessionDep) -> OperationRead:
    image = images.get_operation(session, account, operation_id=operationId)
    _retry_after(response, image)
    return to_operation(image, request)


@router.get("/baseImages", response_model=Page[BaseImageRead])
def list_base_images(account: ReadableAccount, session: SessionDep) -> Page[BaseImageRead]:
    """The prebuilt inference base images, newest first; the newest CPU one is the default FROM."""
    return Page(value=[
        BaseImageRead(name=e.name, reference=e.reference, pythonVersion=e.python_version, variant=e.variant,
                      publishedAt=e.published_at, available=e.available)
        for e in base_images.list_base_images(session)
    ])
