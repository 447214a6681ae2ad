"""Migration 0019 (a cleanup row may stand for a service on a swarm the account attached) on a
database of its own, on PostgreSQL and SQLite: a row from before reads as a kubernetes one; the
way down drops the swarm rows (the code before would try them as kubernetes) and the columns,
keeping the kubernetes rows; the way up adds the columns again."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.test_migrations_events import _to, engine  # noqa: F401 - the fixture


def _columns() -> list[sa.ColumnClause]:
    return [
        sa.column("id", sa.Uuid()),
        sa.column("service_id", sa.Uuid()),
        sa.column("namespace", sa.String()),
        sa.column("sealed_credentials", sa.Text()),
        sa.column("attempts", sa.Integer()),
        sa.column("next_attempt_at", sa.DateTime(timezone=True)),
        sa.column("created_at", sa.DateTime(timezone=True)),
    ]


BEFORE = sa.table("cluster_cleanups", *_columns())
AFTER = sa.table(
    "cluster_cleanups", *_columns(), sa.column("compute_type", sa.String()), sa.column("docker_host", sa.String())
)
NOW = datetime(2026, 12, 3, tzinfo=UTC)


def _row(namespace: str) -> dict:
    return {
        "id": uuid.uuid4(),
        "service_id": uuid.uuid4(),
        "namespace": namespace,
        "sealed_credentials": "gAAA",
        "attempts": 0,
        "next_attempt_at": NOW,
        "created_at": NOW,
    }


def test_swarm_cleanups_come_and_go_with_their_migration(engine: Engine) -> None:  # noqa: F811
    _to(engine, "0018")
    kube = _row("tenant-a")
    with engine.begin() as connection:
        connection.execute(sa.insert(BEFORE).values(**kube))
    _to(engine, "head")
    swarm = _row("")
    with engine.begin() as connection:
        assert connection.execute(sa.select(AFTER.c.compute_type, AFTER.c.docker_host)).one() == ("kubernetes", None)
        connection.execute(sa.insert(AFTER).values(**swarm, compute_type="swarm", docker_host="tcp://10.0.0.2:2376"))
    _to(engine, "0018", down=True)
    with engine.connect() as connection:
        columns = {c["name"] for c in sa.inspect(connection).get_columns("cluster_cleanups")}
        assert "compute_type" not in columns and "docker_host" not in columns
        assert connection.execute(sa.select(BEFORE.c.id)).scalars().all() == [kube["id"]]
    _to(engine, "head")
    with engine.connect() as connection:
        columns = {c["name"] for c in sa.inspect(connection).get_columns("cluster_cleanups")}
        assert {"compute_type", "docker_host"} <= columns
        indexes = {i["name"] for i in sa.inspect(connection).get_indexes("cluster_cleanups")}
        assert "ix_cluster_cleanups_next_attempt_at" in indexes
