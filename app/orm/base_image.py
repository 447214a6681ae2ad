"""The prebuilt inference base images the service has published to its registry."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.orm.base import Base, UtcDateTime, UuidPrimaryKey, utcnow


class BaseImage(UuidPrimaryKey, Base):
    __tablename__ = "base_images"

    reference: Mapped[str] = mapped_column(String(512), unique=True)  # registry/repo:tag
    python_version: Mapped[str] = mapped_column(String(16))
    variant: Mapped[str] = mapped_column(String(16))  # cpu | gpu | spark
    published_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
