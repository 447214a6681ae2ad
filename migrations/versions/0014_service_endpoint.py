"""service endpoint: where a kubernetes service is reached, as its cluster reports it

A kubernetes target's traffic does not pass the scoring gateway (it cannot reach a tenant's
cluster): the reconciler writes the Service's cluster address here, and the API shows it as
the scoring URI. The gateway never reads it.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("services") as batch:
        batch.add_column(sa.Column("endpoint", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("services") as batch:
        batch.drop_column("endpoint")
