"""A tenant's kubeconfig as the worker checks it before connecting: the service's one policy
(app/deployments/kubeconfig.py, which the API applies too when the target is attached) plus
what only the worker can judge, where each server's address leads.

Each server goes through the fetcher's address rules (private, loopback and link-local
addresses only when ``MMS_FETCH_ALLOW_HOSTS`` names the host), its name resolved at this
moment: the API does not judge addresses, since a name may resolve elsewhere by the time the
worker connects.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from app.config import Settings
from app.deployments import kubeconfig as tenant_kubeconfig
from app.deployments.kubeconfig import CheckedKubeconfig, KubeconfigRefused
from workers.fetch_policy import fetch_policy
from workers.fetcher import FetchError, FetchPolicy, Resolver, check_url

__all__ = ["CheckedKubeconfig", "KubeconfigPolicy", "KubeconfigRefused", "check_kubeconfig", "kubeconfig_policy"]


@dataclass(frozen=True)
class KubeconfigPolicy:
    """What an operator allows beyond the defaults (the settings, through ``kubeconfig_policy``)."""

    fetch: FetchPolicy = field(default_factory=FetchPolicy)  # allow_hosts: private servers allowed
    allow_insecure_tls: bool = False


def kubeconfig_policy(settings: Settings) -> KubeconfigPolicy:
    return KubeconfigPolicy(fetch=fetch_policy(settings), allow_insecure_tls=settings.kubernetes_allow_insecure_tls)


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

    def check_server(url: str, field: str) -> None:
        try:
            check_url(url, policy=policy.fetch, resolver=resolver)
        except FetchError as exc:  # its message holds the URL redacted, never a credential
            raise KubeconfigRefused(field, str(exc)) from None

    return tenant_kubeconfig.check_kubeconfig(
        text, allow_insecure_tls=policy.allow_insecure_tls, check_server=check_server
    )
