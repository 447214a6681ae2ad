"""Migration 0016 (the serving spec a roll back restores, the last generation given) on a
database of its own, on PostgreSQL and SQLite: an existing service's count of generations starts
at its generation, the image kept as the serving one cannot be deleted under it, and the way
back and forth keeps the services."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tests.factories import new_image_row, new_service_row
from tests.test_migrations_events import _to, engine  # noqa: F401 - the fixture

NEW_COLUMNS = {"serving_image_id", "serving_cpu", "serving_memory_gb", "last_generation"}
SERVICES = sa.table(
    "services",
    sa.column("id", sa.Uuid()),
    sa.column("image_id", sa.Uuid()),
    sa.column("serving_image_id", sa.Uuid()),
    sa.column("serving_cpu", sa.Float()),
    sa.column("generation", sa.Integer()),
    sa.column("last_generation", sa.Integer()),
)
IMAGES = sa.table("images", sa.column("id", sa.Uuid()))


def test_existing_services_count_generations_from_theirs_and_hold_their_serving_image(engine: Engine) -> None:  # noqa: F811
    _to(engine, "head")
    with Session(engine) as session, session.begin():
        service = new_service_row(session)
        service_id, old_image, new_image = service.id, service.image_id, new_image_row(session).id
    _to(engine, "0015", down=True)
    with engine.begin() as connection:
        assert not NEW_COLUMNS & {c["name"] for c in sa.inspect(connection).get_columns("services")}
        connection.execute(sa.update(SERVICES).values(generation=3))  # rolled out twice before

    _to(engine, "head")
    with engine.begin() as connection:
        row = connection.execute(
            sa.select(SERVICES.c.id, SERVICES.c.generation, SERVICES.c.last_generation, SERVICES.c.serving_image_id)
        ).one()
        assert tuple(row) == (service_id, 3, 3, None)
        # A rollout from the old image to the new one.
        connection.execute(sa.update(SERVICES).values(image_id=new_image, serving_image_id=old_image, serving_cpu=0.5))
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(sa.delete(IMAGES).where(IMAGES.c.id == old_image))
    with engine.begin() as connection:
        connection.execute(sa.update(SERVICES).values(serving_image_id=None, serving_cpu=None))  # the new one serves
        connection.execute(sa.delete(IMAGES).where(IMAGES.c.id == old_image))

    _to(engine, "0015", down=True)
    _to(engine, "head")
    with engine.begin() as connection:
        assert connection.execute(sa.select(SERVICES.c.image_id, SERVICES.c.last_generation)).one() == (new_image, 3)
