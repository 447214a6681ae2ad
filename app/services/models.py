"""The model registry: every registration under a name takes that name's next version."""

from __future__ import annotations

import uuid

from sqlalchemy import and_, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, joinedload

from app.errors import NotFound
from app.orm import Account, ModelTag, ModelVersion, RegisteredModel
from app.orm.base import utcnow
from app.schemas.models import ModelCreate
from app.services.paging import decode_token, encode_token, page_size

_UPSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def _claim_next_version(session: Session, *, account_id: uuid.UUID, name: str) -> tuple[uuid.UUID, int]:
    """Bump the name's counter row in this transaction: one statement, atomic on both databases.

    On PostgreSQL a concurrent registration of the same name waits on the row lock until
    this transaction ends, so versions come out 1, 2, 3 ... with no gap and no repeat.
    """
    insert = _UPSERTS[session.get_bind().dialect.name]
    statement = (
        insert(RegisteredModel)
        .values(id=uuid.uuid4(), account_id=account_id, name=name, last_version=1, created_at=utcnow())
        .on_conflict_do_update(
            index_elements=[RegisteredModel.account_id, RegisteredModel.name],
            set_={"last_version": RegisteredModel.last_version + 1},
        )
        .returning(RegisteredModel.id, RegisteredModel.last_version)
    )
    registered_id, version = session.execute(statement).one()
    return registered_id, version


def register_model(
    session: Session, account: Account, data: ModelCreate, *, created_by: str | None
) -> ModelVersion:
    """Register a model under its name as that name's next version."""
    registered_id, version = _claim_next_version(session, account_id=account.id, name=data.name)
    model = ModelVersion(
        account_id=account.id,
        registered_model_id=registered_id,
        name=data.name,
        version=version,
        description=data.description,
        url=data.url,
        mime_type=data.mimeType,
        unpack=data.unpack,
        sha256=data.sha256,
        created_by=created_by,
        tag_rows=[ModelTag(position=i, tag=tag) for i, tag in enumerate(data.tags)],
    )
    session.add(model)
    session.flush()
    return model


def _parse_id(model_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(model_id)
    except ValueError:
        return None


def get_model(session: Session, account: Account, *, model_id: str) -> ModelVersion:
    """One model of the account by id, or 404."""
    parsed = _parse_id(model_id)
    # One round trip for the row and its tags.
    model = session.get(ModelVersion, parsed, options=[joinedload(ModelVersion.tag_rows)]) if parsed else None
    if model is None or model.account_id != account.id:
        raise NotFound(f"model '{model_id}' was not found in this account", code="ModelNotFound")
    return model


def list_models(
    session: Session,
    account: Account,
    *,
    name: str | None,
    tag: str | None,
    count: int | None,
    skip_token: str | None,
) -> tuple[list[ModelVersion], str | None]:
    """A page of models ordered by name, newest version first, and the next page's token."""
    limit = page_size(count)
    query = select(ModelVersion).where(ModelVersion.account_id == account.id)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    if tag is not None:
        query = query.where(
            ModelVersion.id.in_(select(ModelTag.model_version_id).where(ModelTag.tag == tag))
        )
    position = decode_token(skip_token, fields={"n": str, "v": int})
    if position is not None:
        query = query.where(
            or_(
                ModelVersion.name > position["n"],
                and_(ModelVersion.name == position["n"], ModelVersion.version < position["v"]),
            )
        )
    query = query.order_by(ModelVersion.name, ModelVersion.version.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_token({"n": last.name, "v": last.version})


def delete_model(session: Session, account: Account, *, model_id: str) -> None:
    """Delete one model version; its version number is never given out again."""
    session.delete(get_model(session, account, model_id=model_id))
    session.flush()
