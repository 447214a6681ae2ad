"""services.put_off_since: a service's place in line for a deploy worker's pass slot

A pass that finds no slot free (its tenant's share, or the attached targets' share, taken:
workers.deploy.pass_slots) gives its lease back. Its service now keeps since when it has waited,
so the worker whose pass frees a slot, in any process, takes the waiting service whose tenant
runs the fewest passes, the longest waiting first, instead of whichever retry came first. A
service the schedule handed out (handed_out_at) is on its way to a worker, not waiting. The
passes running are counted by their leases: lease_expires_at gets an index.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-05 09:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


# Plain ALTERs, as 0020's (batch mode would copy the table, reflecting its neighbours).
def upgrade() -> None:
    op.add_column("services", sa.Column("put_off_since", sa.DateTime(timezone=True), nullable=True))
    op.add_column("services", sa.Column("handed_out_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_services_put_off_since", "services", ["put_off_since"], unique=False)
    op.create_index("ix_services_lease_expires_at", "services", ["lease_expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_services_lease_expires_at", table_name="services")
    op.drop_index("ix_services_put_off_since", table_name="services")
    op.drop_column("services", "handed_out_at")
    op.drop_column("services", "put_off_since")
