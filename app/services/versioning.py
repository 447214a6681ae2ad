"""Per-name version numbers (1, 2, 3 …) that are atomic and never reused."""

from __future__ import annotations

import functools
import uuid

from sqlalchemy import ColumnElement, Integer, bindparam, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

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
    statement = claim_statement(session.get_bind().dialect.name, counter)
    params = {"id": uuid.uuid4(), "account_id": account_id, "name": name, "created_at": utcnow()}
    if session.new or session.dirty or session.deleted:
        session.flush()  # what Session.execute's autoflush would do: rows added before go first
    # On the session's connection: Session.execute takes an insert into a mapped class through
    # the ORM's bulk-insert path, which cost the claim more than its round trip.
    row_id, version = session.connection().execute(statement, params).one()
    return row_id, version


@functools.cache
def claim_statement(
    dialect: str, counter: type[VersionCounter], *, counter_id: str = "id", only_if: ColumnElement[bool] | None = None
) -> ReturningInsert:
    """The claim as a statement with parameters ``counter_id`` (a new row's id), ``account_id``,
    ``name`` and ``created_at``, returning the row's id and ``last_version``; built once per
    counter: building it per registration (and its cache key) cost more than running it (issue 20).
    ``only_if``: a condition the claim is made under, or nothing is (PostgreSQL)."""
    table = counter.__table__
    values = {
        "id": bindparam(counter_id, type_=table.c.id.type),
        "account_id": bindparam("account_id", type_=table.c.account_id.type),
        "name": bindparam("name", type_=table.c.name.type),
        "last_version": literal(1, Integer),
        "created_at": bindparam("created_at", type_=table.c.created_at.type),
    }
    insert = _UPSERTS[dialect](table)
    if only_if is None:
        insert = insert.values(**values)
    else:
        insert = insert.from_select(list(values), select(*values.values()).where(only_if))
    return insert.on_conflict_do_update(
        index_elements=[table.c.account_id, table.c.name],
        set_={"last_version": table.c.last_version + 1},
    ).returning(table.c.id, table.c.last_version)
