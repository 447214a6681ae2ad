"""what an image's smoke test found

Whether a built image was started once before it was called Succeeded (Passed), failed the
build (Failed), or could not be run because no engine was reachable (Skipped), and why.
Images built before this revision show none.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 13:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("smoke_test", sa.String(length=16), nullable=True))
    op.add_column("images", sa.Column("smoke_test_reason", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("smoke_test_reason")
        batch_op.drop_column("smoke_test")
