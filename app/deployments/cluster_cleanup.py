"""The database half of removing force-deleted services from the kubernetes clusters and the
swarms their accounts attached: the rows a force delete (of an account, or of one service)
leaves (one a service, with the target's sealed kubeconfig or TLS material, and a swarm's
manager address; only for a service a reconciler pass may have applied, and for a single
service's force delete only under the account's cap on pending rows), and how the deploy
worker's sweep picks (fairly across tenants), claims, ends, retries and abandons them
(workers/deploy/cluster_cleanup.py is the cluster half)."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, delete, func, select, update
from sqlalchemy.orm import Session

from app.config import compute_path
from app.errors import Conflict
from app.orm import Account, ClusterCleanup, Compute, Service
from app.orm.base import utcnow

# The first try waits out any pass that may still be at work on the service (a pass reads its
# spec, then acts on the target, then finds the row gone): longer than the longest pass (a
# swarm pass's PASS_SECONDS, then PULL_SECONDS from its start of a generation:
# workers/deploy/swarm.py; a kubernetes pass's is shorter), so what such a pass made after the
# delete is removed with the rest.
FIRST_TRY_SECONDS = 900.0
# Tries, backed off from a minute to an hour each: about a day before a cluster is given up.
MAX_ATTEMPTS = 30
FIRST_RETRY_SECONDS = 60.0
LAST_RETRY_SECONDS = 3600.0
# A sweep's claim of a row: longer than one try takes (the driver's bound on all its calls).
CLAIM_SECONDS = 300.0
_ERROR_CHARS = 1000


@dataclass(frozen=True)
class Cleanup:
    """A claimed row, as the worker needs it."""

    id: uuid.UUID
    service_id: uuid.UUID
    compute_type: str  # kubernetes or swarm
    namespace: str  # kubernetes
    docker_host: str | None  # swarm
    sealed_credentials: str = field(repr=False)
    attempts: int
    claimed_until: datetime  # the claim: a write by a sweep whose claim was taken over finds nothing
    compute_path: str | None = None  # the compute's (MMS_COMPUTE_ALLOW_HOSTS); None: not known


def queue_cleanups(
    session: Session,
    account_id: uuid.UUID,
    *,
    service_ids: Collection[uuid.UUID] | None = None,
    cap: int | None = None,
) -> int:
    """For each service of an account (``service_ids``: only those; None: all of them) about to
    be deleted without its target's say, on a kubernetes cluster or a swarm the account attached
    (a compute of its own, with credentials: never a built-in target, which the orphan sweep
    cleans), that a reconciler pass may have applied there, a row to remove what it made; how
    many. In the delete's transaction, before the services (and an account's computes) go.
    ``cap``: refused (409 TooManyCleanups) when the rows would take the account past that many
    pending ones; None for an account's own delete, which is never refused."""
    query = (
        select(
            Service.id,
            Service.attempt,
            Service.traffic_generation,
            Service.replicas_ready,
            Service.endpoint,
            Service.compute_name,
            Compute.compute_type,
            Compute.sealed_credentials,
            Compute.properties,
        )
        .join(Compute, (Compute.account_id == Service.account_id) & (Compute.name == Service.compute_name))
        .where(
            Service.account_id == account_id,
            Service.compute_type.in_(_ATTACHED),
            Service.compute_attached,
            Compute.compute_type == Service.compute_type,
            Compute.sealed_credentials.is_not(None),
        )
    )
    if service_ids is not None:
        query = query.where(Service.id.in_(list(service_ids)))
    # The services' rows locked until the delete commits: a force delete of one and its account's
    # at once queue one row, not two (the second waits, then finds the service gone). All of them,
    # those never applied too: a reconciler pass claims a service with an UPDATE, which waits here.
    rows = [row for row in session.execute(query.with_for_update(of=Service)).all() if _maybe_applied(row)]
    # The tenant: the sweep picks fairly by it (an account's own delete is never capped, and a
    # tenant makes any number of accounts).
    # Its path too: the hosts the operator allows for one compute alone are found by it
    # (MMS_COMPUTE_ALLOW_HOSTS), when the account is gone.
    account_query = select(
        func.lower(Account.subscription_id), Account.subscription_id, Account.resource_group, Account.name
    ).where(Account.id == account_id)
    if rows and cap is not None:
        # The account's row locked until the commit, after the services' (the order an account's
        # delete takes them in): capped deletes of its services count the pending rows one at a
        # time, each seeing the rows those before it queued, so the cap is exact. FOR NO KEY
        # UPDATE: the foreign key checks of inserts under the account (FOR KEY SHARE) never wait.
        account = session.execute(account_query.with_for_update(key_share=True)).one_or_none()
        pending = session.scalar(
            select(func.count()).select_from(ClusterCleanup).where(ClusterCleanup.account_id == account_id)
        )
        if pending + len(rows) > cap:
            raise Conflict(
                f"this account has {pending} cleanups pending on the targets it attached, the most the "
                "service allows (MMS_CLEANUPS_PER_ACCOUNT); wait for them to finish (the deploy worker "
                "retries each for about a day), make the targets reachable again so they can, or delete "
                "the service without force",
                code="TooManyCleanups",
            )
    else:
        account = session.execute(account_query).one_or_none()
    subscription = account[0] if account is not None else None
    for row in rows:
        properties = row.properties or {}
        session.add(
            ClusterCleanup(
                service_id=row.id,
                account_id=account_id,
                subscription_id=subscription,
                compute_path=compute_path(*account[1:], row.compute_name) if account is not None else None,
                compute_type=row.compute_type,
                namespace=(properties.get("namespace") or "default") if row.compute_type == "kubernetes" else "",
                docker_host=properties.get("dockerHost") if row.compute_type == "swarm" else None,
                sealed_credentials=row.sealed_credentials,
                attempts=0,
                next_attempt_at=utcnow() + timedelta(seconds=FIRST_TRY_SECONDS),
            )
        )
    session.flush()
    return len(rows)


def _maybe_applied(row: Row[Any]) -> bool:
    """Whether a reconciler pass may have made something of the service on its target: one has
    claimed it (``attempt`` counts claims, from 0, never reset; a claim comes before any call to
    the target), or anything a pass writes is set (a service from before the count, migration
    0011, has 0 there)."""
    return bool(row.attempt or row.traffic_generation is not None or row.replicas_ready or row.endpoint)


_ATTACHED = ("kubernetes", "swarm")


def due_cleanups(session: Session, *, now: datetime, limit: int = 20) -> list[uuid.UUID]:
    """The rows whose next try is due, fairly across tenants (subscriptions): each one's oldest,
    then each one's second oldest, and so on (oldest first within a round), so one tenant's
    backlog, over however many accounts, never holds another's rows past a sweep. Rows from
    before 0021 whose account could not be told count as one tenant."""
    rank = (
        func.row_number()
        .over(
            partition_by=ClusterCleanup.subscription_id,
            order_by=(ClusterCleanup.next_attempt_at, ClusterCleanup.id),
        )
        .label("rank")
    )
    due = (
        select(ClusterCleanup.id, ClusterCleanup.next_attempt_at, rank)
        .where(ClusterCleanup.next_attempt_at <= now)
        .subquery()
    )
    query = select(due.c.id).order_by(due.c.rank, due.c.next_attempt_at, due.c.id).limit(limit)
    return list(session.scalars(query))


def claim(session: Session, cleanup_id: uuid.UUID, *, now: datetime) -> Cleanup | None:
    """The row, its next try pushed past this sweep's claim; None when it is not due (another
    sweep claimed it, or it is gone). One conditional UPDATE: two sweeps never both win."""
    until = now + timedelta(seconds=CLAIM_SECONDS)
    claimed = session.execute(
        update(ClusterCleanup)
        .where(ClusterCleanup.id == cleanup_id, ClusterCleanup.next_attempt_at <= now)
        .values(next_attempt_at=until)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:
        return None
    row = session.get(ClusterCleanup, cleanup_id, populate_existing=True)
    assert row is not None
    return Cleanup(
        row.id,
        row.service_id,
        row.compute_type,
        row.namespace,
        row.docker_host,
        row.sealed_credentials,
        row.attempts,
        until,
        row.compute_path,
    )


def finish(session: Session, cleanup: Cleanup) -> None:
    """The service's objects are gone from its cluster: the row goes."""
    session.execute(delete(ClusterCleanup).where(_held(cleanup)).execution_options(synchronize_session=False))


def record_failure(session: Session, cleanup: Cleanup, error: str, *, now: datetime) -> bool:
    """A try that did not finish: the error kept (already free of credentials), the next try
    backed off; or, past ``MAX_ATTEMPTS``, the row dropped. Whether it was dropped."""
    attempts = cleanup.attempts + 1
    if attempts >= MAX_ATTEMPTS:
        finish(session, cleanup)
        return True
    delay = min(LAST_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (attempts - 1))
    session.execute(
        update(ClusterCleanup)
        .where(_held(cleanup))
        .values(attempts=attempts, last_error=error[:_ERROR_CHARS], next_attempt_at=now + timedelta(seconds=delay))
        .execution_options(synchronize_session=False)
    )
    return False


def _held(cleanup: Cleanup):  # type: ignore[no-untyped-def]
    # Still this sweep's: its claim not taken over by another sweep after it ran out.
    return (ClusterCleanup.id == cleanup.id) & (ClusterCleanup.next_attempt_at == cleanup.claimed_until)
