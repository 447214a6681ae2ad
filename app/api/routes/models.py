"""The model registry: register, get, list and delete models of an account."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from app.api import examples, idempotent
from app.api.deps import (
    CallerDep,
    ContextDep,
    ModelId,
    ReadableAccount,
    ReadsDep,
    SessionDep,
    WritableAccount,
    WritesDep,
)
from app.api.links import next_link
from app.api.openapi import errors
from app.api.routing import ApiRoute
from app.orm import ModelVersion
from app.schemas.common import Page
from app.schemas.models import ModelCreate, ModelRead
from app.services import models

router = APIRouter(
    prefix="/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}/models",
    tags=["models"],
    route_class=ApiRoute,
)


def to_read(model: ModelVersion | models.ModelRecord) -> ModelRead:
    return ModelRead(
        id=str(model.id),
        name=model.name,
        version=model.version,
        description=model.description,
        url=model.url,
        tags=model.tags,
        mimeType=model.mime_type,
        unpack=model.unpack,
        sha256=model.sha256,
        createdAt=model.created_at,
    )


# The seed: "Http Status Code 200 means Successfully Registered".
@router.post("", response_model=ModelRead, status_code=status.HTTP_200_OK, responses=idempotent.responses(200))
async def register_model(
    request: Request,
    body: Annotated[ModelCreate, Body(openapi_examples=examples.MODEL)],
    account: WritableAccount,
    caller: CallerDep,
    context: ContextDep,
    writes: WritesDep,
    idempotency_key: idempotent.IdempotencyKey = None,
) -> JSONResponse:
    """Register a model; each registration under a name gets that name's next version."""
    if writes.dialect == "postgresql":  # one statement, on the event loop (with a key, two round trips)
        return await idempotent.answer_statement_once(
            request,
            writes,
            caller,
            context,
            key=idempotency_key,
            body=body,
            status_code=status.HTTP_200_OK,
            statement=models.REGISTER,
            statement_once=models.REGISTER_ONCE,
            prepare=lambda: models.registration(account, body, urls=context.url_policy, created_by=caller.subject),
            parameters=lambda registration: registration.parameters,
            make=lambda registration, rows: to_read(registration.registered(rows)),
        )
    # SQLite: three statements in a session, in the thread pool.
    return await writes.run(
        lambda session: idempotent.answer_once(
            request,
            session,
            caller,
            context,
            key=idempotency_key,
            body=body,
            status_code=status.HTTP_200_OK,
            make=lambda: to_read(
                models.register_model(session, account, body, urls=context.url_policy, created_by=caller.subject)
            ),
        )
    )


@router.get("/{modelId}", response_model=ModelRead)
async def get_model(model_id: ModelId, account: ReadableAccount, reads: ReadsDep) -> ModelRead:
    rows = await reads.rows(*models.model_query(model_id))
    return to_read(models.model_from_rows(rows, account, model_id=model_id))


@router.get("", response_model=Page[ModelRead])
async def list_models(
    request: Request,
    account: ReadableAccount,
    reads: ReadsDep,
    name: str | None = None,
    tag: str | None = None,
    count: int | None = None,
    skip_token: Annotated[str | None, Query(alias="$skipToken")] = None,
) -> Page[ModelRead]:
    """Models by name, newest version first; filter by name or tag; page with ``$skipToken``."""

    def read(session: Session) -> Page[ModelRead]:
        rows, token = models.list_models(session, account, name=name, tag=tag, count=count, skip_token=skip_token)
        return Page(value=[to_read(m) for m in rows], nextLink=next_link(request, token))

    return await reads.run(read, many=True)


@router.delete(
    "/{modelId}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(409, s409="A manifest uses the model."),
)
def delete_model(model_id: ModelId, account: WritableAccount, session: SessionDep) -> None:
    models.delete_model(session, account, model_id=model_id)
