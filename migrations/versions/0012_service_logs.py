"""service logs: what a service's replicas printed, copied by the reconciler

The API holds no engine socket, so ``GET .../services/{id}/logs`` reads lines the
reconciler copied (docs/design/web-services.md §3, "Logs"); a failed generation's lines
stay after its replicas are gone. Gone with the service.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 02:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "service_logs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("service_id", sa.Uuid(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("replica_id", sa.String(length=128), nullable=False),
        sa.Column("logged_ns", sa.BigInteger(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["service_id"], ["services.id"], name=op.f("fk_service_logs_service_id_services"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_logs")),
    )
    with op.batch_alter_table("service_logs") as batch:
        batch.create_index(batch.f("ix_service_logs_service_id"), ["service_id"], unique=False)


def downgrade() -> None:
    op.drop_table("service_logs")
