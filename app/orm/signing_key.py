"""The RSA keys the service signs its own tokens with, sealed at rest."""

from __future__ import annotations

from sqlalchemy import String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.orm.base import Base, CreatedAt


class SigningKey(CreatedAt, Base):
    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    sealed_private_key: Mapped[str] = mapped_column(Text)
    public_jwk: Mapped[str] = mapped_column(Text)
