"""service endpoint: where a kubernetes service is reached, as its cluster reports it

A kubernetes target's traffic does not pass the scoring gateway (it cannot reach a tenant's
cluster): the reconciler writes the Service's cluster address here, and the API shows it as
the scoring URI. The gateway never reads it.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


# Plain ALTERs: SQLite (3.35+) adds and drops a plain column in place; batch mode would copy the
# table, reflecting its neighbours (the accounts' expression index cannot be reflected).
def upgrade() -> None:
    op.add_column("services", sa.Column("endpoint", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("services", "endpoint")
