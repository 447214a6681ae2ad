"""Checks on a caller's Azure blob SAS URL: a bad one is a 400 now, not a failed fetch later.

Messages name the faulty parameter but never a query value: the signature is a credential
and the expiry must not reach logs either.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

__all__ = ["check_azure_sas_url"]

AZURE_BLOB_HOST_SUFFIX = ".blob.core.windows.net"
START_SKEW = timedelta(minutes=5)
SAS_PARAMS = ("sig", "sv", "se", "sp", "st", "sr")
# The UTC ISO 8601 forms Azure accepts: a date, or a date and time (minutes, seconds,
# up to 7 fraction digits) with Z or an offset.
_SAS_TIME = re.compile(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,7})?)?(Z|[+-]\d{2}:\d{2})?)?")


def _parse_sas_time(value: str) -> datetime | None:
    if not _SAS_TIME.fullmatch(value):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:  # e.g. month 13
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _is_azure_sas(host: str, params: dict[str, list[str]]) -> bool:
    if host.endswith(AZURE_BLOB_HOST_SUFFIX):
        # A blob URL with no SAS parameters at all is a public blob: nothing to check.
        return any(name in params for name in SAS_PARAMS)
    # Azurite and other emulators keep the account in the path, so look at the query.
    return "sig" in params and ("sv" in params or "se" in params)


def check_azure_sas_url(url: str, *, now: datetime, require_https: bool) -> None:
    """Raise ValueError saying what is wrong when ``url`` is an Azure blob SAS we cannot read."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return  # not a URL this check can judge; the URL validation says so
    params = parse_qs(parts.query, keep_blank_values=True)
    if not _is_azure_sas(host, params):
        return
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    first = {name: values[0] for name, values in params.items()}

    if require_https and parts.scheme.lower() != "https":
        raise ValueError("url: a SAS URL must use https")
    if not first.get("sig"):
        raise ValueError("url: the SAS token has no signature (sig)")
    # With a stored access policy (si) the permissions and expiry may live in the policy.
    from_policy = bool(first.get("si"))
    permissions = first.get("sp")
    if permissions is None and not from_policy:
        raise ValueError("url: the SAS token grants no permissions (sp is missing)")
    if permissions is not None and "r" not in permissions:
        raise ValueError("url: the SAS token does not grant read access (sp must include r)")

    expiry = first.get("se")
    if expiry is None and not from_policy:
        raise ValueError("url: the SAS token has no expiry (se is missing)")
    if expiry is not None:
        expires_at = _parse_sas_time(expiry)
        if expires_at is None:
            raise ValueError("url: the SAS token's expiry (se) is not an ISO 8601 UTC time")
        if expires_at <= now:
            raise ValueError("url: the SAS token has expired")

    start = first.get("st")
    if start is not None:
        starts_at = _parse_sas_time(start)
        if starts_at is None:
            raise ValueError("url: the SAS token's start (st) is not an ISO 8601 UTC time")
        if starts_at > now + START_SKEW:
            raise ValueError("url: the SAS token is not valid yet (its start is in the future)")
