"""service replicas: where the scoring gateway reaches a service

``service_replicas`` (docs/design/web-services.md §3): one row a replica of a service's
generation, written only by the reconciler (what it saw in the orchestrator: the address
and whether ``GET /`` answers), read by the scoring gateway. Gone with the service.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 17:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "service_replicas",
        sa.Column("service_id", sa.Uuid(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("replica_id", sa.String(length=128), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("ready", sa.Boolean(), nullable=False),
        sa.Column("observed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["service_id"], ["services.id"], name=op.f("fk_service_replicas_service_id_services"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("service_id", "generation", "replica_id", name=op.f("pk_service_replicas")),
    )


def downgrade() -> None:
    op.drop_table("service_replicas")
