"""The OCI Distribution pull API at /v2/ over the image layout, and its token endpoint.

Every /v2 response, errors included, carries ``Docker-Distribution-API-Version``, and
errors take the distribution spec's shape: ``RegistryRoute`` renders them here, so the
service's own error shape never reaches a registry client. Push methods are 405.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute

from app.api.deps import ContextDep, SessionDep
from app.api.untrusted import download_headers
from app.config import Settings
from app.errors import ServiceError, error_response
from app.services import registry
from app.services.registry import RegistryError

log = logging.getLogger("mms.registry")

API_VERSION_HEADER = "Docker-Distribution-API-Version"
_PUSH_METHODS = ["PUT", "POST", "PATCH", "DELETE", "OPTIONS"]


def _as_registry_error(request: Request, exc: Exception) -> RegistryError:
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, RequestValidationError):
        return RegistryError("UNSUPPORTED", "the request is malformed", status_code=400)
    if isinstance(exc, ServiceError):  # not raised by these routes today; keep the shape if one is
        return RegistryError("UNKNOWN", exc.message, status_code=exc.status_code)
    where = {"method": request.method, "path": request.url.path}
    log.exception("registry.unhandled_error", extra=where)
    return RegistryError("UNKNOWN", "the registry hit an unexpected error; it has been logged")


class RegistryRoute(APIRoute):
    """Renders every failure of a /v2 route in the spec's error shape, with the version header."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def registry_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception as exc:
                response = error_response(_as_registry_error(request, exc))
            response.headers[API_VERSION_HEADER] = "registry/2.0"
            return response

        return registry_handler


router = APIRouter(prefix="/v2", tags=["registry"], route_class=RegistryRoute)


def _basic_credentials(request: Request, settings: Settings) -> tuple[str, str]:
    """The client id and secret of an HTTP Basic header; 401 with a Basic challenge otherwise."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    client_id = secret = ""
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        client_id, _, secret = decoded.partition(":")
    if not client_id or not secret:
        raise RegistryError(
            "UNAUTHORIZED",
            "send the service principal's clientId and clientSecret with HTTP Basic authentication",
            headers={"WWW-Authenticate": f'Basic realm="{settings.resolved_public_url}/v2/token"'},
        )
    return client_id, secret


@router.get("/token")
def token(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    scope: Annotated[list[str] | None, Query(description="repository:<name>:pull, repeatable")] = None,
    service: str | None = None,
) -> JSONResponse:
    """A registry token (Docker's token protocol) for a service principal, granting pull on the
    requested repositories it may read."""
    client_id, secret = _basic_credentials(request, context.settings)
    body = registry.issue_pull_token(
        session,
        context=context,
        client_id=client_id,
        client_secret=secret,
        scopes=scope or [],
        service=service,
    )
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


# HEAD routes stay out of the OpenAPI document: they would repeat the GET's operation id.
@router.get("/")
@router.api_route("/", methods=["HEAD"], include_in_schema=False)
@router.api_route("", methods=["GET", "HEAD"], include_in_schema=False)
def version_check(request: Request, context: ContextDep, session: SessionDep) -> JSONResponse:
    """200 for any valid token, else 401 with the challenge that leads to /v2/token."""
    registry.require_login(session, context=context, authorization=request.headers.get("authorization"))
    return JSONResponse({})


@router.get("/{path:path}")
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
    target = registry.parse_target(path)
    repository, reference = target.repository, target.reference
    authorization = request.headers.get("authorization")
    registry.require_pull(session, context=context, authorization=authorization, repository=repository)
    layout = registry.image_layout(context.settings)
    if target.kind == "manifests":
        if request.method == "HEAD":
            found = registry.resolve_manifest(layout, repository=repository, reference=reference)
            headers = {"Content-Length": str(found.size)}
            content = b""
        else:
            found, content = registry.get_manifest(layout, repository=repository, reference=reference)
            headers = {}
        headers.update(
            {
                "Docker-Content-Digest": found.digest,
                "ETag": f'"{found.digest}"',
                **download_headers(found.digest.replace(":", "-")),
            }
        )
        # Served as stored, with its real media type whatever Accept said: clients check it.
        return Response(content, media_type=found.media_type, headers=headers)
    if target.kind == "blobs":
        blob, _ = registry.get_blob(layout, repository=repository, digest=reference)
        # FileResponse streams, answers HEAD without a body and honours Range.
        return FileResponse(
            blob,
            media_type="application/octet-stream",
            headers={
                "Docker-Content-Digest": reference,
                "ETag": f'"{reference}"',
                "Cache-Control": "max-age=31536000, immutable",
                **download_headers(reference.replace(":", "-")),
            },
        )
    tags, limit, next_last = registry.list_tags(layout, repository=repository, n=n, last=last)
    links = {}
    if next_last is not None:
        links["Link"] = f'</v2/{repository}/tags/list?n={limit}&last={quote(next_last)}>; rel="next"'
    return JSONResponse({"name": repository, "tags": tags}, headers=links)


@router.api_route("/{path:path}", methods=_PUSH_METHODS, include_in_schema=False)
def push(path: str) -> Response:
    """This registry is read-only: images are written by the service's own builder."""
    raise RegistryError(
        "UNSUPPORTED",
        f"/v2/{path[:200]}: this registry is read-only; images are built by the service, not pushed",
        status_code=405,
        headers={"Allow": "GET, HEAD"},
    )
