"""Files uploaded to the service's asset store: scoring scripts, environments, model archives."""

from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, ForeignKey, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.orm.base import Base, CreatedAt, UuidPrimaryKey


class Asset(UuidPrimaryKey, CreatedAt, Base):
    __tablename__ = "assets"

    account_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    mime_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    store: Mapped[str] = mapped_column(String(16))  # the backend that holds it
    storage_key: Mapped[str] = mapped_column(String(512))
    created_by: Mapped[str | None] = mapped_column(String(255))
