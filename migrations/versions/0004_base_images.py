"""base images

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 09:57:53.335720
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "base_images",
        sa.Column("reference", sa.String(length=512), nullable=False),
        sa.Column("python_version", sa.String(length=16), nullable=False),
        sa.Column("variant", sa.String(length=16), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_images")),
        sa.UniqueConstraint("reference", name=op.f("uq_base_images_reference")),
    )
    with op.batch_alter_table("base_images", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_base_images_published_at"), ["published_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("base_images", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_base_images_published_at"))

    op.drop_table("base_images")
