"""State changes of an account's images and web services, in the order they were committed:
what the event streams and the webhooks deliver. The row id is the position a client resumes
from: one sequence for every kind, so one Last-Event-ID resumes any stream. It is one sequence
for every account too, so clients see it only as a token (``app.services.event_ids``)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.orm.base import Base, UtcDateTime, utcnow

# SQLite numbers only INTEGER PRIMARY KEY columns itself; PostgreSQL gets a bigint identity.
EventId = BigInteger().with_variant(Integer(), "sqlite")


class SubjectKind(enum.StrEnum):
    """What an event tells of; also the name of its Server-Sent Event (``event: image``)."""

    IMAGE = "image"
    SERVICE = "service"


class Event(Base):
    __tablename__ = "events"
    # AUTOINCREMENT: SQLite never hands out an id again, so a resumed stream cannot skip one.
    __table_args__ = (
        Index("ix_events_account_id_id", "account_id", "id"),
        Index("ix_events_subject_id_id", "subject_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    # Not foreign keys: an event outlives the image or service and the account it tells of
    # (the deletion is itself an event), until the retention period ends.
    account_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    subject_kind: Mapped[str] = mapped_column(String(16))  # a SubjectKind
    subject_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    state: Mapped[str] = mapped_column(Text)  # the state it moved to, or Deleted
    payload: Mapped[str] = mapped_column(Text)  # the JSON the streams and the webhooks send
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
