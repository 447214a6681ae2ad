"""The POSTs that create something, answered once per ``Idempotency-Key`` (app.services.idempotency).

A client that lost an answer (a cut connection, a 503 while the database restarted) sends the
request again with the same key and gets the first answer, marked ``Idempotent-Replayed:
true``, instead of a second model version, manifest version, image build or service.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import Insert
from sqlalchemy.orm import Session

from app.api.openapi import errors, header
from app.auth.caller import Caller
from app.context import ServiceContext
from app.services import idempotency
from app.writes import Writes

P = TypeVar("P")

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="any unique string (a UUID): a retry with the same key and body gets the first answer "
        f"instead of making a second one; remembered for MMS_IDEMPOTENCY_TTL_SECONDS (1-{idempotency.MAX_KEY_LENGTH} "
        "printable characters)",
    ),
]
REPLAYED = {"Idempotent-Replayed": header("true when this is the stored answer of an earlier request with the key")}


def responses(status_code: int, headers: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """The route's ``responses``: its answer's headers with ``Idempotent-Replayed``, and the 422."""
    return {status_code: {"headers": {**(headers or {}), **REPLAYED}}} | errors(422)


def _key_of(request: Request, caller: Caller, context: ServiceContext, body: BaseModel) -> tuple[str, str]:
    """Who sent the key, and what was asked: keyed digests (``app.services.idempotency``)."""
    sealer = context.sealer
    return (
        idempotency.owner(sealer, caller.issuer, caller.subject),
        idempotency.fingerprint(sealer, request.method, request.url.path, body.model_dump(mode="json")),
    )


def answer_once(
    request: Request,
    session: Session,
    caller: Caller,
    context: ServiceContext,
    *,
    key: str | None,
    body: BaseModel,
    status_code: int,
    make: Callable[[], BaseModel],
    headers: Callable[[dict[str, Any]], dict[str, str]] = lambda answer: {},
) -> JSONResponse:
    """``make()``'s answer, or, for a key this caller already sent with this body, the stored one.

    ``headers`` derives the answer's headers from its body, so a replay carries them too.
    """
    owner, fingerprint = _key_of(request, caller, context, body) if key is not None else ("", "")
    stored = idempotency.run_idempotent(
        session,
        owner=owner,
        key=key,
        request_fingerprint=fingerprint,
        ttl_seconds=context.settings.idempotency_ttl_seconds,
        action=lambda: (status_code, make().model_dump(mode="json")),
    )
    return _response(stored, headers)


async def answer_statement_once(
    request: Request,
    writes: Writes,
    caller: Caller,
    context: ServiceContext,
    *,
    key: str | None,
    body: BaseModel,
    status_code: int,
    statement: Insert,
    statement_once: Insert,
    prepare: Callable[[], P],
    parameters: Callable[[P], Mapping[str, object]],
    make: Callable[[P, Sequence[Sequence[Any]]], BaseModel],
) -> JSONResponse:
    """``answer_once`` for a create that is one prebuilt statement
    (``idempotency.run_statement_once``): ``prepare`` checks the request and makes what
    ``parameters`` gives the statement; ``make`` builds the answer from it and the rows."""
    owner, fingerprint = _key_of(request, caller, context, body) if key is not None else ("", "")
    prepared: list[P] = []

    def parameters_of_prepared() -> Mapping[str, object]:
        prepared.append(prepare())
        return parameters(prepared[0])

    stored = await idempotency.run_statement_once(
        writes,
        owner=owner,
        key=key,
        request_fingerprint=fingerprint,
        ttl_seconds=context.settings.idempotency_ttl_seconds,
        statement=statement,
        statement_once=statement_once,
        prepare=parameters_of_prepared,
        answer=lambda rows: (status_code, make(prepared[0], rows).model_dump(mode="json")),
    )
    return _response(stored, lambda answer: {})


def _response(stored: idempotency.StoredResponse, headers: Callable[[dict[str, Any]], dict[str, str]]) -> JSONResponse:
    replayed = {"Idempotent-Replayed": "true"} if stored.replayed else {}
    return JSONResponse(stored.body, status_code=stored.status_code, headers=headers(stored.body) | replayed)
