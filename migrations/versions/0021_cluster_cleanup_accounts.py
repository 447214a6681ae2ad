"""cluster cleanups' accounts: the per-account cap on pending rows, and fair picking by tenant

Each row of 0018 now names the account of the service it removes, and its subscription (no
foreign key: a row outlives its account's delete), so a force delete can be refused once the
account holds MMS_CLEANUPS_PER_ACCOUNT pending rows, and the deploy worker's sweep tries every
subscription's oldest due row before a second row of any one subscription.

A row from before gets its account from its service, were that still there, else from the
compute it copied its sealed credentials from (a single service's force delete leaves the
compute, and a sealed text is unique to one sealing); a row whose account went with its
computes keeps no account (counted against none); the subscription is its account's.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-04 02:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cluster_cleanups") as batch:
        batch.add_column(sa.Column("account_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("subscription_id", sa.String(length=64), nullable=True))
        batch.create_index(batch.f("ix_cluster_cleanups_account_id"), ["account_id"], unique=False)
    op.execute(
        sa.text(
            "UPDATE cluster_cleanups SET account_id = (SELECT services.account_id FROM services "
            "WHERE services.id = cluster_cleanups.service_id) WHERE account_id IS NULL"
        )
    )
    op.execute(
        sa.text(
            "UPDATE cluster_cleanups SET account_id = (SELECT computes.account_id FROM computes "
            "WHERE computes.sealed_credentials = cluster_cleanups.sealed_credentials LIMIT 1) "
            "WHERE account_id IS NULL"
        )
    )
    op.execute(
        sa.text(
            "UPDATE cluster_cleanups SET subscription_id = (SELECT lower(accounts.subscription_id) FROM accounts "
            "WHERE accounts.id = cluster_cleanups.account_id) WHERE subscription_id IS NULL"
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("cluster_cleanups") as batch:
        batch.drop_index(batch.f("ix_cluster_cleanups_account_id"))
        batch.drop_column("subscription_id")
        batch.drop_column("account_id")
