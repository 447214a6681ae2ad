"""Webhooks: URLs an account registered to receive its images' and web services' state changes,
and the delivery of each event to each of them (the outbox the workers send from)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.orm.base import Base, CreatedAt, UtcDateTime, UuidPrimaryKey
from app.orm.event import EventId


class Webhook(UuidPrimaryKey, CreatedAt, Base):
    __tablename__ = "webhooks"

    account_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str | None] = mapped_column(String(256))
    sealed_secret: Mapped[str] = mapped_column(Text)  # the HMAC key, sealed like every stored secret
    # The secret before the last rotation, still signing deliveries until it expires.
    sealed_previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # The event types it receives (app.event_log.EventType values); None: every type, new ones too.
    event_types: Mapped[list[str] | None] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(String(255))


class DeliveryState(enum.StrEnum):
    """Pending (waiting for its next attempt) → Delivered | Failed (gave up)."""

    PENDING = "Pending"
    DELIVERED = "Delivered"
    FAILED = "Failed"


class WebhookDelivery(UuidPrimaryKey, CreatedAt, Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)

    webhook_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[int] = mapped_column(EventId, ForeignKey("events.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When the next attempt is due; a worker sending it moves this past its timeout first,
    # so no other worker takes it meanwhile, and a worker that dies leaves it to be retried.
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)  # the receiver's HTTP status
    last_error: Mapped[str | None] = mapped_column(String(512))
    last_duration_ms: Mapped[int | None] = mapped_column(Integer)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
