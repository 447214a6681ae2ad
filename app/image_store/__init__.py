"""The service's own image store: an OCI image layout under the data folder.

In the embedded default (no MMS_REGISTRY) the workers' builder writes images into it and the
API serves it read-only at ``/v2/`` (``app.api.routes.distribution``). Both import this
package; it knows nothing of HTTP, tokens or the database.

    oci_layout   the layout on disk (``OciLayout``) and the name, tag and digest rules
    naming       which repository an image is pushed to, and which account owns one
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from app.config import Settings
from app.image_store.oci_layout import OciLayout

__all__ = ["embedded_layout", "image_layout"]


def image_layout(settings: Settings) -> OciLayout:
    """The layout under ``<data dir>/images`` (nothing is created until something is written)."""
    return _layout_at(settings.image_store_dir.absolute())


def embedded_layout(settings: Settings) -> OciLayout | None:
    """The embedded store, or None when images live in a registry (MMS_REGISTRY)."""
    return image_layout(settings) if settings.is_embedded_registry else None


@lru_cache(maxsize=16)
def _layout_at(root: Path) -> OciLayout:
    return OciLayout(root)  # one per root, so its index cache is shared by every request
