"""events for services: image_events becomes events, and webhooks choose event types

The event log tells of web services as well as images (docs/design/web-services.md §3):
``image_events`` is renamed ``events``, ``image_id`` becomes ``subject_id`` beside a new
``subject_kind`` (every existing row: ``image``). The rows and their ids stay, and so does the
id sequence (PostgreSQL's serial sequence, SQLite's AUTOINCREMENT counter, which a rename
carries): a client resumes with a Last-Event-ID it had before. ``webhooks.event_types`` (JSON,
null: every type) is the webhook's ``eventTypes``.

Plain ALTERs on both databases, never a copy of the table: a copy would restart SQLite's
counter at the highest id left, and a pruned table could hand an id out again. On SQLite the
primary key keeps its old constraint name inside the table's definition (SQLite never uses it).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    op.drop_index("ix_image_events_account_id_id", table_name="image_events")
    op.drop_index("ix_image_events_created_at", table_name="image_events")
    op.drop_index("ix_image_events_image_id_id", table_name="image_events")
    # Both databases rewrite the foreign key of webhook_deliveries to the new name.
    op.rename_table("image_events", "events")
    op.execute("ALTER TABLE events RENAME COLUMN image_id TO subject_id")
    op.add_column("events", sa.Column("subject_kind", sa.String(length=16), nullable=False, server_default="image"))
    if _postgresql():
        # Every writer names the kind; only the rows of before needed the default.
        op.execute("ALTER TABLE events ALTER COLUMN subject_kind DROP DEFAULT")
        op.execute("ALTER TABLE events RENAME CONSTRAINT pk_image_events TO pk_events")
        op.execute("ALTER SEQUENCE image_events_id_seq RENAME TO events_id_seq")
        op.execute(
            "ALTER TABLE webhook_deliveries RENAME CONSTRAINT fk_webhook_deliveries_event_id_image_events "
            "TO fk_webhook_deliveries_event_id_events"
        )
    op.create_index("ix_events_account_id_id", "events", ["account_id", "id"], unique=False)
    op.create_index("ix_events_created_at", "events", ["created_at"], unique=False)
    op.create_index("ix_events_subject_id_id", "events", ["subject_id", "id"], unique=False)
    op.add_column("webhooks", sa.Column("event_types", sa.JSON(), nullable=True))


def downgrade() -> None:
    # The image_events of before tell of images only: the other events (and their deliveries) go.
    op.execute("DELETE FROM webhook_deliveries WHERE event_id IN (SELECT id FROM events WHERE subject_kind <> 'image')")
    op.execute("DELETE FROM events WHERE subject_kind <> 'image'")
    op.drop_column("webhooks", "event_types")
    op.drop_index("ix_events_subject_id_id", table_name="events")
    op.drop_index("ix_events_created_at", table_name="events")
    op.drop_index("ix_events_account_id_id", table_name="events")
    op.drop_column("events", "subject_kind")
    op.execute("ALTER TABLE events RENAME COLUMN subject_id TO image_id")
    if _postgresql():
        op.execute(
            "ALTER TABLE webhook_deliveries RENAME CONSTRAINT fk_webhook_deliveries_event_id_events "
            "TO fk_webhook_deliveries_event_id_image_events"
        )
        op.execute("ALTER SEQUENCE events_id_seq RENAME TO image_events_id_seq")
        op.execute("ALTER TABLE events RENAME CONSTRAINT pk_events TO pk_image_events")
    op.rename_table("events", "image_events")
    op.create_index("ix_image_events_account_id_id", "image_events", ["account_id", "id"], unique=False)
    op.create_index("ix_image_events_created_at", "image_events", ["created_at"], unique=False)
    op.create_index("ix_image_events_image_id_id", "image_events", ["image_id", "id"], unique=False)
