"""Prebuilt inference base images: recorded when published, listed newest first, the default FROM."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.orm import BaseImage
from app.orm.base import utcnow
from app.registry_address import registry_endpoint

BASE_REPOSITORY = "mms/inference-base"
IMPORTED = "imported"  # the variant recorded for `mms base-image import`: never a default FROM
# Why a manifest with enableGpu and no baseImage cannot be built (the API and the worker say it).
NO_GPU_BASE = (
    "no GPU base image is published: publish one with `mms base-image publish --variant gpu` or name a GPU baseImage"
)


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
    entries = [BaseImageEntry(_listed_name(r), r.reference, r.python_version, r.variant, r.published_at) for r in rows]
    # Named though not published: `mms base-image publish --variant spark` (or gpu) makes them.
    for variant in ("spark", "gpu"):
        if not any(e.variant == variant for e in entries):
            entries.append(BaseImageEntry(f"{BASE_REPOSITORY}-{variant}", None, "3.11", variant, None))
    return entries


def _listed_name(row: BaseImage) -> str:
    if row.variant == IMPORTED:  # `mms base-image import`: its own name, mms/imported/<name>
        return row.reference.rpartition(":")[0].partition("/")[2]
    return f"{BASE_REPOSITORY}-{row.variant}"


def default_base_image(session: Session, *, variant: str = "cpu") -> str | None:
    """The newest published base image of ``variant``: the FROM of manifests that name none
    (``spark`` for the SparkPython runtime, ``gpu`` with enableGpu, ``cpu`` for the others)."""
    return session.scalars(
        select(BaseImage.reference).where(BaseImage.variant == variant).order_by(BaseImage.published_at.desc()).limit(1)
    ).first()


def foreign_base_image(reference: str, *, registry: str, account_id: object) -> str | None:
    """Why ``reference`` may not be a build's base, or None.

    On the service's own registry (``registry``: ``host[:port][/prefix]``) a build may start
    from the published bases (``mms/``) and its own account's images only: the registry
    holds every account's images, and an open one (or the engine's cache) would hand any of
    them to whoever names them.
    """
    first, sep, rest = reference.partition("/")
    # As the engine reads a reference: a first part with a dot, a colon or "localhost"
    # (in any case) names a registry.
    if not sep or not ("." in first or ":" in first or first.lower() == "localhost"):
        return None
    host, _, prefix = registry.rstrip("/").partition("/")
    if registry_endpoint(first) != registry_endpoint(host):  # ":443", "05000", a trailing dot
        return None
    path = rest.split("@", 1)[0]
    path = path.rsplit(":", 1)[0] if ":" in path.rsplit("/", 1)[-1] else path
    own = [f"{prefix}/{p}" if prefix else p for p in ("mms/", f"{account_id}/")]
    if any(path.startswith(p) for p in own):
        return None
    return (
        f"{reference.split('@', 1)[0]} is in this service's registry but is neither a "
        "published base image (mms/) nor one of this account's images"
    )
