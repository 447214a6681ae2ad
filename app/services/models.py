"""The model registry: every registration under a name takes that name's next version."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, Text, bindparam, cast, func, insert, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, joinedload
from sqlalchemy.sql.dml import ReturningInsert

from app.errors import Conflict
from app.orm import Manifest, ManifestModel, ModelTag, ModelVersion, RegisteredModel
from app.orm.base import utcnow
from app.schemas.models import ModelCreate
from app.services import idempotency
from app.services.accounts import AccountRef
from app.services.lookup import get_in_account, not_found, parse_uuid
from app.services.paging import page_by_name_and_version
from app.services.source_urls import SourceUrlPolicy
from app.services.versioning import claim_next_version, claim_statement


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A model as a read shows it: the columns ``ModelVersion`` has, read without the ORM."""

    id: uuid.UUID
    name: str
    version: int
    description: str | None
    url: str
    tags: list[str]
    mime_type: str
    unpack: bool
    sha256: str | None
    created_at: datetime


_MODELS = ModelVersion.__table__
_TAGS = ModelTag.__table__
_RECORD_FIELDS = [name for name in ModelRecord.__slots__ if name != "tags"]
_RECORD_COLUMNS = [_MODELS.c[name] for name in _RECORD_FIELDS]
# Statements built once, with parameters: building one per request (and its cache key) cost a
# GET more than its round trip did. They run past the ORM's execution layer, which a Core
# statement does not need (issue 20).
READ_MODEL_BY_ID = (
    select(*_RECORD_COLUMNS, _MODELS.c.account_id, _TAGS.c.tag)
    .outerjoin(_TAGS, _TAGS.c.model_version_id == _MODELS.c.id)
    .where(_MODELS.c.id == bindparam("model_id"))
    .order_by(_TAGS.c.position)
)
_ACCOUNT_AT, _TAG_AT = len(_RECORD_COLUMNS), len(_RECORD_COLUMNS) + 1  # where model_from_rows finds them
_INSERT_MODEL = insert(_MODELS)
_INSERT_TAGS = insert(_TAGS)


def _register_in_one_statement(only_if: ColumnElement[bool] | None = None) -> ReturningInsert:
    """PostgreSQL: the counter's claim, the row and its tags in one statement (data-modifying
    CTEs), one round trip where three statements took three (issue 20). The claim locks
    the name's counter row as on its own; the tags' foreign key is checked at the statement's
    end, when the row is in. ``only_if``: a condition the whole registration is made under, or
    nothing is (every data-modifying CTE runs, so each is held to it)."""
    claim = claim_statement("postgresql", RegisteredModel, counter_id="counter_id", only_if=only_if).cte("claim")
    given = [column for column in _RECORD_COLUMNS if column.key != "version"]
    tags = func.unnest(bindparam("tags", type_=ARRAY(Text))).table_valued("tag", with_ordinality="ord").render_derived()
    add_tags = (
        insert(_TAGS)
        .from_select(
            [_TAGS.c.model_version_id, _TAGS.c.position, _TAGS.c.tag],
            _held_to(
                select(bindparam("id", type_=_MODELS.c.id.type), cast(tags.c.ord - 1, Integer), tags.c.tag), only_if
            ),
        )
        .cte("tags")
    )
    columns = [*given, _MODELS.c.version, _MODELS.c.account_id, _MODELS.c.registered_model_id, _MODELS.c.created_by]
    values = [
        *(bindparam(column.key, type_=column.type) for column in given),
        claim.c.last_version,
        bindparam("account_id", type_=_MODELS.c.account_id.type),
        claim.c.id,
        bindparam("created_by", type_=_MODELS.c.created_by.type),
    ]
    return (
        insert(_MODELS)
        .from_select(columns, select(*values).select_from(claim))
        .add_cte(add_tags)
        .returning(_MODELS.c.registered_model_id, _MODELS.c.version)
    )


def _held_to(query: Select[Any], only_if: ColumnElement[bool] | None) -> Select[Any]:
    return query if only_if is None else query.where(only_if)


REGISTER = _register_in_one_statement()
# The same, made only when this transaction's Idempotency-Key claim took the key: run after
# the claim, with its record's id (idempotency.run_statement_once). A retry then makes and
# locks nothing before its answer is replayed.
REGISTER_ONCE = _register_in_one_statement(only_if=idempotency.CLAIMED)


def register_model(
    session: Session,
    account: AccountRef,
    data: ModelCreate,
    *,
    urls: SourceUrlPolicy,
    created_by: str | None,
) -> ModelRecord:
    """Register a model under its name as that name's next version, in ``session``'s
    transaction. The API registers on PostgreSQL with ``registration`` instead, on the event
    loop (``app.writes``).

    Core inserts, not the ORM's unit of work, which cost a registration more than its
    statements did (issue 20). On PostgreSQL one statement (``REGISTER``); on SQLite, which has
    no data-modifying CTEs, three: the counter's claim, the row, its tags."""
    if session.get_bind().dialect.name == "postgresql":
        made = registration(account, data, urls=urls, created_by=created_by)
        if session.new or session.dirty or session.deleted:
            session.flush()  # rows added before go first, as autoflush would
        return made.registered(session.connection().execute(REGISTER, made.parameters).all())
    model, row = _new_registration(account, data, urls=urls, created_by=created_by)
    connection = session.connection()
    registered_id, version = claim_next_version(session, RegisteredModel, account_id=account.id, name=data.name)
    connection.execute(_INSERT_MODEL, {**row, "version": version, "registered_model_id": registered_id})
    if model.tags:
        connection.execute(
            _INSERT_TAGS,
            [{"model_version_id": model.id, "position": i, "tag": tag} for i, tag in enumerate(model.tags)],
        )
    return dataclasses.replace(model, version=version)


@dataclass(frozen=True, slots=True)
class Registration:
    """A registration as PostgreSQL's one statement: ``REGISTER`` with ``parameters``, for the
    caller to run where it costs least (the API: on the event loop, ``app.writes``);
    ``registered`` is the model it made, given the statement's rows."""

    model: ModelRecord
    parameters: dict[str, Any]

    def registered(self, rows: Sequence[Sequence[Any]]) -> ModelRecord:
        [(_, version)] = rows
        return dataclasses.replace(self.model, version=version)


def registration(
    account: AccountRef, data: ModelCreate, *, urls: SourceUrlPolicy, created_by: str | None
) -> Registration:
    """A model's registration on PostgreSQL, its URL checked (a 400 before anything runs)."""
    model, row = _new_registration(account, data, urls=urls, created_by=created_by)
    return Registration(model, {**row, "counter_id": uuid.uuid4(), "tags": model.tags})


def _new_registration(
    account: AccountRef, data: ModelCreate, *, urls: SourceUrlPolicy, created_by: str | None
) -> tuple[ModelRecord, dict[str, Any]]:
    """The model's record, its version still to claim, and its row's values; the URL checked first."""
    urls.check(data.url, field="url")
    model = ModelRecord(
        id=uuid.uuid4(),
        name=data.name,
        version=0,  # the claim's
        description=data.description,
        url=data.url,
        tags=list(data.tags),
        mime_type=data.mimeType,
        unpack=data.unpack,
        sha256=data.sha256,
        created_at=utcnow(),
    )
    row = {name: getattr(model, name) for name in _RECORD_FIELDS if name != "version"}
    return model, row | {"account_id": account.id, "created_by": created_by}


def model_query(model_id: str) -> tuple[Select[Any], dict[str, object]]:
    """The statement that reads one model by id (its row joined with its tags) and its
    parameters, for ``model_from_rows``; 404 for an id that is no UUID. One Core statement,
    without the ORM's loading and identity map, which cost a GET more than its round trip to
    the database did; the API runs it with the driver alone (app.reads, issue 20)."""
    parsed = parse_uuid(model_id)
    if parsed is None:
        raise not_found("model", model_id)
    return READ_MODEL_BY_ID, {"model_id": parsed}


def model_from_rows(rows: Sequence[Sequence[Any]], account: AccountRef, *, model_id: str) -> ModelRecord:
    """The model ``model_query``'s rows hold, or 404 when there is none in the account."""
    if not rows or rows[0][_ACCOUNT_AT] != account.id:
        raise not_found("model", model_id)
    columns = dict(zip(_RECORD_FIELDS, rows[0][:_ACCOUNT_AT], strict=True))
    return ModelRecord(**columns, tags=[row[_TAG_AT] for row in rows if row[_TAG_AT] is not None])


def list_models(
    session: Session,
    account: AccountRef,
    *,
    name: str | None,
    tag: str | None,
    count: int | None,
    skip_token: str | None,
) -> tuple[list[ModelVersion], str | None]:
    """A page of models by name, newest version first, and the next page's token."""
    query = select(ModelVersion).where(ModelVersion.account_id == account.id)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    if tag is not None:
        query = query.where(ModelVersion.id.in_(select(ModelTag.model_version_id).where(ModelTag.tag == tag)))
    return page_by_name_and_version(session, query, ModelVersion, count=count, skip_token=skip_token)


def get_model(session: Session, account: AccountRef, *, model_id: str) -> ModelVersion:
    """One model of the account by id as an ORM row (to change or delete it), or 404."""
    return get_in_account(
        session, ModelVersion, account, model_id, kind="model", options=[joinedload(ModelVersion.tag_rows)]
    )


def delete_model(session: Session, account: AccountRef, *, model_id: str) -> None:
    """Delete one model version; refused while a manifest bundles it. Its version is never reused."""
    model = get_model(session, account, model_id=model_id)
    users = session.execute(
        select(Manifest.name, Manifest.version)
        .join(ManifestModel, ManifestModel.manifest_id == Manifest.id)
        .where(ManifestModel.model_version_id == model.id)
        .limit(3)
    ).all()
    if users:
        raise Conflict(
            f"model '{model_id}' is used by manifest {', '.join(f'{n} v{v}' for n, v in users)}; "
            "delete the manifests that bundle it first",
            code="ModelInUse",
        )
    session.delete(model)
    session.flush()
