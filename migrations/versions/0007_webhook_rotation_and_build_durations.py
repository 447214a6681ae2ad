"""webhook secret rotation and build durations

A webhook keeps its previous secret (sealed) until the rotation's overlap ends; finished
builds' durations are counted in build_duration_buckets as they end, no longer rebuilt from
the images that are left. The table starts from the finished images there are now, so the
histogram carries on from the figures it showed.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 09:54:38.570807
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The bounds as they stand in this revision (a migration never imports the app's constants).
BOUNDS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
FINAL = ("Succeeded", "Failed", "Cancelled")


def upgrade() -> None:
    op.create_table(
        "build_duration_buckets",
        sa.Column("builder", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("le", sa.String(length=16), nullable=False),
        sa.Column("builds", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("builder", "state", "le", name=op.f("pk_build_duration_buckets")),
    )
    _count_finished_builds()
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sealed_previous_secret", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.drop_column("previous_secret_expires_at")
        batch_op.drop_column("sealed_previous_secret")
    op.drop_table("build_duration_buckets")


def _count_finished_builds() -> None:
    images = sa.table(
        "images",
        sa.column("builder", sa.String),
        sa.column("state", sa.String),
        sa.column("started_at", sa.DateTime(timezone=True)),
        sa.column("ended_at", sa.DateTime(timezone=True)),
    )
    totals: dict[tuple[str, str, str], list[float]] = {}
    rows = op.get_bind().execute(
        sa.select(images.c.builder, images.c.state, images.c.started_at, images.c.ended_at).where(
            images.c.started_at.is_not(None), images.c.ended_at.is_not(None), images.c.state.in_(FINAL)
        )
    )
    for builder, state, started, ended in rows:
        if (started.tzinfo is None) != (ended.tzinfo is None):  # SQLite drops the zone
            started, ended = started.replace(tzinfo=None), ended.replace(tzinfo=None)
        seconds = max((ended - started).total_seconds(), 0.0)
        for le in [str(bound) for bound in BOUNDS if seconds <= bound] + ["+Inf"]:
            total = totals.setdefault((builder, state, le), [0, 0.0])
            total[0] += 1
            total[1] += seconds
    if totals:
        op.bulk_insert(
            sa.table(
                "build_duration_buckets",
                sa.column("builder", sa.String),
                sa.column("state", sa.String),
                sa.column("le", sa.String),
                sa.column("builds", sa.BigInteger),
                sa.column("seconds", sa.Float),
            ),
            [
                {"builder": b, "state": s, "le": le, "builds": int(n), "seconds": total}
                for (b, s, le), (n, total) in totals.items()
            ],
        )
