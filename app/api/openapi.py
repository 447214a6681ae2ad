"""The OpenAPI document, made to tell the truth about the service's answers.

- Operation ids are ``<tag>_<function>``, short and stable (not derived from the path): a
  function named ``<verb>_<tag noun>`` gives ``<tag>_<verb>`` (``register_model`` under
  ``models`` is ``models_register``).
- Every operation lists the error statuses it can answer, each with the one error body
  (``ErrorBody``, app.errors): those its dependencies imply are added here (``derived_errors``),
  those of its own rules (409, a role check of its own) are declared on the route with ``errors``.
- The security schemes (a bearer token, or the client credentials that get one) are declared
  here on every operation whose dependencies include the caller's, not by dependencies the
  requests would solve.
- No 422: validation errors are answered 400 (app.errors), so FastAPI's default 422 and its
  ``HTTPValidationError`` schema are dropped.
- Every JSON GET under /api/ carries an ETag and answers 304 to a matching If-None-Match
  (app.api.middleware.ConditionalGetMiddleware).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api.deps import get_caller, get_session, read_account, read_account_now, write_account
from app.schemas.common import ErrorBody

DESCRIPTIONS = {
    400: "The request is invalid: a parameter or the body (``details`` names each offending field), "
    "or an unsupported api-version.",
    401: "No valid access token; WWW-Authenticate says why.",
    403: "The caller has no role that allows this on the scope.",
    404: "The account, or the resource in the path, does not exist.",
    409: "The resource's state does not allow this.",
    413: "The request body is larger than the service's limit.",
    422: "The Idempotency-Key was already used for a different request.",
    503: "The service is busy or the database is unavailable (retry after Retry-After), "
    "or the asset store could not be reached.",
}

# How a caller sends its token (app.api.deps.get_caller): either scheme gives the same
# Authorization header; the second lets the docs page sign in with a client id and secret.
SECURITY_SCHEMES: dict[str, Any] = {
    "HTTPBearer": {"type": "http", "description": "an access token from POST /oauth2/token", "scheme": "bearer"},
    "OAuth2ClientCredentials": {
        "type": "oauth2",
        "description": "a service principal's client id and secret, exchanged at POST /oauth2/token",
        "flows": {"clientCredentials": {"scopes": {}, "tokenUrl": "/oauth2/token"}},
    },
}
_SECURITY = [{name: []} for name in SECURITY_SCHEMES]

# Not a resource of its own: an account path's first parts.
_SCOPE_PARAMETERS = {"subscriptionId", "resourceGroup"}


def header(description: str, *, required: bool = False, integer: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "integer" if integer else "string"}}


RETRY_AFTER = header("seconds to wait before asking again", integer=True)
ETAG = header("a tag of this answer: send it as If-None-Match to be answered 304 while nothing changed")
WWW_AUTHENTICATE = header("the challenge (Bearer; Basic at the token endpoint), with the reason", required=True)

_HEADERS: dict[int, dict[str, Any]] = {401: {"WWW-Authenticate": WWW_AUTHENTICATE}, 503: {"Retry-After": RETRY_AFTER}}


def errors(*statuses: int, model: type[BaseModel] = ErrorBody, **descriptions: str) -> dict[int | str, Any]:
    """``responses=`` for a route's error statuses, each with ``model`` as its body."""
    return {
        status: {
            "model": model,
            "description": descriptions.get(f"s{status}", DESCRIPTIONS.get(status, "")),
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
        for status in statuses
    }


def operation_id(route: APIRoute) -> str:
    """``<tag>_<function>``; ``<verb>_<tag noun>`` becomes ``<tag>_<verb>``."""
    tag = re.sub(r"\W+", "_", str(route.tags[0]).lower()) if route.tags else ""
    name = route.name
    nouns = {tag, tag.removesuffix("s")}
    verb, _, noun = name.partition("_")
    if tag and noun in nouns:
        name = verb
    return f"{tag}_{name}" if tag else name


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for dependency in dependant.dependencies:
        if dependency.call is not None:
            yield dependency.call
        yield from _calls(dependency)


def _parameters(dependant: Dependant) -> Iterator[str]:
    """The names (aliases) of every path, query and header parameter, and body field."""
    for fields in (dependant.path_params, dependant.query_params, dependant.header_params, dependant.body_params):
        for field in fields:
            yield field.alias
    for dependency in dependant.dependencies:
        yield from _parameters(dependency)


def derived_errors(route: APIRoute | RouteContext) -> list[int]:
    """The error statuses that follow from a route's place, parameters and dependencies."""
    calls = set(_calls(route.dependant))
    parameters = set(_parameters(route.dependant))
    has_body = bool(route.body_field) or "requestBody" in (route.openapi_extra or {})
    statuses = []
    if route.path.startswith("/api/") or parameters:
        statuses.append(400)  # app.api.deps.check_request, and validation
    if get_caller in calls:
        statuses.append(401)
    if calls & {read_account, read_account_now, write_account}:
        statuses += [403, 404]
    if write_account in calls:
        statuses.append(409)  # app.errors: the account (or another row named) deleted meanwhile
    if "PUT" not in route.methods and set(re.findall(r"{(\w+)}", route.path)) - _SCOPE_PARAMETERS:
        statuses.append(404)
    if has_body:
        statuses.append(413)  # app.api.middleware.RequestBodyGate
    if calls & {get_session, get_caller, read_account, read_account_now, write_account}:
        statuses.append(503)  # app.errors: the database busy or unavailable (all of these read it)
    return sorted(set(statuses))


def _drop_validation_error(document: dict[str, Any]) -> None:
    for path in document["paths"].values():
        for operation in path.values():
            response = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in json.dumps(response):
                del operation["responses"]["422"]
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _add(document: dict[str, Any], route: RouteContext) -> None:
    path = document["paths"].get(route.path_format, {})
    for method in route.methods:
        operation = path.get(method.lower())
        if operation is None:
            continue
        if get_caller in set(_calls(route.dependant)):
            operation["security"] = _SECURITY
        responses = operation["responses"]
        if not getattr(route.original_route, "declares_its_errors", False):
            for status, response in errors(*derived_errors(route)).items():
                response.pop("model")
                response["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
                responses.setdefault(str(status), response)
        ok = responses.get("200", {})
        if method == "GET" and route.path.startswith("/api/") and "application/json" in ok.get("content", {}):
            ok["headers"] = {"ETag": ETAG, **ok.get("headers", {})}  # a new dict: the route's own stays as declared
            responses.setdefault(
                "304", {"description": "Unchanged since the ETag sent in If-None-Match.", "headers": {"ETag": ETAG}}
            )


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` build the document described above."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description=app.description,
                routes=app.routes,
            )
            _, defined = models_json_schema([(ErrorBody, "serialization")], ref_template="#/components/schemas/{model}")
            components = document.setdefault("components", {})
            components.setdefault("schemas", {}).update(defined.get("$defs", {}))
            components["securitySchemes"] = SECURITY_SCHEMES
            for route in iter_route_contexts(app.routes):  # each route as included, with its prefixes
                if isinstance(route.original_route, APIRoute) and route.include_in_schema:
                    _add(document, route)
            _drop_validation_error(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
