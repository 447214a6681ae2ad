"""Migration 0018 (the cleanups a deleted account's kubernetes services leave) on a database of
its own, on PostgreSQL and SQLite: the way down drops the table, the way up makes it again."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.test_migrations_events import _to, engine  # noqa: F401 - the fixture

CLEANUPS = sa.table(
    "cluster_cleanups",
    sa.column("id", sa.Uuid()),
    sa.column("service_id", sa.Uuid()),
    sa.column("namespace", sa.String()),
    sa.column("sealed_credentials", sa.Text()),
    sa.column("attempts", sa.Integer()),
    sa.column("next_attempt_at", sa.DateTime(timezone=True)),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def test_cluster_cleanups_come_and_go_with_their_migration(engine: Engine) -> None:  # noqa: F811
    _to(engine, "head")
    now = datetime(2026, 12, 3, tzinfo=UTC)
    row = {"id": uuid.uuid4(), "service_id": uuid.uuid4(), "namespace": "tenant-a", "sealed_credentials": "gAAA"}
    with engine.begin() as connection:
        connection.execute(sa.insert(CLEANUPS).values(**row, attempts=0, next_attempt_at=now, created_at=now))
        assert connection.execute(sa.select(CLEANUPS.c.namespace)).scalar_one() == "tenant-a"
    _to(engine, "0017", down=True)
    with engine.connect() as connection:
        assert "cluster_cleanups" not in sa.inspect(connection).get_table_names()
    _to(engine, "head")
    with engine.connect() as connection:
        assert "cluster_cleanups" in sa.inspect(connection).get_table_names()
        indexes = {i["name"] for i in sa.inspect(connection).get_indexes("cluster_cleanups")}
        assert "ix_cluster_cleanups_next_attempt_at" in indexes
