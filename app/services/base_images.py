"""Prebuilt inference base images: recorded when published, listed newest first, the default FROM."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.orm import BaseImage
from app.orm.base import utcnow

BASE_REPOSITORY = "mms/inference-base"


@dataclass(frozen=True)
class BaseImageEntry:
    name: str
    reference: str | None
    python_version: str
    variant: str
    published_at: datetime | None

    @property
    def available(self) -> bool:
        return self.reference is not None


def record_base_image(session: Session, *, reference: str, python_version: str, variant: str = "cpu") -> BaseImage:
    """Remember a pushed base image (publishing the same tag again refreshes its date)."""
    row = session.scalars(select(BaseImage).where(BaseImage.reference == reference)).first()
    if row is None:
        row = BaseImage(reference=reference, python_version=python_version, variant=variant)
        session.add(row)
    row.published_at = utcnow()
    session.flush()
    return row


def list_base_images(session: Session) -> list[BaseImageEntry]:
    """Published base images, newest first, then the variants not built here (listed by name)."""
    rows = session.scalars(select(BaseImage).order_by(BaseImage.published_at.desc(), BaseImage.reference))
    entries = [
        BaseImageEntry(f"{BASE_REPOSITORY}-{r.variant}", r.reference, r.python_version, r.variant, r.published_at)
        for r in rows
    ]
    if not any(e.variant == "gpu" for e in entries):
        # The GPU variant needs CUDA, which this project does not build yet: named, not offered.
        entries.append(BaseImageEntry(f"{BASE_REPOSITORY}-gpu", None, "3.11", "gpu", None))
    return entries


def default_base_image(session: Session) -> str | None:
    """The newest published CPU base image, the FROM of manifests that name none."""
    return session.scalars(
        select(BaseImage.reference).where(BaseImage.variant == "cpu").order_by(BaseImage.published_at.desc()).limit(1)
    ).first()
