"""image builds

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 09:40:34.519580
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "image_names",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_image_names_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image_names")),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_image_names_account_id_name")),
    )
    op.create_table(
        "images",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("manifest_id", sa.Uuid(), nullable=False),
        sa.Column("operation_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(length=512), nullable=True),
        sa.Column("image_type", sa.String(length=16), nullable=False),
        sa.Column("compute_resource_id", sa.String(length=1024), nullable=True),
        sa.Column("builder", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("image_location", sa.String(length=1024), nullable=True),
        sa.Column("digest", sa.String(length=128), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_images_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["manifest_id"], ["manifests.id"], name=op.f("fk_images_manifest_id_manifests"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("account_id", "name", "version", name=op.f("uq_images_account_id_name_version")),
        sa.UniqueConstraint("operation_id", name=op.f("uq_images_operation_id")),
    )
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_images_account_id"), ["account_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_images_manifest_id"), ["manifest_id"], unique=False)
        batch_op.create_index("ix_images_state", ["state"], unique=False)

    op.create_table(
        "build_log_chunks",
        sa.Column("image_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_build_log_chunks_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("image_id", "seq", name=op.f("pk_build_log_chunks")),
    )


def downgrade() -> None:
    op.drop_table("build_log_chunks")
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index("ix_images_state")
        batch_op.drop_index(batch_op.f("ix_images_manifest_id"))
        batch_op.drop_index(batch_op.f("ix_images_account_id"))

    op.drop_table("images")
    op.drop_table("image_names")
