"""web services: compute targets, services and their operations

Issue 16's tables (docs/design/web-services.md §3): ``computes`` (the targets a tenant attaches;
``local`` is a setting, not a row), ``services`` (the desired spec, the state
app.deployments owns, the scoring keys sealed and digested) and ``service_operations`` (the
202s of create, update and delete). The reconciler's tables (replicas, logs) and the
generalised events come with the slices that need them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 16:51:56.202843
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "computes",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("compute_type", sa.String(length=16), nullable=False),
        sa.Column("properties", sa.JSON(), nullable=False),
        sa.Column("sealed_credentials", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=255), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_computes_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_computes")),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_computes_account_id_name")),
    )
    with op.batch_alter_table("computes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_computes_account_id"), ["account_id"], unique=False)

    op.create_table(
        "services",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("description", sa.String(length=512), nullable=True),
        sa.Column("compute_name", sa.String(length=32), nullable=False),
        sa.Column("compute_type", sa.String(length=16), nullable=False),
        sa.Column("image_id", sa.Uuid(), nullable=False),
        sa.Column("num_replicas", sa.Integer(), nullable=True),
        sa.Column("autoscaler", sa.JSON(), nullable=True),
        sa.Column("cpu", sa.Float(), nullable=False),
        sa.Column("memory_gb", sa.Float(), nullable=False),
        sa.Column("auth_enabled", sa.Boolean(), nullable=False),
        sa.Column("scoring_timeout_ms", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("traffic_generation", sa.Integer(), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "Transitioning",
                "Healthy",
                "Unhealthy",
                "Failed",
                "Deleting",
                name="state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("replicas_desired", sa.Integer(), nullable=False),
        sa.Column("replicas_ready", sa.Integer(), nullable=False),
        sa.Column("sealed_primary_key", sa.Text(), nullable=False),
        sa.Column("sealed_secondary_key", sa.Text(), nullable=False),
        sa.Column("primary_key_digest", sa.String(length=64), nullable=False),
        sa.Column("secondary_key_digest", sa.String(length=64), nullable=False),
        sa.Column("keys_version", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_services_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name=op.f("fk_services_image_id_images")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_services")),
        sa.UniqueConstraint("account_id", "name", name=op.f("uq_services_account_id_name")),
    )
    with op.batch_alter_table("services", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_services_account_id"), ["account_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_services_image_id"), ["image_id"], unique=False)
        batch_op.create_index("ix_services_state", ["state"], unique=False)

    op.create_table(
        "service_operations",
        sa.Column("account_id", sa.Uuid(), nullable=False),
        sa.Column("service_id", sa.Uuid(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "Running", "Succeeded", "Failed", name="state", native_enum=False, create_constraint=True, length=16
            ),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_service_operations_account_id_accounts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["service_id"], ["services.id"], name=op.f("fk_service_operations_service_id_services"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_operations")),
    )
    with op.batch_alter_table("service_operations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_service_operations_account_id"), ["account_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_service_operations_service_id"), ["service_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("service_operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_service_operations_service_id"))
        batch_op.drop_index(batch_op.f("ix_service_operations_account_id"))

    op.drop_table("service_operations")
    with op.batch_alter_table("services", schema=None) as batch_op:
        batch_op.drop_index("ix_services_state")
        batch_op.drop_index(batch_op.f("ix_services_image_id"))
        batch_op.drop_index(batch_op.f("ix_services_account_id"))

    op.drop_table("services")
    with op.batch_alter_table("computes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_computes_account_id"))

    op.drop_table("computes")
