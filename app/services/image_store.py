"""Keeping the image store tidy: the rules that need the database as well as the layout."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from app.config import Settings
from app.image_store import embedded_layout
from app.image_store.oci_layout import CollectedGarbage
from app.services.images import drop_orphan_tags

log = logging.getLogger("mms.image_store")

__all__ = ["collect_garbage"]


def collect_garbage(
    session: Session, settings: Settings, *, grace_seconds: float | None = None
) -> CollectedGarbage | None:
    """Untag images whose record is gone, then remove what no tag of the embedded store
    reaches, each only once nothing touched it for the grace period
    (MMS_IMAGE_GC_GRACE_SECONDS); None when images live in a registry."""
    layout = embedded_layout(settings)
    if layout is None:
        return None
    grace = settings.image_gc_grace_seconds if grace_seconds is None else grace_seconds
    orphans = drop_orphan_tags(session, layout, grace_seconds=grace)
    done = layout.collect_garbage(grace_seconds=grace)
    done.tags = len(orphans)
    log.info(
        "registry.garbage_collected",
        extra={
            "blobs": done.blobs,
            "bytes": done.bytes,
            "links": done.links,
            "tags": done.tags,
            "staging_files": done.staging_files,
        },
    )
    return done
