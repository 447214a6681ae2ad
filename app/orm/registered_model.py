"""The model registry: a name per account (with its version counter) and its versions."""

from __future__ import annotations

import uuid

from sqlalchemy import Boolean, ForeignKey, Integer, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.orm.base import Base, CreatedAt, UuidPrimaryKey, VersionCounter


class RegisteredModel(VersionCounter, Base):
    """A model name in an account, with its version counter."""

    __tablename__ = "registered_models"


class ModelVersion(UuidPrimaryKey, CreatedAt, Base):
    """One registration of a model: what the API calls a model, with its own id."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("account_id", "name", "version"),)

    account_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    registered_model_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("registered_models.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    mime_type: Mapped[str] = mapped_column(String(255))
    unpack: Mapped[bool] = mapped_column(Boolean, default=False)
    sha256: Mapped[str | None] = mapped_column(String(64))
    created_by: Mapped[str | None] = mapped_column(String(255))

    tag_rows: Mapped[list[ModelTag]] = relationship(
        order_by="ModelTag.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
    )

    @property
    def tags(self) -> list[str]:
        return [row.tag for row in self.tag_rows]


class ModelTag(Base):
    """A tag of a model version, in its own table so that listing by tag is an indexed query."""

    __tablename__ = "model_tags"

    model_version_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    tag: Mapped[str] = mapped_column(String(30), index=True)
