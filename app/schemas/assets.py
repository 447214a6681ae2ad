"""Response bodies of uploaded assets."""

from __future__ import annotations

from datetime import datetime

from app.schemas.common import ApiModel


class AssetRead(ApiModel):
    id: str
    name: str
    mimeType: str
    size: int
    sha256: str
    url: str  # a read URL (SAS) valid until urlExpiresAt; register models and manifests with it
    urlExpiresAt: datetime
    createdAt: datetime
