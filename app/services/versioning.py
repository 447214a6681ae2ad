"""Per-name version numbers (1, 2, 3 …) that are atomic and never reused."""

from __future__ import annotations

import uuid

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.orm.base import VersionCounter, utcnow

_UPSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def claim_next_version(
    session: Session, counter: type[VersionCounter], *, account_id: uuid.UUID, name: str
) -> tuple[uuid.UUID, int]:
    """Bump the name's counter row in this transaction; returns the row's id and the new version.

    One statement, atomic on both databases. On PostgreSQL a concurrent claim of the same
    name waits on the row lock until this transaction ends, so versions come out 1, 2, 3 …
    with no gap and no repeat (PostgreSQL refuses FOR UPDATE with max(), hence the counter).
    """
    insert = _UPSERTS[session.get_bind().dialect.name]
    statement = (
        insert(counter)
        .values(id=uuid.uuid4(), account_id=account_id, name=name, last_version=1, created_at=utcnow())
        .on_conflict_do_update(
            index_elements=[counter.account_id, counter.name],
            set_={"last_version": counter.last_version + 1},
        )
        .returning(counter.id, counter.last_version)
    )
    row_id, version = session.execute(statement).one()
    return row_id, version
