"""cluster cleanups: a deleted account's kubernetes services, still to remove from their clusters

An account's delete takes its computes with it, and with them the only way to its tenants'
clusters. Each of its kubernetes services leaves a row here with a sealed copy of the target's
kubeconfig, which the deploy worker's sweep uses to delete the service's objects by label
(workers/deploy/cluster_cleanup.py), then drops; it gives up after a bounded number of tries.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cluster_cleanups",
        sa.Column("service_id", sa.Uuid(), nullable=False),
        sa.Column("namespace", sa.String(length=63), nullable=False),
        sa.Column("sealed_credentials", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cluster_cleanups")),
    )
    with op.batch_alter_table("cluster_cleanups") as batch:
        batch.create_index(batch.f("ix_cluster_cleanups_next_attempt_at"), ["next_attempt_at"], unique=False)


def downgrade() -> None:
    op.drop_table("cluster_cleanups")
