"""Domain errors and the one place that renders every error as HTTP.

Every error response has the shape ``{code, message, statusCode, details: [{code, message}]}``.

    ServiceError                 carries status, code, message, details
    ├── BadRequest        400    ├── ValidationFailed  400 (names the fields)
    ├── Unauthorized      401    (adds WWW-Authenticate)
    ├── Forbidden         403
    ├── NotFound          404
    ├── Conflict          409
    ├── PayloadTooLarge   413
    ├── ServiceUnavailable 503   (every database connection busy, or the database unreachable: Retry-After)
    └── DistributionError        a /v2 route's failure, in the OCI Distribution spec's shape instead:
                                 ``{errors: [{code, message, detail}]}`` (``as_distribution_error``)

Anything else that escapes a route is logged with its traceback and answered as a bare 500.
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as DatabaseTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("mms.errors")
_DIAG_NAMES = ("sqlstate", "constraint_name", "table_name", "column_name")

__all__ = [
    "BadRequest",
    "Conflict",
    "DistributionError",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "ServiceError",
    "ServiceUnavailable",
    "Unauthorized",
    "ValidationFailed",
    "as_distribution_error",
    "install_error_handlers",
]


class ServiceError(Exception):
    """An expected failure with its HTTP status, a stable code and a message for the user."""

    status_code = 500
    code = "InternalServerError"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "statusCode": self.status_code,
            "details": self.details,
        }


class BadRequest(ServiceError):
    status_code = 400
    code = "BadRequest"


class ValidationFailed(BadRequest):
    code = "ValidationError"


class Unauthorized(ServiceError):
    status_code = 401
    code = "Unauthorized"

    def __init__(self, message: str, *, error: str = "invalid_token") -> None:
        challenge = f'Bearer realm="mms", error="{error}", error_description="{message}"'
        if error == "missing_token":
            challenge = 'Bearer realm="mms"'
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(ServiceError):
    status_code = 403
    code = "Forbidden"


class NotFound(ServiceError):
    status_code = 404
    code = "NotFound"


class Conflict(ServiceError):
    status_code = 409
    code = "Conflict"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "PayloadTooLarge"


class ServiceUnavailable(ServiceError):
    status_code = 503
    code = "ServiceUnavailable"


# The distribution spec's error codes and the status each is answered with.
_DISTRIBUTION_STATUS = {
    "BLOB_UNKNOWN": 404,
    "MANIFEST_UNKNOWN": 404,
    "NAME_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "DIGEST_INVALID": 400,
    "TAG_INVALID": 400,
    "PAGINATION_NUMBER_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "UNKNOWN": 500,
}


class DistributionError(ServiceError):
    """A failure of a /v2 route (the image store's pull API or its token endpoint), in the
    distribution spec's error shape; ``code`` is one of the spec's, which sets the status
    unless ``status_code`` says otherwise."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        detail: Any = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, headers=headers)
        self.status_code = status_code or _DISTRIBUTION_STATUS[code]
        self.detail = detail

    def body(self) -> dict[str, Any]:
        return {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}


def as_distribution_error(exc: Exception, *, method: str, path: str) -> DistributionError:
    """Any failure of a /v2 route as a DistributionError: a registry client understands no other shape."""
    if isinstance(exc, DistributionError):
        return exc
    if isinstance(exc, RequestValidationError):
        return DistributionError("UNSUPPORTED", "the request is malformed", status_code=400)
    if isinstance(exc, ServiceError):  # not raised by these routes today; keep the shape if one is
        return DistributionError("UNKNOWN", exc.message, status_code=exc.status_code)
    log.exception("registry.unhandled_error", extra={"method": method, "path": path})
    return DistributionError("UNKNOWN", "the registry hit an unexpected error; it has been logged")


class _AsciiJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        # \u escapes: a message that quotes the client's input renders even when that input
        # holds a lone surrogate, which no UTF-8 can carry.
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(error: ServiceError) -> JSONResponse:
    """Render a domain error in the service's one error shape."""
    return _AsciiJSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


# Where a location names the request part or the tag of a body that has several shapes
# (app.api.routes.manifests), not a field the client wrote.
_NOT_FIELDS = {"body", "query", "path", "header", "seed", "inference-config"}


def _field_name(loc: tuple[Any, ...]) -> str:
    # ("body", "tags", 0) -> "tags[0]"; ("query", "count") -> "count"
    parts = [p for p in loc if p not in _NOT_FIELDS and not str(p).startswith("function-after[")]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def _validation_message(error: dict[str, Any]) -> str:
    message = str(error.get("msg", "is invalid"))
    return message.removeprefix("Value error, ")


def _json_error(error: dict[str, Any], document: Any) -> str:
    """Where the body stops being JSON: the character (as Python's json counts it), its line
    and column, and why."""
    loc = tuple(error.get("loc", ()))
    position = loc[-1] if loc and isinstance(loc[-1], int) else None
    reason = str((error.get("ctx") or {}).get("error") or "").strip()
    where = ""
    if position is not None:
        where = f" at character {position}"
        if isinstance(document, str) and position <= len(document):
            line = document.count("\n", 0, position) + 1
            column = position - document.rfind("\n", 0, position)
            where += f" (line {line}, column {column})"
    return f"the request body is not valid JSON{where}" + (f": {reason}" if reason else "")


def validation_error(exc: RequestValidationError) -> ValidationFailed:
    """Turn pydantic's error list into a 400 that names each offending field."""
    details = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            # Its location is a character offset, not a field.
            details.append({"code": "InvalidJson", "message": _json_error(error, exc.body)})
            continue
        field = _field_name(tuple(error.get("loc", ())))
        details.append({"code": "InvalidField", "message": f"{field}: {_validation_message(error)}"})
    summary = "; ".join(d["message"] for d in details[:3]) or "the request is invalid"
    return ValidationFailed(f"Invalid request: {summary}", details=details)


def is_foreign_key_violation(exc: IntegrityError) -> bool:
    """Whether the database refused a row because a row it points to is gone (not a duplicate)."""
    orig = exc.orig
    return getattr(orig, "sqlstate", None) == "23503" or (
        getattr(orig, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_FOREIGNKEY"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error response the same shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}
        error = ServiceError(str(exc.detail), code=codes.get(exc.status_code, "HttpError"))
        error.status_code = exc.status_code
        error.headers = dict(exc.headers or {})
        return error_response(error)

    @app.exception_handler(DatabaseTimeout)
    async def _overloaded(request: Request, exc: DatabaseTimeout) -> JSONResponse:
        # Every database connection is busy: a moment's overload, not a bug. Say when to retry.
        log.warning("request.database_busy", extra={"method": request.method, "path": request.url.path})
        return error_response(
            ServiceUnavailable("the service is busy; retry in a moment", headers={"Retry-After": "1"})
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The database went away (a restart, a failover, a dropped connection): the request's
        # transaction rolled back, unless its COMMIT (or a statement that commits as it ends:
        # app.writes) reached the database and only its answer was lost; a retry
        # with an Idempotency-Key is never doubled. The pool reconnects on the next request. The message
        # names the kind only: the driver's can carry the statement and its parameters.
        log.warning(
            "request.database_unavailable",
            extra={
                "method": request.method,
                "path": request.url.path,
                "error": type(getattr(exc, "orig", None) or exc).__name__,
            },
        )
        return error_response(
            ServiceUnavailable(
                "the database is unavailable; retry in a moment",
                code="DatabaseUnavailable",
                headers={"Retry-After": "2"},
            )
        )

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError) -> JSONResponse:
        if not is_foreign_key_violation(exc):
            return await _unexpected(request, exc)
        # What the request named (its account, a model of a manifest) was deleted while it ran,
        # or another process still knew a deleted account (KnownAccounts): look again next time.
        context = getattr(request.app.state, "context", None)
        if context is not None:
            context.known_accounts.forget()
        # Also what a bug writing a wrong reference would get: each one is logged (the constraint
        # where the database names it; never the statement or its values, which hold the tenant's).
        diag = getattr(exc.orig, "diag", None)
        log.warning(
            "request.reference_deleted",
            extra={
                "method": request.method,
                "path": request.url.path,
                "constraint": getattr(diag, "constraint_name", None),
            },
        )
        return error_response(
            Conflict(
                "something this request refers to was deleted while it ran; retry to see what is left",
                code="ReferenceDeleted",
            )
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, DBAPIError):
            # The driver's message can quote the row or the value it refused ("Failing row
            # contains ...": a model's SAS URL): logged are where it failed and what the
            # database names (SQLSTATE, constraint, table, column), never the message.
            diag = getattr(exc.orig, "diag", None)
            log.error(
                "request.unhandled_database_error",
                extra={
                    "method": request.method,
                    "path": request.url.path,
                    "error": type(exc.orig or exc).__name__,
                    **{name: getattr(diag, name, None) for name in _DIAG_NAMES},
                    "at": "".join(traceback.format_tb(exc.__traceback__)),
                },
            )
        else:
            log.exception(
                "request.unhandled_error",
                extra={"method": request.method, "path": request.url.path},
            )
        error = ServiceError("The service hit an unexpected error; it has been logged.")
        return error_response(error)
