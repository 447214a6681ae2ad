"""Migration 0020 (a service stores whether its target is a compute the account attached) on a
database of its own, on PostgreSQL and SQLite: a service from before is attached on kubernetes
and on a swarm not named `swarm`, on `swarm` only when its account holds a swarm of that name,
and on `local` never; the way down and up again keeps the services."""

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
        ids = {
            name: new_service_row(session, image, name=name).id
            for name in ("onlocal", "ours", "theirs", "orphan", "kube")
        }
        account_id = image.account_id
    _to(engine, "0019", down=True)
    with engine.begin() as connection:
        assert "compute_attached" not in {c["name"] for c in sa.inspect(connection).get_columns("services")}
        targets = {"ours": ("swarm", "swarm"), "theirs": ("swarm", "tswarm"), "orphan": ("swarm", "gone")}
        for name, (compute_type, compute_name) in {**targets, "kube": ("kubernetes", "aks")}.items():
            connection.execute(
                sa.update(SERVICES)
                .where(SERVICES.c.id == ids[name])
                .values(compute_type=compute_type, compute_name=compute_name)
            )
        # The account attached the swarm `tswarm`, and a cluster named `swarm`: the service on
        # `swarm` is on the operator's swarm. `gone` (a swarm whose compute went) and a cluster
        # are attached whatever the computes hold.
        for compute_name, compute_type in (("tswarm", "swarm"), ("swarm", "kubernetes")):
            connection.execute(
                sa.insert(COMPUTES).values(
                    id=uuid.uuid4(),
                    account_id=account_id,
                    name=compute_name,
                    compute_type=compute_type,
                    properties={},
                    created_at=datetime(2026, 12, 3, tzinfo=UTC),
                )
            )

    _to(engine, "head")
    with engine.connect() as connection:
        attached = dict(connection.execute(sa.select(SERVICES.c.id, SERVICES.c.compute_attached)).all())
    assert attached == {
        ids["onlocal"]: False,
        ids["ours"]: False,
        ids["theirs"]: True,
        ids["orphan"]: True,
        ids["kube"]: True,
    }
    _to(engine, "0019", down=True)
    _to(engine, "head")
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(SERVICES)).scalar() == 5
