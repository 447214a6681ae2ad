"""The migration history builds exactly the schema the ORM models describe."""

from __future__ import annotations

import warnings

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from app.context import ServiceContext
from app.orm import Base


def test_migrations_match_the_models(service_context: ServiceContext) -> None:
    with service_context.engine.connect() as connection, warnings.catch_warnings():
        # SQLite cannot reflect the expression index on accounts; PostgreSQL compares it.
        warnings.simplefilter("ignore")
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == [], "write a migration: alembic revision --autogenerate (see CONTRIBUTING.md)"
