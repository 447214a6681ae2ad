"""service reconciler: a lease and a due time per service

The reconciler (docs/design/web-services.md §3) takes one pass over a service at a time:
``attempt`` fences a worker whose lease lapsed (as image builds do), ``lease_owner`` and
``lease_expires_at`` say who holds it, ``due_at`` when the next pass is wanted (the beat
sends every service past it), ``switched_at`` when traffic last moved to a new generation
(the old one drains until then + the gateway's cache and a scoring timeout). ``revision``
counts the tenant's changes and ``changed_at`` dates the last: a pass's verdict lands only
on the spec it read, and a new generation's start deadline counts from the change.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 02:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("lease_owner", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("due_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("switched_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_services_due_at", "services", ["due_at"])
    # Services recorded before the reconciler existed are due at once.
    op.execute(sa.text("UPDATE services SET due_at = created_at, changed_at = updated_at"))


def downgrade() -> None:
    op.drop_index("ix_services_due_at", table_name="services")
    with op.batch_alter_table("services") as batch:
        for column in ("changed_at", "revision", "switched_at", "due_at", "lease_expires_at", "lease_owner", "attempt"):
            batch.drop_column(column)
