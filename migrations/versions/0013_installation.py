"""installation: a random id for this installation, made with its database

The reconciler labels the engine objects it makes with it, and its orphan sweep removes only
objects carrying its own: two installations whose database URLs read alike (two compose
projects, say) may share an engine without sweeping each other's web services.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 02:40:00.000000
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "installation",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_installation")),
    )
    op.bulk_insert(table, [{"id": uuid.uuid4(), "created_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table("installation")
