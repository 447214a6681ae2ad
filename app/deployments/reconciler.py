"""The reconciler's database half: which services are due, one pass's lease, what a pass
decides from what it saw, and how the outcome is written.

A pass (workers.deploy.reconcile) is bounded and idempotent: it takes the service's lease,
reads the desired spec here, observes the orchestrator (by the labels on its objects, never
trusting this database about what runs), asks ``decide`` what to do, does it, and writes the
outcome through ``record``: the replicas the scoring gateway routes to, the traffic
generation, the state (through the transition table) and the operation's end. Every write is
fenced by the pass's attempt, so a worker whose lease lapsed mid-pass writes nothing.

Each writer locks the service's row before it touches its replicas, log lines or operations
(``_lock_held``): the order a force delete takes them (app.deployments.lifecycle), so that on
PostgreSQL the two never wait on each other in a circle (a deadlock, one of them failed).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import case, delete, func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from app.deployments.events import record_state_changes
from app.deployments.states import OperationState, ServiceState
from app.deployments.transitions import Transition, bookkeep, move
from app.orm import Account, Image, Service, ServiceLogLine, ServiceOperation, ServiceReplica
from app.orm.base import utcnow

log = logging.getLogger("mms.reconciler")

# How long a pass's lease lasts: longer than any pass (engine calls time out well before).
LEASE_SECONDS = 60
# A due service handed to a worker is not handed out again for this long, unless its pass
# ends sooner (it sets the next due time itself): a lost message costs this much delay.
HANDED_OUT_SECONDS = 30
# The next pass: soon while something moves, rarely once all is well.
BUSY_SECONDS = 1.0
STEADY_SECONDS = 10.0
# A Failed service that runs nothing waits for its tenant (a PATCH or a delete makes it due at
# once): its target (a cluster or swarm of the tenant's, perhaps) is asked about it this rarely.
FAILED_SECONDS = 300.0
# The last lines of a failed generation's output kept in the service's error.
ERROR_LOG_LINES = 40
# ... each cut to this many characters: a replica prints lines of any length, and the error
# is in every GET of the service and in its events.
ERROR_LINE_CHARS = 300
ERROR_REASON_CHARS = 1000
# What the reconciler keeps of what a service's replicas printed: the newest lines.
KEPT_LOG_LINES = 1000
# ... and the newest line of each of at most this many live replicas (where their next copy starts).
MARKED_REPLICAS = 64
# A pass put off (no slot free for it in the worker process that claimed it: workers.deploy
# .pass_slots) is tried again after a quarter of the time it has waited, within these bounds:
# while slots stay taken, a waiting service is claimed and released ever more rarely, and the
# worker whose pass frees a slot, in any process, takes the next one in line at once
# (``next_in_line``), so the longer retries cost no wait when slots free up.
PUT_OFF_SECONDS = 5.0
PUT_OFF_MAX_SECONDS = 20.0


@dataclass(frozen=True)
class Lease:
    service_id: uuid.UUID
    attempt: int
    owner: str
    # The tenant (its subscription, lower-cased, as roles are scoped): its passes share a
    # worker's pass threads with no more than their part (workers.deploy.pass_slots).
    subscription_id: str
    # Whether the service runs on a target the tenant attached (its engine or cluster: its
    # passes take as long as the tenant makes them), as the service recorded when it was made.
    attached: bool
    # Since when its passes have been put off (None: the last one ran).
    put_off_since: datetime | None = None


@dataclass(frozen=True)
class Spec:
    """What the tenant asked for, as this pass reads it."""

    id: uuid.UUID
    account_id: uuid.UUID
    state: ServiceState
    compute_type: str
    compute_name: str  # a built-in target's (local, swarm) or an attached one's
    compute_attached: bool  # an attached one's (stored when the service was made)
    image_id: uuid.UUID
    image_location: str | None  # None until its build (a deploy from models) succeeded
    image_digest: str | None
    generation: int
    traffic_generation: int | None
    replicas: int
    cpu: float
    memory_gb: float
    scoring_timeout_ms: int
    revision: int  # the tenant's changes so far: a pass's verdict lands only on the spec it read
    changed_at: datetime  # when the change being applied was asked for (the start deadline counts from it)
    switched_at: datetime | None
    image_state: str = "Succeeded"  # the image's CreationState (app.builds is not ours to import)
    image_ended_at: datetime | None = None  # when its build ended
    image_error: str | None = None
    name: str = ""
    autoscaler: Mapping[str, Any] | None = None  # deploymentConfig.autoScaler, when one scales it
    auth_enabled: bool = True
    # Per replica, when its newest copied log line was printed (ns since the epoch).
    log_marks: Mapping[str, int] = field(default_factory=dict)
    # What the traffic generation runs while a newer one rolls out: what a roll back restores
    # (None on a row whose rollout began before it was kept: migration 0016).
    serving_image_id: uuid.UUID | None = None
    serving_cpu: float | None = None
    serving_memory_gb: float | None = None
    # The operation of the change this spec is (the service's newest): what a verdict ends.
    operation_id: uuid.UUID | None = None

    @property
    def deleting(self) -> bool:
        return self.state is ServiceState.DELETING

    @property
    def building(self) -> bool:
        """Its image is still being built (deployed from models): nothing to start yet."""
        return self.image_state in ("NotStarted", "Running")

    @property
    def build_failure(self) -> Failure | None:
        if self.building or self.image_state == "Succeeded":
            return None
        why = f": {self.image_error}" if self.image_error else ""
        return Failure(f"building its image {self.image_id} ended {self.image_state}{why} (see the image's build log)")


@dataclass(frozen=True)
class Replica:
    """A replica as the orchestrator shows it; ``ready`` when ``GET /`` answered 200 in this pass."""

    id: str
    generation: int
    image_id: str | None
    address: str | None
    alive: bool  # running, or about to be restarted by the orchestrator
    ready: bool
    exit_code: int | None = None
    oom_killed: bool = False
    restarts: int = 0
    created: float = 0.0  # seconds since the epoch: extras go newest first


@dataclass(frozen=True)
class LogLine:
    """A line a replica printed, stamped by the orchestrator (ns since the epoch)."""

    replica_id: str
    generation: int
    logged_ns: int
    text: str


@dataclass(frozen=True)
class Failure:
    """Why a generation will never serve, and the last lines it printed."""

    reason: str
    logs: str = ""


@dataclass
class Step:
    """What one pass does: replicas to start and to remove, and the state to record."""

    start: int = 0
    remove: list[str] = field(default_factory=list)
    flip_traffic: bool = False
    failure: Failure | None = None  # the desired generation failed (FAIL, or ROLL_BACK of an update)
    # The image the traffic generation's replicas carry in their labels: what a roll back
    # restores on a row that kept no serving spec (a rollout begun before migration 0016).
    roll_back_to_image: str | None = None
    busy: bool = True


def due_services(session: Session, *, limit: int = 50) -> list[uuid.UUID]:
    """Hand out up to ``limit`` services whose next pass is due and whose lease is free, taking
    turns between tenants (subscriptions, as roles are scoped): each tenant's most overdue first,
    then each one's second, and so on. A tenant with thousands of services due (put off again and
    again past its share of the deploy workers' threads, say) never crowds another's out of the
    hand-out. One statement: two beats racing hand each service to one of them (the second's
    UPDATE finds it no longer due)."""
    now = utcnow()
    turn = func.row_number().over(
        partition_by=func.lower(Account.subscription_id), order_by=(Service.due_at, Service.id)
    )
    ranked = (
        select(Service.id, Service.due_at, turn.label("turn"))
        .join(Account, Account.id == Service.account_id)
        .where(Service.due_at <= now, or_(Service.lease_expires_at.is_(None), Service.lease_expires_at < now))
        .subquery()
    )
    due = select(ranked.c.id).order_by(ranked.c.turn, ranked.c.due_at).limit(limit)
    rows = bookkeep(
        session,
        Service.id.in_(due.scalar_subquery()),
        Service.due_at <= now,
        due_at=now + timedelta(seconds=HANDED_OUT_SECONDS),
        handed_out_at=now,  # on its way: a put-off one is no longer parked (next_in_line)
    )
    return [row.id for row in rows]


def mark_due(session: Session, service_id: uuid.UUID) -> None:
    """Ask for a pass as soon as a worker is free (the tenant changed something)."""
    bookkeep(session, Service.id == service_id, due_at=utcnow())


def claim(session: Session, service_id: uuid.UUID, *, owner: str) -> Lease | None:
    """Take the service's lease for one pass; None when another pass holds it or it is gone.
    (Bookkeeping, not a move: the state is left to ``record``.)"""
    now = utcnow()
    rows = bookkeep(
        session,
        Service.id == service_id,
        or_(Service.lease_expires_at.is_(None), Service.lease_expires_at < now),
        returning=(
            Service.attempt,
            Service.account_id,
            Service.compute_attached,
            Service.compute_type,
            Service.put_off_since,
        ),
        attempt=Service.attempt + 1,
        lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=LEASE_SECONDS),
    )
    if not rows:
        return None
    # Lower-cased here as roles' scopes are (a database's lower() follows its collation).
    subscription = session.execute(select(Account.subscription_id).where(Account.id == rows[0].account_id))
    row = rows[0]
    attached = bool(row.compute_attached) or row.compute_type == "kubernetes"  # never the operator's
    return Lease(service_id, row.attempt, owner, subscription.scalar_one().lower(), attached, row.put_off_since)


def _attached():  # type: ignore[no-untyped-def]
    """A service on a target its tenant attached, as ``claim`` judges it (a cluster always is)."""
    return Service.compute_attached | (Service.compute_type == "kubernetes")


def put_off_delay(waited: float) -> float:
    """How much later a pass put off after ``waited`` seconds of waiting is tried again."""
    return min(PUT_OFF_MAX_SECONDS, max(PUT_OFF_SECONDS, waited / 4))


def put_off(session: Session, lease: Lease) -> float:
    """Give the lease back: no slot was free for the pass. The service keeps its place in line
    (since when it waits) and is tried again after ``put_off_delay``; returns that delay."""
    now = utcnow()
    since = lease.put_off_since or now
    delay = put_off_delay((now - since).total_seconds())
    _bookkeep(
        session,
        _held(lease),
        lease_owner=None,
        lease_expires_at=None,
        due_at=now + timedelta(seconds=delay),
        put_off_since=since,
        handed_out_at=None,  # parked
    )
    return delay


def taken_up(session: Session, lease: Lease) -> None:
    """The pass has its slot: the service leaves the line."""
    _bookkeep(session, _held(lease), put_off_since=None)


class Room(NamedTuple):
    """What a worker process has room for now (workers.deploy.pass_slots): a pass on a target its
    tenant attached (``attached``) or only on the operator's, but not for these tenants' passes
    (``full``: at their share) nor their passes on attached targets (``attached_full``)."""

    attached: bool
    full: frozenset[str]
    attached_full: frozenset[str]


def next_in_line(session: Session, *, attached: bool, room: Room) -> uuid.UUID | None:
    """The service whose pass should take the slot a pass just freed (the worker that freed it
    claims it at once: workers.deploy.reconcile), or None when none waits that fits ``room``.
    Of the services put off and parked for their retry, whichever worker process put them off:
    one of the freed slot's kind first (``attached``: on a target its tenant attached), then the
    one whose tenant (subscription) runs the fewest passes of that kind now in every worker
    process (their leases say), then the longest waiting. One statement, whose cost grows with
    the passes running and the services waiting, not with a tenant's services."""
    now = utcnow()
    tenant = func.lower(Account.subscription_id)
    running = (
        select(tenant.label("tenant"), func.count().label("passes"))
        .select_from(Service)
        .join(Account, Account.id == Service.account_id)
        .where(Service.lease_expires_at > now, _attached() if attached else ~_attached())
        .group_by(tenant)
        .cte("running")
    )
    fits = []
    if room.full:
        fits.append(tenant.not_in(sorted(room.full)))
    if not room.attached:
        fits.append(~_attached())
    elif room.attached_full:
        fits.append(or_(~_attached(), tenant.not_in(sorted(room.attached_full))))
    other_kind = case((_attached(), 0), else_=1) if attached else case((_attached(), 1), else_=0)
    return session.scalar(
        select(Service.id)
        .join(Account, Account.id == Service.account_id)
        .outerjoin(running, running.c.tenant == tenant)
        .where(
            Service.put_off_since.is_not(None),
            # Parked for its retry: neither handed out nor due (on their way to a worker).
            Service.handed_out_at.is_(None),
            Service.due_at > now,
            or_(Service.lease_expires_at.is_(None), Service.lease_expires_at < now),
            *fits,
        )
        .order_by(other_kind, func.coalesce(running.c.passes, 0), Service.put_off_since, Service.id)
        .limit(1)
    )


def renew(session: Session, lease: Lease) -> bool:
    """Extend the pass's lease by LEASE_SECONDS from now, while it is still this pass's (a long
    image pull or swarm wait must not let a second pass take the service beside it)."""
    return bool(bookkeep(session, _held(lease), lease_expires_at=utcnow() + timedelta(seconds=LEASE_SECONDS)))


def _held(lease: Lease):  # type: ignore[no-untyped-def]
    return (Service.id == lease.service_id) & (Service.attempt == lease.attempt)


def _unchanged(lease: Lease, spec: Spec):  # type: ignore[no-untyped-def]
    """Still this pass's lease, and the tenant changed nothing since the pass read the spec:
    a verdict on an older spec must not land on a newer one."""
    return _held(lease) & (Service.revision == spec.revision)


def read_spec(session: Session, lease: Lease) -> Spec | None:
    """The desired spec, if the lease is still this pass's."""
    row = session.execute(
        select(
            Service,
            Image.image_location,
            Image.digest,
            Image.state,
            Image.error,
            Image.ended_at,
            _newest_operation(Service.id).label("operation_id"),
        )
        .join(Image, Image.id == Service.image_id)
        .where(_held(lease))
    ).first()
    if row is None:
        return None
    service: Service = row[0]
    return Spec(
        id=service.id,
        account_id=service.account_id,
        state=service.state,
        compute_type=service.compute_type,
        compute_name=service.compute_name,
        compute_attached=service.compute_attached,
        image_id=service.image_id,
        image_location=row.image_location,
        image_digest=row.digest,
        image_state=str(row.state),
        image_ended_at=row.ended_at,
        image_error=row.error,
        generation=service.generation,
        traffic_generation=service.traffic_generation,
        replicas=service.replicas_desired,
        cpu=service.cpu,
        memory_gb=service.memory_gb,
        scoring_timeout_ms=service.scoring_timeout_ms,
        revision=service.revision,
        changed_at=service.changed_at or service.updated_at,
        switched_at=service.switched_at,
        name=service.name,
        autoscaler=service.autoscaler,
        auth_enabled=service.auth_enabled,
        serving_image_id=service.serving_image_id,
        serving_cpu=service.serving_cpu,
        serving_memory_gb=service.serving_memory_gb,
        operation_id=row.operation_id,
        log_marks={
            replica_id: mark
            for replica_id, mark in session.execute(
                select(ServiceLogLine.replica_id, func.max(ServiceLogLine.logged_ns))
                .where(ServiceLogLine.service_id == service.id)
                .group_by(ServiceLogLine.replica_id)
            )
        },
    )


def _newest_operation(service_id):  # type: ignore[no-untyped-def]
    """The id of the service's newest operation (as the API shows it: app.deployments.lifecycle's
    latest_operations), read in the same statement as the spec: the change that spec is."""
    return (
        select(ServiceOperation.id)
        .where(ServiceOperation.service_id == service_id)
        .order_by(ServiceOperation.created_at.desc(), ServiceOperation.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def decide(
    spec: Spec,
    replicas: Sequence[Replica],
    *,
    now: datetime,
    start_seconds: float,
    drain_seconds: float,
    failure: Failure | None = None,
) -> Step:
    """What this pass does, from what it saw; pure (tested without an orchestrator).

    ``failure``: the driver's verdict on the desired generation (a replica that exited
    before it ever served, restarts exhausted), which ends its rollout.
    """
    generation, traffic = spec.generation, spec.traffic_generation
    step = Step()
    if spec.state is ServiceState.FAILED:
        # Nothing runs until the tenant changes it (a PATCH makes it Transitioning again).
        step.remove = [r.id for r in replicas]
        step.busy = False
        return step
    current = [r for r in replicas if r.generation == generation]
    alive = [r for r in current if r.alive]
    # Stopped for good (killed from outside, or restarts exhausted): replaced below, or the
    # generation failed.
    step.remove += [r.id for r in current if not r.alive]
    serving = traffic == generation

    # The start deadline counts from the change, or from the end of the image's build when the
    # service waited for one (deployed from models): a long build is no slow start.
    started = max(spec.changed_at, spec.image_ended_at or spec.changed_at)
    late = now > started + timedelta(seconds=start_seconds)
    if failure is None and not serving and late:
        ready = sum(r.ready for r in alive)
        failure = Failure(
            f"{ready} of {spec.replicas} replicas answered GET / within {start_seconds:g} s (MMS_SERVICE_START_SECONDS)"
        )
    if failure is not None and not serving:
        step.failure = failure
        step.remove += [r.id for r in alive]
        if traffic is not None:
            old = next((r.image_id for r in replicas if r.generation == traffic and r.image_id), None)
            step.roll_back_to_image = old
        step.remove += _old_generations(
            replicas, spec, traffic=traffic, switched_at=spec.switched_at, now=now, drain_seconds=drain_seconds
        )
        step.busy = traffic is not None  # a rolled-back service goes on being watched
        return step

    # Too many (scaled down): the ones not ready first, then the newest.
    extra = len(alive) - spec.replicas
    if extra > 0:
        for replica in sorted(alive, key=lambda r: (r.ready, -r.created))[:extra]:
            step.remove.append(replica.id)
        alive = [r for r in alive if r.id not in step.remove]
    step.start = max(0, spec.replicas - len(alive))
    ready = sum(r.ready for r in alive)
    if ready >= spec.replicas and not serving:
        step.flip_traffic = True
        serving = True
    step.remove += _old_generations(
        replicas,
        spec,
        traffic=generation if serving else traffic,
        switched_at=now if step.flip_traffic else spec.switched_at,
        now=now,
        drain_seconds=drain_seconds,
    )
    settled = serving and ready >= spec.replicas and step.start == 0
    if not settled and serving and not step.flip_traffic and spec.state is ServiceState.TRANSITIONING and late:
        # A scale-up whose new replicas never answer: the operation ends, the service is
        # Unhealthy (the ready ones serve on, the rest are still tried) and may be changed again.
        step.failure = Failure(
            f"{ready} of {spec.replicas} replicas answered GET / within {start_seconds:g} s (MMS_SERVICE_START_SECONDS)"
        )
    draining = any(r.generation != generation for r in replicas if r.id not in step.remove)
    step.busy = not settled or draining or bool(step.remove)
    return step


def _old_generations(
    replicas: Sequence[Replica],
    spec: Spec,
    *,
    traffic: int | None,
    switched_at: datetime | None,
    now: datetime,
    drain_seconds: float,
) -> list[str]:
    """Replicas of generations no longer wanted: the one taking traffic stays until the new
    one takes it, and after a switch the old ones drain for ``drain_seconds``. A generation
    above the traffic one never took traffic (numbers are never given twice): nothing to drain."""
    draining = switched_at is not None and now < switched_at + timedelta(seconds=drain_seconds)
    gone = []
    for replica in replicas:
        if replica.generation == spec.generation or replica.generation == traffic:
            continue
        if draining and traffic is not None and replica.generation < traffic:
            continue
        gone.append(replica.id)
    return gone


def record(
    session: Session,
    lease: Lease,
    spec: Spec,
    step: Step,
    replicas: Sequence[Replica],
    *,
    now: datetime,
    scoring_url: str,
    lines: Sequence[LogLine] = (),
    endpoint: str | None = None,
) -> bool:
    """Write what the pass saw and did; False (nothing written) when the lease was lost.
    A verdict that changes the state records its event (``scoring_url``: the scoring gateway's
    address, for the event's scoringUri); a pass that finds all as it was records none.

    ``endpoint``: where the orchestrator says the service is reached when its traffic does not
    pass the scoring gateway (kubernetes: the Service's cluster address); None elsewhere.
    When the tenant changed the service meanwhile, the replicas are written but no verdict:
    the next pass, due at once, judges the new spec."""
    if not _lock_held(session, lease):
        return False
    removed = set(step.remove)
    _write_replicas(session, spec.id, [r for r in replicas if r.id not in removed and r.alive and r.address], now)
    _write_logs(session, spec.id, lines, [r.id for r in replicas if r.alive and r.id not in removed][:MARKED_REPLICAS])
    released: dict[str, object] = {"lease_owner": None, "lease_expires_at": None}
    values = released | {
        "due_at": now + timedelta(seconds=BUSY_SECONDS if step.busy else STEADY_SECONDS),
        "endpoint": endpoint,
    }
    current_ready = sum(r.ready for r in replicas if r.generation == spec.generation and r.id not in removed)
    traffic = spec.traffic_generation
    if step.flip_traffic:
        traffic = spec.generation
        values |= {"traffic_generation": spec.generation, "switched_at": now} | _NOTHING_KEPT
    fence = _unchanged(lease, spec)

    if spec.state is ServiceState.FAILED:
        # It waits for a change (a PATCH makes it due at once). Only once a pass finds nothing of
        # it left is it looked at rarely: one that removes leftovers looks again soon.
        # (``step.busy``: the pass knows of leftovers it did not see, a swarm's older generations.)
        leftovers = step.busy or any(r.alive for r in replicas)
        values["due_at"] = now + timedelta(seconds=STEADY_SECONDS if leftovers else FAILED_SECONDS)
    if step.failure is not None and spec.state is ServiceState.FAILED:
        # It says so already.
        if _bookkeep(session, fence, **released, due_at=values["due_at"]):
            return True
    elif step.failure is not None and spec.traffic_generation == spec.generation:
        values["replicas_ready"] = current_ready
        if move(
            session, Transition.DEGRADE, fence, error=_failure_text(step.failure), scoring_url=scoring_url, **values
        ):
            _end_operation(session, spec.operation_id, OperationState.FAILED, _failure_text(step.failure))
            return True
    elif step.failure is not None:
        error = _failure_text(step.failure)
        if spec.traffic_generation is None:
            moved = move(
                session, Transition.FAIL, fence, error=error, replicas_ready=0, scoring_url=scoring_url, **values
            )
        else:
            old_ready = sum(r.ready for r in replicas if r.generation == spec.traffic_generation)
            target = ServiceState.HEALTHY if old_ready >= spec.replicas else ServiceState.UNHEALTHY
            rollback: dict[str, object] = {"generation": spec.traffic_generation, "replicas_ready": old_ready}
            rollback |= _served_spec(session, spec, step)
            moved = move(
                session,
                Transition.ROLL_BACK,
                fence,
                to=target,
                error=f"the update was rolled back: {error}",
                scoring_url=scoring_url,
                **rollback,
                **values,
            )
        if moved:
            _end_operation(session, spec.operation_id, OperationState.FAILED, error)
            return True
    else:
        values["replicas_ready"] = current_ready if traffic == spec.generation else 0
        settled = traffic == spec.generation and current_ready >= spec.replicas and step.start == 0
        if settled and spec.state in (ServiceState.TRANSITIONING, ServiceState.UNHEALTHY):
            if move(session, Transition.CONVERGE, fence, error=None, scoring_url=scoring_url, **values):
                _end_operation(session, spec.operation_id, OperationState.SUCCEEDED, None)
                return True
        elif not settled and traffic == spec.generation and spec.state is ServiceState.HEALTHY:
            lost = f"{current_ready} of {spec.replicas} replicas answer GET /: replacing the others"
            if move(session, Transition.DEGRADE, fence, error=lost, scoring_url=scoring_url, **values):
                return True
        else:  # the state stays as it is
            # A new address the orchestrator reports (kubernetes) is a new scoringUri: an event,
            # as a move's is; replica counts alone are not.
            readdressed = endpoint is not None and endpoint != session.scalar(
                select(Service.endpoint).where(Service.id == spec.id)
            )
            if _bookkeep(session, fence, **values):
                if readdressed:
                    record_state_changes(session, [spec.id], scoring_url=scoring_url)
                return True
    # No move applied: the tenant changed the service during the pass (look again at once), or
    # the state is not one the verdict moves from (look again as planned).
    changed = session.scalar(select(Service.id).where(_unchanged(lease, spec))) is None
    _bookkeep(session, _held(lease), **released, due_at=now if changed else values["due_at"])
    return True


# The serving spec, forgotten once the spec is what serves (a new generation took traffic, or a roll back).
_NOTHING_KEPT: Mapping[str, object] = {"serving_image_id": None, "serving_cpu": None, "serving_memory_gb": None}


def _served_spec(session: Session, spec: Spec, step: Step) -> dict[str, object]:
    """What a roll back writes back: the serving spec the update kept (whatever the
    orchestrator still shows, and also when the pass saw nothing: a target that refused the new
    spec); on a row that kept none, the image the old replicas' labels name, if the account holds it."""
    restored: dict[str, object] = dict(_NOTHING_KEPT)  # the spec is what serves again
    if spec.serving_image_id is not None:
        restored["image_id"] = spec.serving_image_id
    elif (labelled := _account_image(session, spec, step.roll_back_to_image)) is not None:
        restored["image_id"] = labelled
    if spec.serving_cpu is not None and spec.serving_memory_gb is not None:
        restored |= {"cpu": spec.serving_cpu, "memory_gb": spec.serving_memory_gb}
    return restored


def _account_image(session: Session, spec: Spec, image_id: str | None) -> uuid.UUID | None:
    """``image_id`` (read from a label) if it is an image of the service's account: on a
    tenant's cluster the tenant sets the labels, and an image deleted since would fail the
    write (its foreign key)."""
    try:
        parsed = uuid.UUID(image_id) if image_id else None
    except ValueError:
        return None
    if parsed is None:
        return None
    return session.scalar(select(Image.id).where(Image.id == parsed, Image.account_id == spec.account_id))


def record_unreachable(
    session: Session,
    lease: Lease,
    spec: Spec,
    reason: str,
    *,
    now: datetime,
    scoring_url: str,
    forget_replicas: bool = False,
) -> bool:
    """The orchestrator did not answer: the service is Unhealthy (the replicas the gateway
    knows keep serving if they can, unless ``forget_replicas``: a tenant's hosts, whose
    addresses nothing vouches for once its engine is away); tried again soon. (``scoring_url``:
    as for ``record``; ``reason`` is cut as a failure's is.)"""
    if not _lock_held(session, lease):
        return False
    values: dict[str, object] = {
        "lease_owner": None,
        "lease_expires_at": None,
        "due_at": now + timedelta(seconds=STEADY_SECONDS / 2),
    }
    if forget_replicas:
        stop_routing(session, lease)
        values["replicas_ready"] = 0
    degradable = spec.state in (ServiceState.HEALTHY, ServiceState.TRANSITIONING)
    fence = _unchanged(lease, spec)
    error = reason[:ERROR_REASON_CHARS]
    if degradable and move(session, Transition.DEGRADE, fence, error=error, scoring_url=scoring_url, **values):
        return True
    return _bookkeep(session, _held(lease), **values)


def stop_routing(session: Session, lease: Lease) -> bool:
    """A deleted service's first step: the gateway routes to it no more (the rows of its
    replicas go). True when there were rows: gateways may still hold their addresses for their
    cache period, and those addresses are freed with the service's network."""
    if not _lock_held(session, lease):
        return False
    gone = session.execute(delete(ServiceReplica).where(ServiceReplica.service_id == lease.service_id))
    return bool(gone.rowcount)


def finish_delete(session: Session, lease: Lease) -> bool:
    """The orchestrator holds nothing of the service: end its Delete operation, then the row."""
    if not _lock_held(session, lease):
        return False
    newest = session.scalar(select(_newest_operation(Service.id)).where(Service.id == lease.service_id))
    _end_operation(session, newest, OperationState.SUCCEEDED, None)  # the newest: the Delete's
    return bool(move(session, Transition.DELETE, _held(lease), to=None))


def release(session: Session, lease: Lease, *, due_in: float) -> None:
    """Give the lease back without a verdict (the pass could not finish); tried again in ``due_in``.
    The pass had its slot: the service is no longer in line."""
    due_at = utcnow() + timedelta(seconds=due_in)
    _bookkeep(session, _held(lease), lease_owner=None, lease_expires_at=None, due_at=due_at, put_off_since=None)


def _lock_held(session: Session, lease: Lease) -> bool:
    """Whether the lease is still this pass's; if so the service's row stays locked until the
    commit. Taken first, as a force delete takes it before it deletes the replicas, log lines
    and operations hanging off the row: a writer of those that took their locks first (an
    insert's foreign key check also locks the row) would wait on the force delete while it
    waits on them. (SQLite locks the whole database: nothing to order.)"""
    return session.scalar(select(Service.id).where(_held(lease)).with_for_update()) is not None


def _bookkeep(session: Session, where, **values: object) -> bool:  # type: ignore[no-untyped-def]
    return bool(bookkeep(session, where, **values))


def _write_replicas(session: Session, service_id: uuid.UUID, replicas: Sequence[Replica], now: datetime) -> None:
    """The replicas the gateway may route to: exactly those seen alive in this pass."""
    session.execute(delete(ServiceReplica).where(ServiceReplica.service_id == service_id))
    for replica in replicas:
        assert replica.address is not None
        session.add(
            ServiceReplica(
                service_id=service_id,
                generation=replica.generation,
                replica_id=replica.id,
                address=replica.address,
                ready=replica.ready,
                observed_at=now,
            )
        )
    session.flush()


def _write_logs(session: Session, service_id: uuid.UUID, lines: Sequence[LogLine], live: Sequence[str]) -> None:
    """Add the pass's new lines, then forget all but the service's newest KEPT_LOG_LINES, and
    the newest line of each ``live`` replica: that line is where the next pass's copy of it
    starts (``read_spec``'s ``log_marks``). Without it, a quiet replica's lines trimmed away
    behind a chatty one's would be copied again from its tail, repeating lines already shown."""
    if not lines:
        return
    session.add_all(
        ServiceLogLine(
            service_id=service_id,
            generation=line.generation,
            replica_id=line.replica_id,
            logged_ns=line.logged_ns,
            text=line.text,
        )
        for line in sorted(lines, key=lambda line: line.logged_ns)
    )
    session.flush()
    oldest_kept = (
        select(ServiceLogLine.id)
        .where(ServiceLogLine.service_id == service_id)
        .order_by(ServiceLogLine.id.desc())
        .offset(KEPT_LOG_LINES - 1)
        .limit(1)
        .scalar_subquery()
    )
    trimmed = delete(ServiceLogLine).where(ServiceLogLine.service_id == service_id, ServiceLogLine.id < oldest_kept)
    if live:
        marks = (
            select(ServiceLogLine.replica_id, func.max(ServiceLogLine.logged_ns))
            .where(ServiceLogLine.service_id == service_id, ServiceLogLine.replica_id.in_(live))
            .group_by(ServiceLogLine.replica_id)
        )
        trimmed = trimmed.where(tuple_(ServiceLogLine.replica_id, ServiceLogLine.logged_ns).not_in(marks))
    session.execute(trimmed)


def _end_operation(session: Session, operation_id: uuid.UUID | None, state: OperationState, error: str | None) -> None:
    """End the one operation a verdict is about, if it is still running (None: a row from
    before operations were recorded has none). Never the service's other operations: an
    older change's is not this verdict's to end."""
    if operation_id is None:
        return
    session.execute(
        update(ServiceOperation)
        .where(ServiceOperation.id == operation_id, ServiceOperation.state == OperationState.RUNNING)
        .values(state=state, error=error, ended_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def _failure_text(failure: Failure) -> str:
    # The reason may quote what a tenant's engine or cluster said: cut like the log lines, so
    # the row, its events and webhooks stay small whatever it said.
    reason = failure.reason[:ERROR_REASON_CHARS]
    lines = [line[:ERROR_LINE_CHARS] for line in failure.logs.splitlines() if line.strip()][-ERROR_LOG_LINES:]
    if not lines:
        return reason
    return reason + "\nlast lines of its output:\n" + "\n".join(lines)
