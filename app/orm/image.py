"""Image builds: the row is the truth about a build; the queue only rings the bell."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Boolean, Enum, ForeignKey, Index, Integer, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.builds.states import SMOKE_TEST_REASON_LENGTH, CreationState
from app.orm.base import Base, CreatedAt, UtcDateTime, UuidPrimaryKey, VersionCounter
from app.orm.manifest import Manifest

# Stored as its value ("NotStarted") in a VARCHAR(16) with a CHECK (ck_images_state) on
# every database, so that a new state is a migration of a constraint, not of a type.
BuildState = Enum(
    CreationState,
    name="state",
    native_enum=False,
    create_constraint=True,
    length=16,
    validate_strings=True,
    values_callable=lambda states: [state.value for state in states],
)


class ImageName(VersionCounter, Base):
    """An image name in an account, with its version counter."""

    __tablename__ = "image_names"


class Image(UuidPrimaryKey, CreatedAt, Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("account_id", "name", "version"),
        Index("ix_images_state", "state"),
    )

    account_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    # CASCADE only so that deleting a whole account succeeds; deleting a manifest an image
    # was built from is refused by the service with a 409.
    manifest_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("manifests.id", ondelete="CASCADE"), index=True)
    manifest: Mapped[Manifest] = relationship(lazy="joined")
    operation_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(512))
    image_type: Mapped[str] = mapped_column(String(16))
    compute_resource_id: Mapped[str | None] = mapped_column(String(1024))
    builder: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str | None] = mapped_column(String(255))

    # Written only by app.builds, through its transition table.
    state: Mapped[CreationState] = mapped_column(BuildState, default=CreationState.NOT_STARTED)
    error: Mapped[str | None] = mapped_column(Text)  # one line: the failing step and why
    image_location: Mapped[str | None] = mapped_column(String(1024))
    digest: Mapped[str | None] = mapped_column(String(128))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Whether the image was started once before it was called good: Passed | Failed |
    # Skipped (no engine could run it), and why not when it did not pass.
    smoke_test: Mapped[str | None] = mapped_column(String(16))
    smoke_test_reason: Mapped[str | None] = mapped_column(String(SMOKE_TEST_REASON_LENGTH))
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    # The lease: which worker holds the build, until when, and which attempt it is. A worker
    # whose attempt is no longer current has been fenced off and must not write.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    releases: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # attempts handed back
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # last sent to the queue
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)


class BuildLogChunk(Base):
    """The build log, appended in chunks as the build runs."""

    __tablename__ = "build_log_chunks"

    image_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
