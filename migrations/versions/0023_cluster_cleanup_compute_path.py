"""cluster_cleanups.compute_path: the compute a cleanup removes from, by its path

An operator may allow a private host for one attached compute alone (MMS_COMPUTE_ALLOW_HOSTS,
keyed by the compute's path). A force delete's cleanup outlives the account and its computes,
so it keeps the path to find those hosts by. Rows from before stay None: only the
installation's allowed hosts (MMS_FETCH_ALLOW_HOSTS) apply to them, as before.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-05 12:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("cluster_cleanups", sa.Column("compute_path", sa.String(length=400), nullable=True))


def downgrade() -> None:
    op.drop_column("cluster_cleanups", "compute_path")
