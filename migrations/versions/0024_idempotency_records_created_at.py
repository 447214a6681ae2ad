"""idempotency_records.created_at indexed: the workers' periodic pass deletes rows past the TTL

The client now sends an Idempotency-Key with every create, each key new, so an expired row is
no longer deleted by the same key coming back: the workers' pass (workers.tasks.reap_builds)
deletes them, oldest first, in batches, and needs the index to find them.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-05 17:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_idempotency_records_created_at", "idempotency_records", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_idempotency_records_created_at", table_name="idempotency_records")
