"""image state check

An image's state is app.builds.CreationState, stored as its value; the database now refuses
any other (ImageEvent.state, which also says Deleted, is left as it is).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 10:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The states as they stand in this revision (a migration never imports the app's enum).
STATES = ("NotStarted", "Running", "Succeeded", "Failed", "Cancelled")


# SQLite rebuilds the table; its foreign keys' tables need not be read (accounts has an
# expression index SQLite's reflection warns about).
REFLECT = {"resolve_fks": False}


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None, reflect_kwargs=REFLECT) as batch_op:
        batch_op.create_check_constraint(
            op.f("ck_images_state"), "state IN (" + ", ".join(f"'{state}'" for state in STATES) + ")"
        )


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None, reflect_kwargs=REFLECT) as batch_op:
        batch_op.drop_constraint(op.f("ck_images_state"), type_="check")
