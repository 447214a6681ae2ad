"""Results of POSTs sent with an Idempotency-Key, so a retry replays the first answer."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.orm.base import Base, CreatedAt, UuidPrimaryKey


class IdempotencyRecord(UuidPrimaryKey, CreatedAt, Base):
    __tablename__ = "idempotency_records"
    # created_at: the workers' pass deletes rows past the TTL, oldest first.
    __table_args__ = (UniqueConstraint("owner", "key"), Index("ix_idempotency_records_created_at", "created_at"))

    owner: Mapped[str] = mapped_column(String(512))  # the caller: a keyed digest of issuer and subject
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))  # method, path and body: a keyed digest
    status_code: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any]] = mapped_column(JSON)
