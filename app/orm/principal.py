"""Who may call the service: service principals and role assignments on scopes."""

from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, Index, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.orm.base import Base, CreatedAt, UuidPrimaryKey


class ServicePrincipal(UuidPrimaryKey, CreatedAt, Base):
    """A client of the service's own token endpoint; only a hash of its secret is kept."""

    __tablename__ = "service_principals"

    client_id: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128))
    secret_hash: Mapped[str] = mapped_column(String(128))
    created_by: Mapped[str | None] = mapped_column(String(255))

    assignments: Mapped[list[RoleAssignment]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )


class RoleAssignment(UuidPrimaryKey, CreatedAt, Base):
    """A role granted to a token subject (of a given issuer) on a scope and everything below it."""

    __tablename__ = "role_assignments"
    __table_args__ = (Index("ix_role_assignments_subject", "issuer", "subject"),)

    issuer: Mapped[str] = mapped_column(String(512))
    subject: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(32))
    scope: Mapped[str] = mapped_column(String(512))  # normalised: lower case, no trailing slash
    principal_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("service_principals.id", ondelete="CASCADE")
    )
