"""One reconciler pass over one service: observe the orchestrator, decide, act, record.

Bounded (a few engine calls, each with a timeout) and idempotent: a pass interrupted
anywhere leaves labelled engine objects that the next pass reads back. The database half
(lease, spec, the decision, the write) is app.deployments.reconciler.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from app.auth.registry_tokens import engine_pull_token
from app.config import compute_path
from app.context import ServiceContext
from app.database import session_scope
from app.deployments import installation, reconciler
from app.deployments.reconciler import Failure, Lease, Spec
from app.deployments.states import ServiceState
from app.orm import Account, Compute, Service
from app.orm.base import utcnow
from app.sealing import UnsealError
from app.services.computes import is_tenant_swarm
from workers.deploy.cluster_cleanup import clean_up_clusters
from workers.deploy.kubeconfig import kubeconfig_policy
from workers.deploy.local import EngineUnreachable, LocalDriver, TargetRefused, repository_of
from workers.deploy.local_network import ServiceNetworkError, require_service_firewall
from workers.deploy.pass_slots import pass_slots
from workers.deploy.swarm import SwarmDriver
from workers.deploy.tenant_swarm import tenant_swarm_driver
from workers.pipeline import DEFAULT_DOCKER_SOCKET, ENGINE_PULL_TOKEN_SECONDS, local_engine, registry_login

if TYPE_CHECKING:
    from workers.deploy.kubernetes_driver import KubernetesDriver

log = logging.getLogger("mms.deploy")

_OWNER = f"{socket.gethostname()}:{os.getpid()}"


# A worker whose pass ends takes the next service put off (in any process) at once, in the
# same task: up to this many passes a task, so one task never runs on for ever while others wait.
PASSES_A_TASK = 4


def reconcile_service(context: ServiceContext, service_id: uuid.UUID) -> None:
    """One pass over the service, if no other pass holds it and this process has a slot free
    for it (workers.deploy.pass_slots; else it is put off: app.deployments.reconciler.put_off).
    A pass that ran is followed by the next service in line, whichever process put it off (its
    slot is free here now), up to PASSES_A_TASK passes."""
    if _copied(context):
        return
    per_tenant = context.settings.deploy_passes_per_tenant
    for passes in range(1, PASSES_A_TASK + 1):
        ran = _one_pass(context, service_id)
        if ran is None or passes == PASSES_A_TASK:
            return
        room = pass_slots.room(per_tenant=per_tenant)  # another thread may have taken the slot
        if room is None:
            return
        try:
            with session_scope(context.session_factory) as session:
                next_id = reconciler.next_in_line(session, attached=ran.attached, room=room)
        except Exception as exc:  # noqa: BLE001 - the waiting services' own retries come anyway
            log.warning("deploy.next_in_line_failed", extra={"exception": _traceback(exc)})
            return
        if next_id is None:
            return
        log.info("deploy.next_in_line", extra={"service": str(next_id), "after": str(service_id)})
        service_id = next_id


def _one_pass(context: ServiceContext, service_id: uuid.UUID) -> reconciler.Lease | None:
    """One pass over the service; the lease it ran under, or None when it did not run (another
    pass holds the service, or no slot was free and it was put off)."""
    with session_scope(context.session_factory) as session:
        lease = reconciler.claim(session, service_id, owner=_OWNER)
    if lease is None:
        return None
    per_tenant = context.settings.deploy_passes_per_tenant
    with pass_slots.slot(lease.subscription_id, attached=lease.attached, per_tenant=per_tenant) as free:
        if not free:
            with session_scope(context.session_factory) as session:
                due_in = reconciler.put_off(session, lease)
            log.info(
                "deploy.pass_put_off",
                extra={
                    "service": str(service_id),
                    "subscription": lease.subscription_id,
                    "attached": lease.attached,
                    "due_in": due_in,
                },
            )
            return None
        try:
            if lease.put_off_since is not None:
                with session_scope(context.session_factory) as session:
                    reconciler.taken_up(session, lease)
            with renewing(context, lease):
                _pass(context, lease)
        except Exception as exc:  # noqa: BLE001 - logged, cut short, and the lease released
            # Its text may quote an engine's answer (a tenant's: up to 64 KiB of its choosing),
            # so the log gets each message cut short, with where it was raised.
            log.error("deploy.pass_failed", extra={"service": str(service_id), "exception": _traceback(exc)})
            with session_scope(context.session_factory) as session:
                reconciler.release(session, lease, due_in=reconciler.STEADY_SECONDS)
    return lease


@contextmanager
def renewing(context: ServiceContext, lease: Lease, *, every: float = reconciler.LEASE_SECONDS / 3) -> Iterator[None]:
    """Keep the pass's lease while it runs (a pull of a large image, a swarm's slow tasks):
    renewed every third of its length; a renewal that finds the lease taken stops renewing
    (the pass's own writes are fenced anyway)."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(every):
            try:
                with session_scope(context.session_factory) as session:
                    if not reconciler.renew(session, lease):
                        return
            except Exception:  # the database is away: the next tick tries again
                log.warning("deploy.lease_renewal_failed", extra={"service": str(lease.service_id)}, exc_info=True)

    thread = threading.Thread(target=renew, name=f"lease-{lease.service_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _pass(context: ServiceContext, lease: Lease) -> None:
    settings = context.settings
    scoring_url = settings.scoring_url  # for the scoringUri of the events a verdict records
    with session_scope(context.session_factory) as session:
        spec = reconciler.read_spec(session, lease)
    if spec is None:
        return
    if spec.building and not spec.deleting:  # deployed from models: its image first
        with session_scope(context.session_factory) as session:
            reconciler.release(session, lease, due_in=2 * reconciler.BUSY_SECONDS)
        return
    if (failure := spec.build_failure) is not None and not spec.deleting:
        with session_scope(context.session_factory) as session:
            reconciler.record(
                session, lease, spec, reconciler.Step(failure=failure), [], now=utcnow(), scoring_url=scoring_url
            )
        return
    # A kubernetes service's delete always goes to its cluster: what a pass applied there is
    # found by label, even if the target could not be deployed to now.
    kubernetes_delete = spec.deleting and spec.compute_type == "kubernetes"
    if (why := _undeployable(context, spec)) is not None and not kubernetes_delete:
        with session_scope(context.session_factory) as session:
            if spec.deleting:  # nothing was ever made there
                reconciler.finish_delete(session, lease)
            else:
                step = reconciler.Step(failure=Failure(why))
                reconciler.record(session, lease, spec, step, [], now=utcnow(), scoring_url=scoring_url)
        return
    if spec.compute_type == "kubernetes":
        _kubernetes_pass(context, lease, spec)
        return
    if spec.deleting:
        with session_scope(context.session_factory) as session:
            routed = reconciler.stop_routing(session, lease)
        if routed:
            # Its network (and with it its replicas' addresses) goes only once no gateway can
            # still route to them: the next service's network may take the same addresses, and
            # this service's callers' requests would reach that tenant's replica.
            with session_scope(context.session_factory) as session:
                reconciler.release(session, lease, due_in=2 * settings.gateway_cache_seconds + 1)
            return
        if (removed := _built_in_target_removed(context, spec)) is not None:
            # Nothing of it can be reached any more, and it must not stay Deleting for ever: the
            # row goes; should the target be set again, the orphan sweep removes what is left.
            with session_scope(context.session_factory) as session:
                reconciler.finish_delete(session, lease)
            log.info("deploy.deleted_without_target", extra={"service": str(spec.id), "reason": removed})
            return
    now = utcnow()
    tenant_swarm = _tenant_swarm(context, spec)
    try:
        with _driver(context, spec) as driver:
            if spec.deleting:
                if not driver.remove_all(spec.id):  # still going: the next pass goes on
                    with session_scope(context.session_factory) as session:
                        reconciler.release(session, lease, due_in=reconciler.BUSY_SECONDS)
                    return
                with session_scope(context.session_factory) as session:
                    reconciler.finish_delete(session, lease)
                log.info("deploy.deleted", extra={"service": str(spec.id)})
                return
            replicas, failure = driver.observe(spec)
            lines = driver.read_logs(spec, replicas)  # before a failed generation's replicas go
            now = utcnow()
            step = reconciler.decide(
                spec,
                replicas,
                now=now,
                start_seconds=settings.service_start_seconds,
                drain_seconds=_drain_seconds(context, spec),
                failure=failure,
            )
            driver.remove(step.remove)
            if isinstance(driver, SwarmDriver) and settings.is_embedded_registry and not (step.start or step.remove):
                # Its pull token expires: a task swarm places later on a node without the image
                # pulls with the one its swarm service holds (the operator's login does not).
                driver.renew_pull_auth(_pull_auth(context, spec) or {})  # a token here
            if spec.state is ServiceState.FAILED and isinstance(driver, SwarmDriver):
                # The generations past those a pass observes go too: while some are left, the
                # next pass comes soon (as a kubernetes one's), not in FAILED_SECONDS.
                step.busy = not driver.remove_generations(spec.id)
            if step.start:
                if not _tenant_swarm(context, spec):  # a tenant's hosts are not under our firewall
                    require_service_firewall(
                        settings.service_firewall_attestation
                    )  # nothing starts uncontained (removing needs no firewall)
                driver.start(spec, step.start, _pull_auth(context, spec))
                step.busy = True
    except TargetRefused as exc:  # a tenant's swarm: its manager or credentials will not do
        with session_scope(context.session_factory) as session:
            if spec.deleting:  # the tenant may fix the target (PUT .../computes): tried again
                reconciler.record_unreachable(session, lease, spec, str(exc), now=utcnow(), scoring_url=scoring_url)
            else:
                step = reconciler.Step(failure=Failure(str(exc)))
                reconciler.record(session, lease, spec, step, [], now=utcnow(), scoring_url=scoring_url)
        log.warning("deploy.refused", extra={"service": str(spec.id), "reason": _cut(str(exc))})
        return
    except (EngineUnreachable, ServiceNetworkError) as exc:
        # A tenant's swarm away: the gateway stops routing to its tasks' addresses, which it no
        # longer vouches for (its name may lead elsewhere by now, and an address at another's
        # host may be another's service later). Our own engines' replicas keep serving if they can.
        with session_scope(context.session_factory) as session:
            reconciler.record_unreachable(
                session, lease, spec, str(exc), now=utcnow(), scoring_url=scoring_url, forget_replicas=tenant_swarm
            )
        log.warning("deploy.unreachable", extra={"service": str(spec.id), "reason": _cut(str(exc))})
        return
    except Exception:
        if tenant_swarm:  # an answer the pass could not read is no more vouched for than none
            with session_scope(context.session_factory) as session:
                reconciler.stop_routing(session, lease)
        raise
    with session_scope(context.session_factory) as session:
        reconciler.record(session, lease, spec, step, replicas, now=now, scoring_url=scoring_url, lines=lines)


def _kubernetes_pass(context: ServiceContext, lease: Lease, spec: Spec) -> None:
    """One pass over a service on a tenant's cluster. A pass applies what the spec describes
    where the cluster does not hold it so (a scale, an image swap, a roll back: the Deployment
    rolls out; an object deleted or edited underneath); the pods the
    cluster runs are the replicas ``decide`` judges, and nothing is started or removed one by
    one: the Deployment's controller owns its pods. The gateway routes to none of them."""
    settings = context.settings
    endpoint: str | None = None
    lines: list[reconciler.LogLine] = []
    try:
        with _kubernetes_driver(context, spec) as driver:
            if spec.deleting:
                if not driver.remove_all(spec.id):  # its pods still terminate: the next pass goes on
                    with session_scope(context.session_factory) as session:
                        reconciler.release(session, lease, due_in=reconciler.BUSY_SECONDS)
                    return
                with session_scope(context.session_factory) as session:
                    reconciler.finish_delete(session, lease)
                log.info("deploy.deleted", extra={"service": str(spec.id)})
                return
            if spec.state is ServiceState.FAILED:
                if not driver.remove_all(spec.id):  # nothing runs until the tenant changes it
                    # Its pods or objects still going: looked at again soon, not in FAILED_SECONDS.
                    with session_scope(context.session_factory) as session:
                        reconciler.release(session, lease, due_in=reconciler.STEADY_SECONDS)
                    return
                replicas, failure = [], None
            else:
                driver.apply(spec)
                replicas, failure = driver.observe(spec)
                lines = driver.read_logs(spec, replicas)
                endpoint = driver.endpoint(spec)
                spec = _spec_as_scaled(spec, driver.scaled_to)
            now = utcnow()
            step = reconciler.decide(
                spec,
                replicas,
                now=now,
                start_seconds=settings.service_start_seconds,
                drain_seconds=_drain_seconds(context, spec),
                failure=failure,
            )
    except TargetRefused as exc:
        with session_scope(context.session_factory) as session:
            if spec.deleting:  # the tenant may fix the target (PUT .../computes): tried again
                reconciler.record_unreachable(
                    session, lease, spec, str(exc), now=utcnow(), scoring_url=settings.scoring_url
                )
            else:
                reconciler.record(
                    session,
                    lease,
                    spec,
                    reconciler.Step(failure=Failure(str(exc))),
                    [],
                    now=utcnow(),
                    scoring_url=settings.scoring_url,
                )
        log.warning("deploy.refused", extra={"service": str(spec.id), "reason": _cut(str(exc))})
        return
    except EngineUnreachable as exc:
        with session_scope(context.session_factory) as session:
            reconciler.record_unreachable(
                session, lease, spec, str(exc), now=utcnow(), scoring_url=settings.scoring_url
            )
        log.warning("deploy.unreachable", extra={"service": str(spec.id), "reason": _cut(str(exc))})
        return
    with session_scope(context.session_factory) as session:
        reconciler.record(
            session,
            lease,
            spec,
            step,
            replicas,
            now=now,
            lines=lines,
            endpoint=endpoint,
            scoring_url=settings.scoring_url,
        )


def _kubernetes_driver(context: ServiceContext, spec: Spec) -> KubernetesDriver:
    """A connection to the service's cluster with the target's kubeconfig, checked now."""
    try:
        from workers.deploy.kubernetes_driver import KubernetesDriver
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "kubernetes":
            raise
        raise TargetRefused(
            "the deploy workers cannot reach kubernetes targets: the kubernetes client is not installed "
            "on them (the operator installs the service's kubernetes extra: pip install 'mms[kubernetes]')"
        ) from None
    with session_scope(context.session_factory) as session:
        found = session.execute(
            select(Compute, Account)
            .join(Account, Account.id == Compute.account_id)
            .where(Compute.account_id == spec.account_id, Compute.name == spec.compute_name)
        ).first()
        compute, account = found if found is not None else (None, None)
        if compute is None or compute.compute_type != "kubernetes" or not compute.sealed_credentials:
            raise TargetRefused(f"compute '{spec.compute_name}' is not an attached kubernetes target of the account")
        sealed, namespace = compute.sealed_credentials, (compute.properties or {}).get("namespace") or "default"
        path = compute_path(account.subscription_id, account.resource_group, account.name, compute.name)
    try:
        kubeconfig = json.loads(context.sealer.unseal(sealed))["kubeconfig"]
    except (UnsealError, ValueError, KeyError, TypeError):
        raise TargetRefused(
            f"the credentials of compute '{spec.compute_name}' cannot be read (was MMS_SECRET_KEY changed?): "
            "attach it again"
        ) from None
    return KubernetesDriver(
        kubeconfig,
        namespace=namespace,
        policy=kubeconfig_policy(context.settings, compute_path=path),
        tmp_mb=context.settings.service_tmp_mb,
    )


def _spec_as_scaled(spec: Spec, scaled_to: int | None) -> Spec:
    """``spec`` with as many replicas as its autoscaler asks for now (at least its minimum):
    what the pass waits for, as it would for a fixed count."""
    if not (spec.autoscaler or {}).get("autoscaleEnabled") or scaled_to is None:
        return spec
    return replace(spec, replicas=max(spec.replicas, scaled_to))


def sweep_orphans(context: ServiceContext) -> list[uuid.UUID]:
    """Remove engine objects of services that no longer exist (on the local engine and the
    operator's swarm); their ids. The services that exist are read after what the engine holds:
    a service made meanwhile is then known, never swept as it starts."""

    def known() -> set[uuid.UUID]:
        with session_scope(context.read_session_factory) as session:
            return set(session.scalars(select(Service.id)))

    if _copied(context):
        return []
    orphans: list[uuid.UUID] = []
    # The swarm's first: where it is the local engine too, the local sweep leaves its objects alone.
    if context.settings.swarm_docker_host:
        with suppress(EngineUnreachable), _swarm_driver(context, context.settings.swarm_docker_host) as driver:
            orphans += driver.sweep(known)
    engine, _ = local_engine(context.settings)
    if engine is not None:
        with suppress(EngineUnreachable), _local_driver(context, engine) as driver:
            orphans += driver.sweep(known)
    if orphans:
        log.info("deploy.swept", extra={"services": [str(o) for o in orphans]})
    return orphans


def clean_up_deleted_accounts(context: ServiceContext) -> list[uuid.UUID]:
    """Remove from their clusters and swarms the objects of deleted accounts' services on targets
    they attached (workers/deploy/cluster_cleanup.py); the services done with. A copy of the
    database removes nothing: its rows are the original's too."""
    if _copied(context):
        return []
    return clean_up_clusters(context, installation=installation_id(context))


def _driver(context: ServiceContext, spec: Spec) -> AbstractContextManager[LocalDriver | SwarmDriver]:
    """The driver of the service's target; EngineUnreachable when it has none."""
    settings = context.settings
    if _tenant_swarm(context, spec):
        return tenant_swarm_driver(
            context,
            account_id=spec.account_id,
            compute_name=spec.compute_name,
            installation=installation_id(context),
            publish=not spec.deleting,  # a delete only removes: it routes to nothing there
        )
    if spec.compute_type == "swarm":
        if not settings.swarm_docker_host:
            raise EngineUnreachable("the operator's swarm is not set on the workers (MMS_SWARM_DOCKER_HOST)")
        return _swarm_driver(context, settings.swarm_docker_host)
    engine, missing = local_engine(settings)
    if engine is None:
        raise EngineUnreachable(f"the local target has no engine: {missing}")
    return _local_driver(context, engine)


def _built_in_target_removed(context: ServiceContext, spec: Spec) -> str | None:
    """Why the service's built-in target is no target of the workers any more (the operator
    removed its setting after the service was made), if so. An engine that is set but does not
    answer is away, not removed: the delete waits for it."""
    settings = context.settings
    if spec.compute_attached or spec.compute_type == "kubernetes":
        return None
    if spec.compute_type == "swarm":
        return None if settings.swarm_docker_host else "the operator's swarm is not set (MMS_SWARM_DOCKER_HOST)"
    # Judged by the settings and the socket's presence, never by an answer: an engine that
    # restarts or is slow to answer is away, and what it runs must not lose its row.
    if settings.local_compute or settings.docker_host or Path(DEFAULT_DOCKER_SOCKET).exists():
        return None
    return f"the local target is off (MMS_LOCAL_COMPUTE), with no DOCKER_HOST and nothing at {DEFAULT_DOCKER_SOCKET}"


def _undeployable(context: ServiceContext, spec: Spec) -> str | None:
    """Why nothing can be deployed to the service's target in this version, if so."""
    if spec.compute_type == "kubernetes" and spec.auth_enabled:
        # The API refuses it; a row from before says so here: never served without the keys it asked for.
        return (
            f"compute '{spec.compute_name}' is a kubernetes target, whose traffic does not pass the scoring "
            "gateway that checks keys: set authEnabled to false to deploy there without key auth"
        )
    if spec.compute_type == "kubernetes" and context.settings.is_embedded_registry:
        return (
            "a kubernetes target pulls the image from the service's registry, and the embedded image store "
            "cannot hand a cluster a pull credential of its own; an operator sets MMS_REGISTRY to a registry "
            "the cluster can pull from itself"
        )
    if _tenant_swarm(context, spec) and spec.auth_enabled:
        # The API refuses it; a row from before says so here: never served without the keys it asked for.
        return (
            f"compute '{spec.compute_name}' is a swarm the tenant attached, whose tasks publish their port on "
            "the tenant's hosts, reachable around the scoring gateway that checks keys: set authEnabled to "
            "false to deploy there without key auth"
        )
    return None


def _cut(text: str) -> str:
    """``text`` (which may quote what an engine or cluster said) at most LOGGED_CHARS long."""
    return text if len(text) <= LOGGED_CHARS else f"{text[:LOGGED_CHARS]}... ({len(text)} characters, cut)"


def _traceback(exc: BaseException) -> str:
    """Where ``exc`` and the exceptions it was raised from or during were raised (our code's
    frames only name our files and lines), each with its message cut by ``_cut``."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 5:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts: list[str] = []
    for raised in reversed(chain):
        parts += traceback.format_tb(raised.__traceback__)[-_TRACEBACK_FRAMES:]
        parts.append(f"{type(raised).__module__}.{type(raised).__qualname__}: {_cut(str(raised))}\n")
    return "".join(parts)


# What the log keeps of a message that may quote an engine's answer, and of a traceback's frames.
LOGGED_CHARS = 500
_TRACEBACK_FRAMES = 30


def _tenant_swarm(context: ServiceContext, spec: Spec) -> bool:
    """Is the service's target a swarm the tenant attached (not the operator's built-in one)?"""
    return is_tenant_swarm(spec.compute_type, attached=spec.compute_attached)


def _local_driver(context: ServiceContext, engine: str) -> LocalDriver:
    settings = context.settings
    return LocalDriver(
        engine,
        installation=installation_id(context),
        subnet_pool=settings.service_subnet_pool,
        tmp_mb=settings.service_tmp_mb,
        pids=settings.service_pids,
    )


def _swarm_driver(context: ServiceContext, docker_host: str) -> SwarmDriver:
    settings = context.settings
    return SwarmDriver(
        docker_host,
        installation=installation_id(context),
        subnet_pool=settings.service_subnet_pool,
        tmp_mb=settings.service_tmp_mb,
        pids=settings.service_pids,
    )


def installation_id(context: ServiceContext) -> str:
    """This installation's label (made with its database: migration 0013), checked at most
    every ``_INSTALLATION_CHECK_SECONDS``; InstallationCopied when the database is a copy the
    operator has not told apart (app.deployments.installation): then nothing deploys or sweeps."""
    key = context.settings.resolved_database_url
    known = _INSTALLATIONS.get(key)
    if known is None or time.monotonic() - known[1] > _INSTALLATION_CHECK_SECONDS:
        with session_scope(context.session_factory) as session:
            label = installation.require(session).label
        known = _INSTALLATIONS[key] = (label, time.monotonic())
    return known[0]


# A new id (``mms admin installation --new-id``) reaches every deploy worker within this.
_INSTALLATION_CHECK_SECONDS = 30.0
_INSTALLATIONS: dict[str, tuple[str, float]] = {}


def _copied(context: ServiceContext) -> bool:
    """Is the database a copy the operator has not yet told apart? Says so in the log (at
    most once a minute a process) when it is."""
    global _copied_said_at
    try:
        installation_id(context)
    except installation.InstallationCopied as copied:
        if time.monotonic() - _copied_said_at > 60:
            _copied_said_at = time.monotonic()
            log.error("deploy.installation_copied", extra={"detail": str(copied)})
        return True
    return False


_copied_said_at = -math.inf


def _drain_seconds(context: ServiceContext, spec: Spec) -> float:
    """How long an old generation keeps running after traffic left it: every gateway has
    re-read the route, and a request sent just before has had its scoring timeout."""
    return 2 * context.settings.gateway_cache_seconds + spec.scoring_timeout_ms / 1000 + 1


def _pull_auth(context: ServiceContext, spec: Spec) -> Mapping[str, str] | None:
    """What the engine pulls the image with. A tenant's engine gets at most a token for that one
    image's repository: never the operator's registry login, which pushes every tenant's images
    (with MMS_REGISTRY, the tenant's hosts pull with their own access, as a kubernetes cluster)."""
    if context.settings.is_embedded_registry:
        # The engine pulls from the service's own /v2/ with a token for this image only.
        token = engine_pull_token(context, repository_of(spec.image_location), ttl_seconds=ENGINE_PULL_TOKEN_SECONDS)
        return {"registrytoken": token}
    return None if _tenant_swarm(context, spec) else registry_login(context.settings)
