"""A tenant's kubeconfig as the worker checks it before connecting: the service's one policy
(app/deployments/kubeconfig.py, which the API applies too when the target is attached) plus
what only the worker can judge, where each server's address leads.

Each server goes through the fetcher's address rules (private, loopback and link-local
addresses only when ``MMS_FETCH_ALLOW_HOSTS`` names the host, or ``MMS_COMPUTE_ALLOW_HOSTS``
for this compute), its name resolved at this
moment: the API does not judge addresses, since a name may resolve elsewhere by the time the
worker connects. Only the current context's server is connected to, so only its name is
resolved: a kubeconfig may name thousands of other clusters, each under a zone that takes a
resolver's whole timeout to answer (or never resolves), and a pass would wait for all of them.
The others are judged by their address when they are written as one.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from app.config import Settings
from app.deployments import kubeconfig as tenant_kubeconfig
from app.deployments.kubeconfig import CheckedKubeconfig, KubeconfigRefused
from workers.fetch_policy import fetch_policy_for_compute
from workers.fetcher import FetchError, FetchPolicy, Resolver, check_url

__all__ = ["CheckedKubeconfig", "KubeconfigPolicy", "KubeconfigRefused", "check_kubeconfig", "kubeconfig_policy"]


@dataclass(frozen=True)
class KubeconfigPolicy:
    """What an operator allows beyond the defaults (the settings, through ``kubeconfig_policy``)."""

    fetch: FetchPolicy = field(default_factory=FetchPolicy)  # allow_hosts: private servers allowed
    allow_insecure_tls: bool = False
    # MMS_SERVICE_SUBNET_POOL: no server there, allowed or not (other services' replicas answer).
    service_pool: str | None = None


def kubeconfig_policy(settings: Settings, *, compute_path: str | None) -> KubeconfigPolicy:
    """The policy for the cluster of the compute at ``compute_path``: the private servers allowed
    are the installation's and those MMS_COMPUTE_ALLOW_HOSTS allows for that compute alone."""
    return KubeconfigPolicy(
        fetch=fetch_policy_for_compute(settings, compute_path),
        allow_insecure_tls=settings.kubernetes_allow_insecure_tls,
        service_pool=settings.service_subnet_pool,
    )


def check_kubeconfig(
    text: str | bytes,
    policy: KubeconfigPolicy = KubeconfigPolicy(),
    *,
    resolver: Resolver = socket.getaddrinfo,
) -> CheckedKubeconfig:
    """The service's kubeconfig policy, each server's address judged by the fetch policy too.

    ``resolver`` resolves each server's name once, as the fetcher does; the connection made
    later must be pinned to the address checked then (or checked again), not resolved anew.
    """

    servers: list[tuple[str, str]] = []
    checked = tenant_kubeconfig.check_kubeconfig(
        text, allow_insecure_tls=policy.allow_insecure_tls, check_server=lambda url, where: servers.append((url, where))
    )
    for url, where in servers:
        if url != checked.server and not _is_address(url):
            continue  # never connected to: its name is not resolved
        try:
            check_url(url, policy=policy.fetch, resolver=resolver)
        except FetchError as exc:  # its message holds the URL redacted, never a credential
            raise KubeconfigRefused(where, str(exc)) from None
    return checked


def _is_address(url: str) -> bool:
    """Whether ``url``'s host is written as an address (judged without resolving anything)."""
    try:
        host = urlsplit(url).hostname or ""
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True
