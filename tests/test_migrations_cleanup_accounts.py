"""Migration 0021 (a cleanup row names its service's account) on a database of its own, on
PostgreSQL and SQLite: a row from before takes the account of its service, were it still there,
else of the compute whose sealed credentials it copied, else none; the way down drops the
column and keeps the rows, the way up adds it again."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.orm import Account, Compute
from tests.factories import new_image_row, new_service_row
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
ACCOUNTS = sa.table(
    "cluster_cleanups",
    sa.column("id", sa.Uuid()),
    sa.column("account_id", sa.Uuid()),
    sa.column("subscription_id", sa.String()),
)
NOW = datetime(2026, 12, 3, tzinfo=UTC)


def _row(service_id: uuid.UUID, sealed: str) -> dict:
    return {
        "id": uuid.uuid4(),
        "service_id": service_id,
        "namespace": "tenant-a",
        "sealed_credentials": sealed,
        "attempts": 0,
        "next_attempt_at": NOW,
        "created_at": NOW,
    }


def test_a_cleanup_from_before_takes_its_account_from_its_service_or_compute(engine: Engine) -> None:  # noqa: F811
    _to(engine, "head")
    with Session(engine) as session, session.begin():
        image = new_image_row(session)
        other = new_image_row(session)  # another account
        service_id = new_service_row(session, image).id
        session.add(
            Compute(
                account_id=other.account_id,
                name="cluster",
                compute_type="kubernetes",
                properties={},
                sealed_credentials="sealed-kubeconfig-of-other",
            )
        )
        account_id, other_id = image.account_id, other.account_id
        subscription, other_subscription = (
            session.scalar(sa.select(sa.func.lower(Account.subscription_id)).where(Account.id == a))
            for a in (account_id, other_id)
        )
    _to(engine, "0020", down=True)
    # A service still there; one force-deleted alone (its compute stays); one whose account went.
    rows = [_row(service_id, "sealed-a"), _row(uuid.uuid4(), "sealed-kubeconfig-of-other"), _row(uuid.uuid4(), "x")]
    with engine.begin() as connection:
        connection.execute(sa.insert(CLEANUPS), rows)

    _to(engine, "head")
    with engine.connect() as connection:
        accounts = dict(connection.execute(sa.select(ACCOUNTS.c.id, ACCOUNTS.c.account_id)).all())
        tenants = dict(connection.execute(sa.select(ACCOUNTS.c.id, ACCOUNTS.c.subscription_id)).all())
        indexes = {i["name"] for i in sa.inspect(connection).get_indexes("cluster_cleanups")}
    assert accounts == {rows[0]["id"]: account_id, rows[1]["id"]: other_id, rows[2]["id"]: None}
    assert tenants == {rows[0]["id"]: subscription, rows[1]["id"]: other_subscription, rows[2]["id"]: None}
    assert subscription is not None and other_subscription is not None
    assert "ix_cluster_cleanups_account_id" in indexes

    _to(engine, "0020", down=True)
    with engine.connect() as connection:
        assert "account_id" not in {c["name"] for c in sa.inspect(connection).get_columns("cluster_cleanups")}
        assert set(connection.execute(sa.select(CLEANUPS.c.id)).scalars()) == {row["id"] for row in rows}
    _to(engine, "head")
    with engine.connect() as connection:
        assert "account_id" in {c["name"] for c in sa.inspect(connection).get_columns("cluster_cleanups")}
