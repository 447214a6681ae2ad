"""installation: where its id was made (the database's identity), to tell a copy from the original

A copy of the database carries the installation id, and with it the right to sweep the
engine objects labelled with it (app.deployments.installation). The identity of the database
the id lives in is recorded with it (here, and by the deploy worker when a row has none), which
refuses to deploy or sweep from a database whose identity is another until the operator runs
``mms admin installation --new-id`` or ``--adopt``.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03 11:00:00.000000
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("installation", sa.Column("database_identity", sa.String(length=200), nullable=True))
    op.execute(sa.text("UPDATE installation SET database_identity = :identity").bindparams(identity=_identity()))


def _identity() -> str:
    # app.deployments.installation.database_identity as of this revision (a migration keeps its own).
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        row = bind.execute(
            sa.text(
                "SELECT (SELECT system_identifier FROM pg_control_system()), "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        ).one()
        return f"postgresql:{row[0]}:{row[1]}"
    files = [r[2] for r in bind.execute(sa.text("PRAGMA database_list")) if r[1] == "main"]
    if not files or not files[0]:
        return "sqlite:memory"
    stat = os.stat(files[0])
    return f"sqlite:{stat.st_dev}:{stat.st_ino}"


def downgrade() -> None:
    op.drop_column("installation", "database_identity")
