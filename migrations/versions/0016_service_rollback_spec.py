"""service roll back: what the serving generation runs, and the last generation given

An update that starts a new generation while the spec is what serves keeps that spec
(``serving_image_id``, ``serving_cpu``, ``serving_memory_gb``) until the new generation takes
traffic, so a roll back restores it whatever the orchestrator still shows; an image kept there
cannot be deleted (the foreign key, as ``image_id``'s). ``last_generation`` is the highest
generation ever given (every existing row: its ``generation``): a new one is always above it,
so a failed generation's number is never given again.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


# Plain ALTERs, as 0015's (batch mode would copy the table, reflecting its neighbours). SQLite
# adds a column's foreign key only inline (ADD COLUMN ... REFERENCES), and drops such a column
# in place; PostgreSQL adds the constraint by its conventional name.
def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.add_column(
        "services",
        sa.Column(
            "serving_image_id",
            sa.Uuid(),
            sa.ForeignKey("images.id", name="fk_services_serving_image_id_images"),
            nullable=True,
        ),
        inline_references=sqlite,
    )
    op.create_index("ix_services_serving_image_id", "services", ["serving_image_id"], unique=False)
    op.add_column("services", sa.Column("serving_cpu", sa.Float(), nullable=True))
    op.add_column("services", sa.Column("serving_memory_gb", sa.Float(), nullable=True))
    op.add_column("services", sa.Column("last_generation", sa.Integer(), server_default="1", nullable=False))
    op.execute("UPDATE services SET last_generation = generation")


def downgrade() -> None:
    op.drop_column("services", "last_generation")
    op.drop_column("services", "serving_memory_gb")
    op.drop_column("services", "serving_cpu")
    op.drop_index("ix_services_serving_image_id", table_name="services")
    op.drop_column("services", "serving_image_id")
