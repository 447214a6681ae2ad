"""The image store's OCI Distribution pull API at /v2/, and its token endpoint.

Every /v2 response, errors included, carries ``Docker-Distribution-API-Version``, and
errors take the distribution spec's shape: ``DistributionRoute`` renders them
(``app.errors.as_distribution_error``), so the service's own error shape never reaches a
registry client. Push methods are 405.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from app.api.deps import ContextDep, SessionDep
from app.api.openapi import errors, header
from app.api.routing import ApiRoute
from app.api.untrusted import download_headers
from app.auth import registry_tokens
from app.errors import DistributionError, as_distribution_error, error_response
from app.schemas.common import DistributionErrorBody
from app.services import distribution

API_VERSION_HEADER = "Docker-Distribution-API-Version"
_PUSH_METHODS = ["PUT", "POST", "PATCH", "DELETE", "OPTIONS"]


class DistributionRoute(ApiRoute):
    """Renders every failure of a /v2 route in the spec's error shape, with the version header."""

    declares_its_errors = True  # in that shape (app.api.openapi derives the service's own)

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def distribution_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception as exc:  # noqa: BLE001 - every failure, in the only shape a registry client reads
                error = as_distribution_error(exc, method=request.method, path=request.url.path)
                response = error_response(error)
            response.headers[API_VERSION_HEADER] = "registry/2.0"
            return response

        return distribution_handler


router = APIRouter(prefix="/v2", tags=["registry"], route_class=DistributionRoute)

_VERSION = {API_VERSION_HEADER: header("registry/2.0", required=True)}


def _errors(*statuses: int) -> dict[int | str, Any]:
    """The statuses' answers in the distribution spec's shape (a /v2 route's 400 includes bad parameters)."""
    answers = errors(*statuses, model=DistributionErrorBody)
    for status, answer in answers.items():
        answer["headers"] = {**answer.get("headers", {}), **_VERSION}
        if status == 401:
            answer["description"] = "No valid token; WWW-Authenticate sends the client to /v2/token."
        if status == 500:
            answer["description"] = "An unexpected error, or the database unavailable (the spec's UNKNOWN)."
    return answers


_PULLED = {"schema": {"type": "string", "format": "binary"}}
PULL_OK = {
    "description": "A manifest (in its stored media type), a blob, or a repository's tags",
    "headers": _VERSION,
    "content": {
        "application/json": {"schema": {"type": "object", "description": "{name, tags} of tags/list"}},
        "application/vnd.oci.image.manifest.v1+json": _PULLED,
        "application/vnd.oci.image.index.v1+json": _PULLED,
        "application/vnd.docker.distribution.manifest.v2+json": _PULLED,
        "application/vnd.docker.distribution.manifest.list.v2+json": _PULLED,
        "application/octet-stream": _PULLED,
    },
}


@router.get("/token", responses={200: {"headers": _VERSION}} | _errors(400, 401, 500))
def token(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    scope: Annotated[list[str] | None, Query(description="repository:<name>:pull, repeatable")] = None,
    service: str | None = None,
) -> JSONResponse:
    """A registry token (Docker's token protocol) for a service principal, granting pull on the
    requested repositories it may read."""
    body = registry_tokens.issue_pull_token(
        session,
        context=context,
        authorization=request.headers.get("authorization"),
        scopes=scope or [],
        service=service,
    )
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


# HEAD routes stay out of the OpenAPI document: they would repeat the GET's operation id.
@router.get("/", responses={200: {"headers": _VERSION}} | _errors(401, 500))
@router.api_route("/", methods=["HEAD"], include_in_schema=False)
@router.api_route("", methods=["GET", "HEAD"], include_in_schema=False)
def version_check(request: Request, context: ContextDep, session: SessionDep) -> JSONResponse:
    """200 for any valid token, else 401 with the challenge that leads to /v2/token."""
    registry_tokens.require_login(session, context=context, authorization=request.headers.get("authorization"))
    return JSONResponse({})


@router.get("/{path:path}", responses={200: PULL_OK} | _errors(400, 401, 403, 404, 500))
@router.api_route("/{path:path}", methods=["HEAD"], include_in_schema=False)
def pull(
    path: str,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    n: str | None = None,
    last: str | None = None,
) -> Response:
    """/v2/<name>/manifests/<reference>, /v2/<name>/blobs/<digest> and /v2/<name>/tags/list?n=&last=."""
    found = distribution.pull(
        session,
        context=context,
        authorization=request.headers.get("authorization"),
        path=path,
        head=request.method == "HEAD",
        n=n,
        last=last,
    )
    if isinstance(found, distribution.Manifest):
        digest = found.descriptor.digest
        headers = {"Content-Length": str(found.descriptor.size)} if found.content is None else {}
        headers.update(
            {"Docker-Content-Digest": digest, "ETag": f'"{digest}"', **download_headers(digest.replace(":", "-"))}
        )
        # Served as stored, with its real media type whatever Accept said: clients check it.
        return Response(found.content or b"", media_type=found.descriptor.media_type, headers=headers)
    if isinstance(found, distribution.Blob):
        # FileResponse streams, answers HEAD without a body and honours Range.
        return FileResponse(
            found.path,
            media_type="application/octet-stream",
            headers={
                "Docker-Content-Digest": found.digest,
                "ETag": f'"{found.digest}"',
                "Cache-Control": "max-age=31536000, immutable",
                **download_headers(found.digest.replace(":", "-")),
            },
        )
    links = {}
    if found.next_last is not None:
        links["Link"] = f'</v2/{found.repository}/tags/list?n={found.limit}&last={quote(found.next_last)}>; rel="next"'
    return JSONResponse({"name": found.repository, "tags": found.tags}, headers=links)


@router.api_route("/{path:path}", methods=_PUSH_METHODS, include_in_schema=False)
def push(path: str) -> Response:
    """This registry is read-only: images are written by the service's own builder."""
    raise DistributionError(
        "UNSUPPORTED",
        f"/v2/{path[:200]}: this registry is read-only; images are built by the service, not pushed",
        status_code=405,
        headers={"Allow": "GET, HEAD"},
    )
