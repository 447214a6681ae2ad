"""The target half of removing force-deleted services (alone, or with their account) from the
kubernetes clusters and the swarms their accounts attached: each due row
(app.deployments.cluster_cleanup) is claimed, its sealed credentials connect the driver as for
a live service (a swarm's manager judged by the fetch policy again, its TLS material in a
private folder: workers/deploy/tenant_swarm.py), and the service's objects are deleted by label
(in its namespace; on a swarm, its swarm services). Done:
the row goes. Not done (the target away, the credentials refused, pods or tasks still
terminating): the driver's message (which never holds a credential) is kept and the next try
backed off; after the last one the row goes with a ``deploy.cluster_cleanup_abandoned`` line
naming the service and the target's address.

The caller checks that the database is not an unclaimed copy (workers.deploy.reconcile).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from urllib.parse import urlsplit

from app.context import ServiceContext
from app.database import session_scope
from app.deployments import cluster_cleanup
from app.deployments.cluster_cleanup import Cleanup
from app.deployments.kubeconfig import KubeconfigRefused, check_kubeconfig
from app.orm.base import utcnow
from app.sealing import UnsealError
from workers.deploy.kubeconfig import kubeconfig_policy
from workers.deploy.local import EngineUnreachable, TargetRefused
from workers.deploy.tenant_swarm import swarm_driver_at, unseal_tls

log = logging.getLogger("mms.deploy")

# One sweep's tries together (the sweep runs every minute on a deploy worker, and a tenant can
# queue rows by deleting its own account): no try begins past it, and the rows not reached stay
# due for the next sweep. A try begun in time ends by its driver's own deadline
# (workers/deploy/swarm.py's PASS_SECONDS, kubernetes_driver's _PASS_SECONDS).
SWEEP_SECONDS = 120.0


class _NotYet(Exception):
    """A try that found the service's pods or tasks still terminating."""


def clean_up_clusters(context: ServiceContext, *, installation: str) -> list[uuid.UUID]:
    """One try at each due row; the services whose objects are now gone from their targets.
    ``installation``: this installation's label (a swarm's task containers carry it)."""
    with session_scope(context.read_session_factory) as session:
        due = cluster_cleanup.due_cleanups(session, now=utcnow())
    cleaned: list[uuid.UUID] = []
    ends = time.monotonic() + SWEEP_SECONDS
    for tried, cleanup_id in enumerate(due):
        if time.monotonic() >= ends:
            log.info("deploy.cluster_cleanup_deferred", extra={"rows": len(due) - tried, "seconds": SWEEP_SECONDS})
            break
        with session_scope(context.session_factory) as session:
            cleanup = cluster_cleanup.claim(session, cleanup_id, now=utcnow())
        if cleanup is not None and _try(context, cleanup, installation):
            cleaned.append(cleanup.service_id)
    if cleaned:
        log.info("deploy.cluster_cleaned", extra={"services": [str(s) for s in cleaned]})
    return cleaned


def _try(context: ServiceContext, cleanup: Cleanup, installation: str) -> bool:
    kubeconfig: str | None = None
    try:
        if cleanup.compute_type == "swarm":
            _remove_from_swarm(context, cleanup, installation)
        else:
            kubeconfig = json.loads(context.sealer.unseal(cleanup.sealed_credentials))["kubeconfig"]
            _remove(context, cleanup, kubeconfig)
    except (UnsealError, ValueError, KeyError, TypeError):
        error = "the target's credentials cannot be read (was MMS_SECRET_KEY changed?)"
    except (EngineUnreachable, TargetRefused) as exc:
        error = str(exc)  # the driver's: the target's address, its messages with credentials cut out
    except _NotYet:
        error = "the service's pods or tasks are still terminating"
    except Exception as exc:  # noqa: BLE001 - its text may quote what the cluster sent: its kind only
        error = f"an unexpected error ({type(exc).__name__})"
    else:
        with session_scope(context.session_factory) as session:
            cluster_cleanup.finish(session, cleanup)
        return True
    with session_scope(context.session_factory) as session:
        dropped = cluster_cleanup.record_failure(session, cleanup, error, now=utcnow())
    address = _manager(cleanup.docker_host) if cleanup.compute_type == "swarm" else _address(kubeconfig)
    extra = {"service": str(cleanup.service_id), "cluster": address, "reason": error}
    if dropped:
        log.error("deploy.cluster_cleanup_abandoned", extra=extra | {"attempts": cleanup.attempts + 1})
    else:
        log.warning("deploy.cluster_cleanup_failed", extra=extra)
    return False


def _remove(context: ServiceContext, cleanup: Cleanup, kubeconfig: str) -> None:
    try:
        from workers.deploy.kubernetes_driver import KubernetesDriver
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "kubernetes":
            raise
        raise TargetRefused("the kubernetes client is not installed on the deploy workers") from None
    settings = context.settings
    driver = KubernetesDriver(
        kubeconfig,
        namespace=cleanup.namespace,
        policy=kubeconfig_policy(settings, compute_path=cleanup.compute_path),
        tmp_mb=settings.service_tmp_mb,
    )
    with driver:
        if not driver.remove_all(cleanup.service_id):
            raise _NotYet


def _remove_from_swarm(context: ServiceContext, cleanup: Cleanup, installation: str) -> None:
    tls = unseal_tls(context, cleanup.sealed_credentials)
    docker_host, target = cleanup.docker_host or "", "the deleted account's swarm"
    with swarm_driver_at(
        context,
        docker_host=docker_host,
        tls=tls,
        installation=installation,
        target=target,
        compute_path=cleanup.compute_path,
        publish=False,
    ) as driver:
        if not driver.remove_all(cleanup.service_id):
            raise _NotYet


def _manager(docker_host: str | None) -> str:
    """A swarm manager's host:port, for the log (dockerHost holds nothing else: checked at attach)."""
    return urlsplit(docker_host or "").netloc or "unknown"


def _address(kubeconfig: str | None) -> str:
    """The current context's server as host:port (no credential, no path), for the log."""
    if kubeconfig is None:
        return "unknown (the credentials cannot be read)"
    try:
        parts = urlsplit(check_kubeconfig(kubeconfig, allow_insecure_tls=True).server)
        return f"{parts.hostname}:{parts.port or 443}"
    except (KubeconfigRefused, ValueError):
        return "unknown (the kubeconfig is refused)"
