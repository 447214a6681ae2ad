"""swarm cleanups: a deleted account's services on a swarm it attached, removed as its kubernetes ones

The rows of 0018 also stand for a service on a tenant's swarm: ``compute_type`` says which
target a row is for (the rows before are all kubernetes), ``docker_host`` is the swarm
manager's address as the compute had it (the sealed credentials are then its TLS material);
``namespace`` is a kubernetes target's, empty for a swarm.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-03 18:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cluster_cleanups") as batch:
        batch.add_column(sa.Column("compute_type", sa.String(length=20), nullable=False, server_default="kubernetes"))
        batch.add_column(sa.Column("docker_host", sa.String(length=512), nullable=True))


def downgrade() -> None:
    # The code before knows only kubernetes rows: a swarm's would be tried as one and fail.
    op.execute(sa.text("DELETE FROM cluster_cleanups WHERE compute_type <> 'kubernetes'"))
    with op.batch_alter_table("cluster_cleanups") as batch:
        batch.drop_column("docker_host")
        batch.drop_column("compute_type")
