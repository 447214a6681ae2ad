"""Migration 0020 (a service stores whether its target is a compute the account attached) on a
database of its own, on PostgreSQL and SQLite: a service from before is attached when its account
holds a compute of its target's name, and `local` never is; the way down and up again keeps the
services."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from tests.factories import new_image_row, new_service_row
from tests.test_migrations_events import _to, engine  # noqa: F401 - the fixture

SERVICES = sa.table(
    "services",
    sa.column("id", sa.Uuid()),
    sa.column("compute_name", sa.String()),
    sa.column("compute_type", sa.String()),
    sa.column("compute_attached", sa.Boolean()),
)
COMPUTES = sa.table(
    "computes",
    sa.column("id", sa.Uuid()),
    sa.column("account_id", sa.Uuid()),
    sa.column("name", sa.String()),
    sa.column("compute_type", sa.String()),
    sa.column("properties", sa.JSON()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def test_a_service_from_before_is_attached_when_its_account_holds_its_target(engine: Engine) -> None:  # noqa: F811
    _to(engine, "head")
    with Session(engine) as session, session.begin():
        image = new_image_row(session)
        ids = {name: new_service_row(session, image, name=name).id for name in ("onlocal", "ours", "theirs")}
        account_id = image.account_id
    _to(engine, "0019", down=True)
    with engine.begin() as connection:
        assert "compute_attached" not in {c["name"] for c in sa.inspect(connection).get_columns("services")}
        for name, compute in (("ours", "swarm"), ("theirs", "swarm")):
            connection.execute(
                sa.update(SERVICES)
                .where(SERVICES.c.id == ids[name])
                .values(compute_type="swarm", compute_name=compute if name == "ours" else "tswarm")
            )
        # The account attached `tswarm`; `swarm` is the operator's (no compute of that name).
        connection.execute(
            sa.insert(COMPUTES).values(
                id=uuid.uuid4(),
                account_id=account_id,
                name="tswarm",
                compute_type="swarm",
                properties={"dockerHost": "tcp://10.0.0.2:2376"},
                created_at=datetime(2026, 12, 3, tzinfo=UTC),
            )
        )

    _to(engine, "head")
    with engine.connect() as connection:
        attached = dict(connection.execute(sa.select(SERVICES.c.id, SERVICES.c.compute_attached)).all())
    assert attached == {ids["onlocal"]: False, ids["ours"]: False, ids["theirs"]: True}
    _to(engine, "0019", down=True)
    _to(engine, "head")
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(SERVICES)).scalar() == 3
