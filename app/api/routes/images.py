"""Image builds: create (202 + Operation-Location), poll, list, cancel, read the build log."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse

from app.api import examples, idempotent
from app.api.deps import (
    CallerDep,
    ContextDep,
    EventHubDep,
    ImageId,
    OperationId,
    ReadableAccount,
    ReadableAccountNow,
    ReadsDep,
    SessionDep,
    WritableAccount,
)
from app.api.event_stream import LastEventIdHeader, LastEventIdQuery, stream_response
from app.api.image_polls import RETRY_AFTER_SECONDS, image_etag, not_modified_headers
from app.api.links import account_url, next_link, operation_location
from app.api.middleware import etag_matches
from app.api.openapi import RETRY_AFTER, errors, header
from app.api.routes.manifests import rendered_manifest
from app.api.routing import ApiRoute
from app.api.untrusted import NOT_A_PAGE
from app.builds.states import UNFINISHED, build_error
from app.builds.states import CreationState as BuildState
from app.deployments.states import OperationState
from app.image_store import embedded_layout
from app.orm import Image, ServiceOperation, SubjectKind
from app.schemas.common import Page
from app.schemas.images import BaseImageRead, ImageCreate, ImageError, ImageRead, OperationRead, SmokeTestRead
from app.services import base_images, images, operations

PREFIX = "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
router = APIRouter(prefix=PREFIX, tags=["images"], route_class=ApiRoute)

OPERATION_LOCATION = header("the URL of the build's operation, to poll until it ends", required=True)
IMAGE_ETAG = header(
    "the image's version (opaque: compare it whole): send it as If-None-Match to poll cheaply", required=True
)
LOG_HEADERS = {"Accept-Ranges": header("bytes", required=True), "Retry-After": RETRY_AFTER}


def _error(image: Image) -> ImageError | None:
    error = build_error(image.state, image.error)
    return None if error is None else ImageError(code=error[0], message=error[1])


def _smoke_test(image: Image) -> SmokeTestRead | None:
    if image.smoke_test is None:
        return None
    return SmokeTestRead(result=image.smoke_test, reason=image.smoke_test_reason)


def to_read(image: Image, request: Request) -> ImageRead:
    base = account_url(request)
    return ImageRead(
        Id=str(image.id),
        Name=image.name,
        Version=image.version,
        Description=image.description,
        CreatedTime=image.created_at,
        CreationState=image.state,
        ImageBuildLogUri=f"{base}/images/{image.id}/log",
        ImageLocation=image.image_location,
        ImageType=image.image_type,
        Manifest=rendered_manifest(image),
        WebserviceType="Realtime",
        ComputeResourceId=image.compute_resource_id,
        Digest=image.digest,
        Builder=image.builder,
        Error=_error(image),
        SmokeTest=_smoke_test(image),
        OperationId=str(image.operation_id),
    )


def to_operation(image: Image, request: Request) -> OperationRead:
    return OperationRead(
        id=str(image.operation_id),
        resourceLocation=f"{account_url(request)}/images/{image.id}",
        createdTime=image.created_at,
        endTime=image.ended_at,
        state=image.state,
        error=_error(image),
    )


def to_service_operation(operation: ServiceOperation, request: Request) -> OperationRead:
    location = None if operation.service_id is None else f"{account_url(request)}/services/{operation.service_id}"
    return OperationRead(
        id=str(operation.id),
        operationType="Service",
        resourceLocation=location,
        createdTime=operation.created_at,
        endTime=operation.ended_at,
        state=BuildState(operation.state.value),
        error=None
        if operation.error is None
        else ImageError(code=f"Service{operation.kind}Failed", message=operation.error),
    )


@router.post(
    "/images",
    response_model=ImageRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=idempotent.responses(202, {"Operation-Location": OPERATION_LOCATION}),
)
def create_image(
    request: Request,
    body: Annotated[ImageCreate, Body(openapi_examples=examples.IMAGE)],
    account: WritableAccount,
    caller: CallerDep,
    context: ContextDep,
    session: SessionDep,
    idempotency_key: idempotent.IdempotencyKey = None,
) -> JSONResponse:
    """Start building an image from a manifest; poll the Operation-Location or the image."""

    def create() -> ImageRead:
        image = images.create_image(
            session,
            account,
            body,
            queue=context.build_queue,
            default_builder=context.settings.builder,
            available_builders=context.settings.available_builders,
            created_by=caller.subject,
        )
        return to_read(image, request)

    return idempotent.answer_once(
        request,
        session,
        caller,
        context,
        key=idempotency_key,
        body=body,
        status_code=status.HTTP_202_ACCEPTED,
        make=create,
        headers=lambda image: {"Operation-Location": operation_location(request, image["OperationId"])},
    )


def _retry_after(headers, state: str) -> None:  # type: ignore[no-untyped-def]
    """Ask a poller of an unfinished build to come back in a moment (``headers``: a mapping)."""
    if state in UNFINISHED:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)


# Declared before /images/{imageId}, which would otherwise take "events" for an id.
@router.get(
    "/images/events",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "`ready`, then one `image` event per state change"}
    },
)
async def stream_image_events(
    account: ReadableAccountNow,
    caller: CallerDep,
    context: ContextDep,
    hub: EventHubDep,
    last_event_id_header: LastEventIdHeader = None,
    last_event_id_query: LastEventIdQuery = None,
) -> EventSourceResponse:
    """The account's image state changes as Server-Sent Events; resume with Last-Event-ID
    (an id from any of the account's streams)."""
    return stream_response(
        account,
        caller=caller,
        context=context,
        hub=hub,
        kinds=frozenset({SubjectKind.IMAGE}),
        last_event_id_header=last_event_id_header,
        last_event_id_query=last_event_id_query,
    )


@router.get(
    "/images/{imageId}",
    response_model=ImageRead,
    responses={
        200: {"headers": {"ETag": IMAGE_ETAG, "Retry-After": RETRY_AFTER}},
        304: {
            "description": "unchanged since the ETag sent in If-None-Match",
            "headers": {"ETag": IMAGE_ETAG, "Retry-After": RETRY_AFTER},
        },
    },
)
async def get_image(
    image_id: ImageId,
    request: Request,
    response: Response,
    account: ReadableAccount,
    reads: ReadsDep,
    hub: EventHubDep,
    context: ContextDep,
) -> ImageRead | Response:
    """One image; poll it with If-None-Match (its ETag changes exactly when it does)."""

    def read(session: Session) -> tuple[Image, int, str, ImageRead | None]:
        image, version = images.get_image_and_version(session, account, image_id=image_id)
        etag = image_etag(context.event_ids, version, str(request.base_url))
        unchanged = etag_matches(request.headers.get("if-none-match"), etag)
        # Rendered only when it is sent: a poll answered 304 never renders the manifest.
        return image, version, etag, None if unchanged else to_read(image, request)

    image, version, etag, answer = await reads.run(read)
    # Teach this process's poll shortcut the image, so the next poll needs no database.
    hub.versions.note(image.id, account.id, version, image.state)
    params = request.path_params
    hub.versions.note_account((params["subscriptionId"], params["resourceGroup"], params["accountName"]), account.id)
    if answer is None:
        return Response(
            status_code=304,
            headers={k.decode(): v.decode() for k, v in not_modified_headers(etag, image.state)},
        )
    response.headers["ETag"], response.headers["Cache-Control"] = etag, "no-cache"
    _retry_after(response.headers, image.state)
    return answer


@router.get("/images", response_model=Page[ImageRead])
async def list_images(
    request: Request,
    account: ReadableAccount,
    reads: ReadsDep,
    manifest_id: Annotated[str | None, Query(alias="manifestId")] = None,
    manifest_name: Annotated[str | None, Query(alias="manifestName")] = None,
    count: int | None = None,
    skip_token: Annotated[str | None, Query(alias="$skipToken")] = None,
) -> Page[ImageRead]:
    def read(session: Session) -> Page[ImageRead]:
        rows, token = images.list_images(
            session, account, manifest_id=manifest_id, manifest_name=manifest_name, count=count, skip_token=skip_token
        )
        return Page(value=[to_read(i, request) for i in rows], nextLink=next_link(request, token))

    return await reads.run(read, many=True)


@router.post(
    "/images/{imageId}/cancel", response_model=ImageRead, responses=errors(409, s409="The build already ended.")
)
def cancel_image(image_id: ImageId, request: Request, account: WritableAccount, session: SessionDep) -> ImageRead:
    """Cancel a queued build at once; a running one stops within a heartbeat."""
    return to_read(images.cancel_image(session, account, image_id=image_id), request)


@router.delete(
    "/images/{imageId}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(409, s409="The image is being built (cancel it first), or a service runs it (ImageInUse)."),
)
def delete_image(image_id: ImageId, account: WritableAccount, session: SessionDep, context: ContextDep) -> None:
    images.delete_image(session, account, image_id=image_id, layout=embedded_layout(context.settings))


_OPEN_RANGE = re.compile(r"bytes=([0-9]+)-")


@router.get(
    "/images/{imageId}/log",
    response_class=PlainTextResponse,
    responses={
        200: {"headers": LOG_HEADERS},
        206: {
            "description": "The part of the log after the Range's start.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "headers": {**LOG_HEADERS, "Content-Range": header("bytes <start>-<end>/<size>", required=True)},
        },
        416: {
            "description": "Nothing past the Range's start yet.",
            "headers": {**LOG_HEADERS, "Content-Range": header("bytes */<size>", required=True)},
        },
    },
)
def build_log(
    image_id: ImageId,
    account: ReadableAccount,
    session: SessionDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    """The build log so far; it stays after a failure, whose step and error end it.

    A follower asks for what it has not seen with ``Range: bytes=<size so far>-``: 206 with
    the new part, or 416 when there is nothing new yet.
    """
    image = images.get_image(session, account, image_id=image_id)
    body = images.read_log(session, image).encode()
    # Text the tenant's build printed: plain text, never a page of this origin.
    headers = {"Accept-Ranges": "bytes", **NOT_A_PAGE}
    _retry_after(headers, image.state)
    wanted = _OPEN_RANGE.fullmatch(range_header.strip()) if range_header else None
    if wanted is None:  # no Range, or a form a log follower does not need: the whole log
        return PlainTextResponse(body, headers=headers)
    start = int(wanted[1]) if len(wanted[1]) < 19 else len(body)  # a huge start is past any log
    if start >= len(body):
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{len(body)}"})
    return PlainTextResponse(
        body[start:],
        status_code=206,
        headers={**headers, "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"},
    )


@router.get(
    "/operations/{operationId}",
    response_model=OperationRead,
    responses={200: {"headers": {"Retry-After": RETRY_AFTER}}},
)
async def get_operation(
    operation_id: OperationId, request: Request, response: Response, account: ReadableAccount, reads: ReadsDep
) -> OperationRead:
    """An image build's operation, or a web service's (create, update, delete)."""

    def read(session: Session) -> OperationRead:
        found = operations.get_operation(session, account, operation_id=operation_id)
        if isinstance(found, Image):
            _retry_after(response.headers, found.state)
            return to_operation(found, request)
        if found.state is OperationState.RUNNING:
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return to_service_operation(found, request)

    return await reads.run(read)


@router.get("/baseImages", response_model=Page[BaseImageRead])
def list_base_images(account: ReadableAccount, session: SessionDep) -> Page[BaseImageRead]:
    """The prebuilt inference base images, newest first; the newest CPU one is the default FROM."""
    return Page(
        value=[
            BaseImageRead(
                name=e.name,
                reference=e.reference,
                pythonVersion=e.python_version,
                variant=e.variant,
                publishedAt=e.published_at,
                available=e.available,
            )
            for e in base_images.list_base_images(session)
        ]
    )
