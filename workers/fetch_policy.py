"""The fetcher's policy as the service's settings define it."""

from __future__ import annotations

from app.config import Settings
from workers.fetcher import FetchPolicy


def fetch_policy(settings: Settings) -> FetchPolicy:
    """Limits, allowed private hosts and extra CAs for fetching models and assets."""
    return FetchPolicy(
        max_bytes=settings.fetch_max_bytes,
        deadline=settings.fetch_timeout_seconds,
        allow_hosts=settings.effective_fetch_allow_hosts,
        ca_bundle=str(settings.extra_ca_bundle) if settings.extra_ca_bundle else None,
    )
