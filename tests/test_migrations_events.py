"""Migration 0014 (image_events becomes events, webhooks choose event types) on a database of
its own, on PostgreSQL and SQLite: the image events of before keep their ids and deliveries, the
id sequence carries on past ids already handed out (so a Last-Event-ID of before still resumes),
and the way back keeps the image events."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine, make_url

from app.config import Settings
from app.database import alembic_config, make_engine

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture()
def engine(settings: Settings, tmp_path) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    """An engine on an empty database (the suite's own is already migrated)."""
    url = make_url(settings.resolved_database_url)
    if url.drivername.startswith("sqlite"):
        fresh = make_engine(settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'm.db'}"}))
        yield fresh
        fresh.dispose()
        return
    name = f"mms_migration_{uuid.uuid4().hex[:12]}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    fresh = make_engine(settings.model_copy(update={"database_url": url.set(database=name).render_as_string(False)}))
    try:
        yield fresh
    finally:
        fresh.dispose()
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _to(engine: Engine, revision: str, *, down: bool = False) -> None:
    """Migrate as app.database.migrate does (SQLite's foreign keys off meanwhile), to ``revision``."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                (command.downgrade if down else command.upgrade)(config, revision)
        finally:
            if sqlite:
                connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")


def _table(name: str, *columns: str, **typed: sa.types.TypeEngine) -> sa.TableClause:
    """A table as a migration sees it (reflection cannot tell a UUID stored as SQLite text)."""
    uuids = {"id", "account_id", "image_id", "subject_id", "webhook_id"}
    return sa.table(
        name,
        *(sa.column(c, sa.Uuid() if c in uuids else sa.String()) for c in columns),
        *(sa.column(c, t) for c, t in typed.items()),
    )


WHEN = sa.DateTime(timezone=True)
ACCOUNTS = _table(
    "accounts",
    "id",
    "subscription_id",
    "resource_group",
    "name",
    "location",
    "sku_name",
    sku_capacity=sa.Integer(),
    created_at=WHEN,
)
EVENT_COLUMNS = ("account_id", "state", "payload")
IMAGE_EVENTS = _table("image_events", "image_id", *EVENT_COLUMNS, id=sa.Integer(), created_at=WHEN)
EVENTS = _table("events", "subject_id", "subject_kind", *EVENT_COLUMNS, id=sa.Integer(), created_at=WHEN)
WEBHOOKS = _table("webhooks", "id", "account_id", "url", "sealed_secret", active=sa.Boolean(), created_at=WHEN)
DELIVERIES = _table(
    "webhook_deliveries",
    "id",
    "webhook_id",
    "state",
    event_id=sa.Integer(),
    attempts=sa.Integer(),
    next_attempt_at=WHEN,
    created_at=WHEN,
)


def test_image_events_keep_their_ids_and_the_sequence_goes_on(engine: Engine) -> None:
    _to(engine, "0013")
    account_id, image_id, hook_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(
            sa.insert(ACCOUNTS).values(
                id=account_id,
                subscription_id="s",
                resource_group="rg",
                name="a",
                location="eastus2",
                sku_name="S1",
                sku_capacity=1,
                created_at=NOW,
            )
        )
        events = IMAGE_EVENTS
        for state in ("NotStarted", "Running", "Succeeded"):
            connection.execute(
                sa.insert(events).values(
                    account_id=account_id, image_id=image_id, state=state, payload="{}", created_at=NOW
                )
            )
        ids = list(connection.scalars(sa.select(events.c.id).order_by(events.c.id)))
        connection.execute(sa.delete(events).where(events.c.id == ids[-1]))  # the newest one pruned
        connection.execute(
            sa.insert(WEBHOOKS).values(
                id=hook_id,
                account_id=account_id,
                url="https://h.example/x",
                sealed_secret="s",
                active=True,
                created_at=NOW,
            )
        )
        connection.execute(
            sa.insert(DELIVERIES).values(
                id=uuid.uuid4(),
                webhook_id=hook_id,
                event_id=ids[1],
                state="Pending",
                attempts=0,
                next_attempt_at=NOW,
                created_at=NOW,
            )
        )

    _to(engine, "head")
    with engine.begin() as connection:
        assert not sa.inspect(connection).has_table("image_events")
        events = EVENTS
        rows = connection.execute(
            sa.select(events.c.id, events.c.subject_kind, events.c.subject_id, events.c.state).order_by(events.c.id)
        ).all()
        assert [tuple(row) for row in rows] == [
            (ids[0], "image", image_id, "NotStarted"),
            (ids[1], "image", image_id, "Running"),
        ]
        new_id = connection.execute(
            sa.insert(events)
            .values(
                account_id=account_id,
                subject_kind="service",
                subject_id=uuid.uuid4(),
                state="Transitioning",
                payload="{}",
                created_at=NOW,
            )
            .returning(events.c.id)
        ).scalar_one()
        assert new_id > ids[-1], "an id handed out before the migration was handed out again"
        assert connection.scalar(sa.text("SELECT event_types FROM webhooks")) is None
        deliveries = DELIVERIES
        assert connection.scalar(sa.select(deliveries.c.event_id)) == ids[1]
        # The delivery's foreign key follows the renamed table: its event's deletion takes it along.
        connection.execute(sa.delete(events).where(events.c.id == ids[1]))
        assert connection.scalar(sa.select(sa.func.count()).select_from(deliveries)) == 0

    _to(engine, "0013", down=True)
    with engine.begin() as connection:
        events = IMAGE_EVENTS
        assert connection.execute(sa.select(events.c.id, events.c.image_id)).all() == [(ids[0], image_id)]
        assert "event_types" not in {c["name"] for c in sa.inspect(connection).get_columns("webhooks")}
    _to(engine, "head")  # and forward again
    with engine.begin() as connection:
        assert connection.scalar(sa.select(EVENTS.c.subject_kind)) == "image"
