"""Image state changes, in the order they were committed: what the event stream and the
webhooks deliver. The row id is the event id a client resumes from."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.orm.base import Base, UtcDateTime, utcnow

# SQLite numbers only INTEGER PRIMARY KEY columns itself; PostgreSQL gets a bigint identity.
EventId = BigInteger().with_variant(Integer(), "sqlite")


class ImageEvent(Base):
    __tablename__ = "image_events"
    # AUTOINCREMENT: SQLite never hands out an id again, so a resumed stream cannot skip one.
    __table_args__ = (
        Index("ix_image_events_account_id_id", "account_id", "id"),
        Index("ix_image_events_image_id_id", "image_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    # Not foreign keys: an event outlives the image and the account it tells of (the deletion
    # is itself an event), until the retention period ends.
    account_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    image_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    state: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)  # the JSON the stream and the webhooks send
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
