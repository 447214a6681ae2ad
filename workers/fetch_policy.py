"""The fetcher's policy as the service's settings define it."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit

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


# Said where a compute's private host is refused: an operator allows a tenant's own host for
# that compute alone, not for everyone as MMS_FETCH_ALLOW_HOSTS (the fetcher's hint) would.
FOR_THIS_COMPUTE = "; a tenant's own private host is allowed for its compute alone with MMS_COMPUTE_ALLOW_HOSTS"


def fetch_policy_for_compute(settings: Settings, compute_path: str | None) -> FetchPolicy:
    """The fetch policy for reaching an attached compute (its swarm's manager and nodes, its
    cluster's server): the installation's, and the hosts MMS_COMPUTE_ALLOW_HOSTS allows for
    that compute alone (``compute_path``; None: none)."""
    policy = fetch_policy(settings)
    return replace(policy, allow_hosts=policy.allow_hosts | settings.compute_allow_hosts_for(compute_path))


def allowing_registry(policy: FetchPolicy, registry: str) -> FetchPolicy:
    """``policy`` that also lets a build read from ``registry`` (``host[:port][/prefix]``).

    A builder's own registry (MMS_REGISTRY, or the service's own address in the embedded
    default) is where the service's base images live, so it needs no allow-listing. Only
    its port is allowed: another port of the same host is another service.
    """
    parts = urlsplit(f"//{registry.partition('/')[0]}")
    host = parts.hostname or ""
    name = f"[{host}]" if ":" in host else host
    # No port given: the registry client uses https (443), or plain http (80) on loopback.
    ports = [parts.port] if parts.port else [443, 80]
    return replace(policy, allow_hosts=policy.allow_hosts | {f"{name}:{p}" for p in ports})
