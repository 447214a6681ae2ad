"""assets and manifests

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 09:27:20.968648
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "assets",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("mime_type", sa.String(length=255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("store", sa.String(length=16), nullable=False),
        sa.Column("storage_key", sa.String(length=512), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_assets_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assets")),
    )
    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_assets_account_id"), ["account_id"], unique=False)

    op.create_table(
        "manifest_names",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_manifest_names_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_manifest_names")),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_manifest_names_account_id_name")),
    )
    op.create_table(
        "manifests",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(length=512), nullable=True),
        sa.Column("driver_program", sa.String(length=64), nullable=False),
        sa.Column("model_type", sa.String(length=32), nullable=False),
        sa.Column("runtime_type", sa.String(length=32), nullable=False),
        sa.Column("conda_env_url", sa.Text(), nullable=True),
        sa.Column("pip_requirements_url", sa.Text(), nullable=True),
        sa.Column("webservice_type", sa.String(length=32), nullable=False),
        sa.Column("base_image", sa.String(length=512), nullable=True),
        sa.Column("registry_address", sa.String(length=255), nullable=True),
        sa.Column("registry_username", sa.String(length=255), nullable=True),
        sa.Column("sealed_registry_password", sa.Text(), nullable=True),
        sa.Column("extra_dockerfile_steps", sa.Text(), nullable=True),
        sa.Column("enable_gpu", sa.Boolean(), nullable=False),
        sa.Column("source_directory", sa.String(length=512), nullable=True),
        sa.Column("created_by", sa.String(length=255), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_manifests_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_manifests")),
        sa.UniqueConstraint("account_id", "name", "version", name=op.f("uq_manifests_account_id_name_version")),
    )
    with op.batch_alter_table("manifests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_manifests_account_id"), ["account_id"], unique=False)

    op.create_table(
        "manifest_assets",
        sa.Column("manifest_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("asset_id", sa.String(length=64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("mime_type", sa.String(length=255), nullable=False),
        sa.Column("unpack", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["manifest_id"], ["manifests.id"], name=op.f("fk_manifest_assets_manifest_id_manifests"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("manifest_id", "position", name=op.f("pk_manifest_assets")),
    )
    op.create_table(
        "manifest_models",
        sa.Column("manifest_id", sa.Uuid(), nullable=False),
        sa.Column("model_version_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["manifest_id"], ["manifests.id"], name=op.f("fk_manifest_models_manifest_id_manifests"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_manifest_models_model_version_id_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("manifest_id", "model_version_id", name=op.f("pk_manifest_models")),
    )
    with op.batch_alter_table("manifest_models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_manifest_models_model_version_id"), ["model_version_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("manifest_models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_manifest_models_model_version_id"))

    op.drop_table("manifest_models")
    op.drop_table("manifest_assets")
    with op.batch_alter_table("manifests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_manifests_account_id"))

    op.drop_table("manifests")
    op.drop_table("manifest_names")
    with op.batch_alter_table("assets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_assets_account_id"))

    op.drop_table("assets")
