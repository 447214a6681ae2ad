"""services.compute_attached: whether a service's target is a compute the account attached

Built-in or attached was decided from the target's name and the workers' settings: an account's
swarm attached as ``swarm`` while the operator had none became the operator's swarm once one
was set. Now it is decided once, when the service is made, and stored.

A row from before is attached on kubernetes (there is no built-in one), and on a swarm named
other than ``swarm`` (the built-in one's name), or named ``swarm`` when its account holds a
swarm compute of that name (a built-in name can be attached only while the operator has no such
target); on ``local`` never.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-03 21:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


# Plain ALTERs, as 0016's (batch mode would copy the table, reflecting its neighbours).
def upgrade() -> None:
    op.add_column("services", sa.Column("compute_attached", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute(
        sa.text(
            "UPDATE services SET compute_attached = true WHERE compute_type = 'kubernetes' "
            "OR (compute_type = 'swarm' AND (compute_name <> 'swarm' OR EXISTS "
            "(SELECT 1 FROM computes WHERE computes.account_id = services.account_id "
            "AND computes.name = services.compute_name AND computes.compute_type = 'swarm')))"
        )
    )


def downgrade() -> None:
    op.drop_column("services", "compute_attached")
