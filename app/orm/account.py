"""A Model Management account: the container of models, manifests and images."""

from __future__ import annotations

from sqlalchemy import Index, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.orm.base import Base, CreatedAt, UuidPrimaryKey


class Account(UuidPrimaryKey, CreatedAt, Base):
    __tablename__ = "accounts"

    subscription_id: Mapped[str] = mapped_column(String(64))
    resource_group: Mapped[str] = mapped_column(String(90))
    name: Mapped[str] = mapped_column(String(64))
    location: Mapped[str] = mapped_column(String(64))
    sku_name: Mapped[str] = mapped_column(String(16))
    sku_capacity: Mapped[int] = mapped_column(Integer)

    # ARM names are case-insensitive: one account per lower-cased path.
    __table_args__ = (
        Index(
            "uq_accounts_path",
            func.lower(subscription_id),
            func.lower(resource_group),
            func.lower(name),
            unique=True,
        ),
    )

    @property
    def scope(self) -> str:
        """The account's ARM-style path, which is also its authorisation scope."""
        return f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/accounts/{self.name}"
