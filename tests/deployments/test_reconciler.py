"""The reconciler's database half: handing out due services, the fenced lease, the decision
from what a pass saw (pure), and how its outcome lands (or does not, on a changed spec)."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from app.builds.states import CreationState
from app.deployments import OperationState, ServiceState
from app.deployments.lifecycle import request_delete, update_service
from app.deployments.reconciler import (
    ERROR_REASON_CHARS,
    FAILED_SECONDS,
    HANDED_OUT_SECONDS,
    PUT_OFF_SECONDS,
    STEADY_SECONDS,
    Failure,
    Replica,
    Room,
    Spec,
    Step,
    claim,
    decide,
    due_services,
    finish_delete,
    next_in_line,
    put_off,
    put_off_delay,
    read_spec,
    record,
    record_unreachable,
    release,
    renew,
    taken_up,
)
from app.orm import Account, Image, Service, ServiceOperation, ServiceReplica
from app.orm.base import utcnow
from app.schemas.services import ServiceUpdate
from app.services import services_deploy
from app.services.accounts import AccountRef
from tests.factories import new_service_row

NOW = utcnow()
SCORING_URL = "http://127.0.0.1:8001"


def _spec(**changes: object) -> Spec:
    fields: dict[str, object] = {
        "id": uuid.uuid4(),
        "account_id": uuid.uuid4(),
        "state": ServiceState.TRANSITIONING,
        "compute_type": "local",
        "compute_name": "local",
        "compute_attached": False,
        "image_id": uuid.uuid4(),
        "image_location": "127.0.0.1:5000/a/b:1",
        "image_digest": "sha256:" + "0" * 64,
        "generation": 1,
        "traffic_generation": None,
        "replicas": 2,
        "cpu": 0.5,
        "memory_gb": 0.5,
        "scoring_timeout_ms": 60000,
        "revision": 0,
        "changed_at": NOW - timedelta(seconds=5),
        "switched_at": None,
    }
    return Spec(**(fields | changes))  # type: ignore[arg-type]


def _replica(generation: int = 1, *, ready: bool = True, alive: bool = True, n: int = 0) -> Replica:
    return Replica(
        id=f"c{generation}-{n}-{uuid.uuid4().hex[:6]}",
        generation=generation,
        image_id=None,
        address=f"10.213.0.{n + 2}:5001",
        alive=alive,
        ready=ready,
        created=float(n),
    )


def _decide(spec: Spec, replicas: list[Replica], failure: Failure | None = None):  # type: ignore[no-untyped-def]
    return decide(spec, replicas, now=NOW, start_seconds=60, drain_seconds=10, failure=failure)


# -- the decision -------------------------------------------------------------------------


def test_a_new_service_starts_its_replicas() -> None:
    step = _decide(_spec(), [])
    assert (step.start, step.remove, step.flip_traffic, step.failure) == (2, [], False, None)
    assert step.busy


def test_traffic_moves_once_every_replica_answers() -> None:
    assert not _decide(_spec(), [_replica(n=0), _replica(ready=False, n=1)]).flip_traffic
    step = _decide(_spec(), [_replica(n=0), _replica(n=1)])
    assert step.flip_traffic and step.start == 0 and step.remove == []


def test_a_settled_service_is_looked_at_rarely() -> None:
    step = _decide(_spec(state=ServiceState.HEALTHY, traffic_generation=1), [_replica(n=0), _replica(n=1)])
    assert not step.busy and step.start == 0 and not step.flip_traffic


def test_a_replica_stopped_for_good_is_removed_and_replaced() -> None:
    dead = _replica(alive=False, ready=False, n=1)
    step = _decide(_spec(state=ServiceState.HEALTHY, traffic_generation=1), [_replica(n=0), dead])
    assert step.remove == [dead.id] and step.start == 1 and step.failure is None


def test_scaling_down_removes_the_newest_ready_last() -> None:
    replicas = [_replica(n=0), _replica(ready=False, n=1), _replica(n=2)]
    step = _decide(_spec(traffic_generation=1, replicas=1), replicas)
    assert step.remove == [replicas[1].id, replicas[2].id] and step.start == 0


def test_a_generation_that_never_served_fails_with_the_drivers_reason() -> None:
    replicas = [_replica(ready=False, n=0), _replica(alive=False, ready=False, n=1)]
    step = _decide(_spec(), replicas, Failure("a replica exited with code 3", "RuntimeError: boom"))
    assert step.failure is not None and step.failure.logs == "RuntimeError: boom"
    assert sorted(step.remove) == sorted(r.id for r in replicas) and step.start == 0


def test_a_failed_service_runs_nothing_and_is_looked_at_rarely() -> None:
    leftover = _replica(ready=False, n=0)
    step = _decide(_spec(state=ServiceState.FAILED, changed_at=NOW - timedelta(hours=1)), [leftover])
    assert (step.start, step.remove, step.failure, step.busy) == (0, [leftover.id], None, False)


def test_a_generation_past_its_start_deadline_fails() -> None:
    late = _spec(changed_at=NOW - timedelta(seconds=61))
    step = _decide(late, [_replica(n=0), _replica(ready=False, n=1)])
    assert step.failure is not None and "1 of 2 replicas answered GET / within 60 s" in step.failure.reason


def test_an_update_keeps_the_old_generation_serving_until_the_new_one_answers() -> None:
    old = [_replica(1, n=0), _replica(1, n=1)]
    update = _spec(state=ServiceState.TRANSITIONING, generation=2, traffic_generation=1)
    step = _decide(update, old)
    assert step.start == 2 and step.remove == [] and not step.flip_traffic
    new = [_replica(2, n=2), _replica(2, n=3)]
    step = _decide(update, old + new)
    assert step.flip_traffic and step.remove == []  # the old one drains first


def test_the_old_generation_goes_once_drained() -> None:
    old, new = [_replica(1, n=0)], [_replica(2, n=1)]
    switched = _spec(generation=2, traffic_generation=2, replicas=1, switched_at=NOW - timedelta(seconds=5))
    assert _decide(switched, old + new).remove == []
    drained = _spec(generation=2, traffic_generation=2, replicas=1, switched_at=NOW - timedelta(seconds=11))
    step = _decide(drained, old + new)
    assert step.remove == [old[0].id]


def test_a_failed_update_is_rolled_back_to_the_image_the_old_generation_runs() -> None:
    image = str(uuid.uuid4())
    old = [Replica("o", 1, image, "10.0.0.2:5001", alive=True, ready=True)]
    new = [_replica(2, alive=False, ready=False, n=1)]
    step = _decide(_spec(generation=2, traffic_generation=1, replicas=1), old + new, Failure("exited"))
    assert step.failure is not None and step.roll_back_to_image == image
    assert step.remove == [new[0].id]


# -- the database half ---------------------------------------------------------------------


def test_a_due_service_is_handed_out_once_until_its_pass_ends(db: Session, service: Service) -> None:
    service.due_at = utcnow() - timedelta(seconds=1)
    db.flush()
    assert service.id in due_services(db)
    assert service.id not in due_services(db)  # handed out: not again while its pass may run


def test_the_hand_out_takes_turns_between_tenants(db: Session) -> None:
    """A tenant with 60 services long overdue (put off again and again, say) and one with two
    just due: each tenant's first, then each one's second, so the small tenant's are handed out
    in the same beat, not after the crowd's (by due time alone they would all wait)."""
    crowd = new_service_row(db, name="c0")
    crowd_services = [crowd] + [new_service_row(db, db.get(Image, crowd.image_id), name=f"c{i}") for i in range(1, 60)]
    small = new_service_row(db, name="s0")
    small_services = [small, new_service_row(db, db.get(Image, small.image_id), name="s1")]
    for account_id, subscription in ((crowd.account_id, "Crowd-Sub"), (small.account_id, "small-sub")):
        db.get(Account, account_id).subscription_id = subscription  # type: ignore[union-attr]
    long_ago, now = utcnow() - timedelta(days=1), utcnow()
    for n, row in enumerate(crowd_services):
        row.due_at = long_ago + timedelta(seconds=n)
    for row in small_services:
        row.due_at = now - timedelta(seconds=1)
    db.flush()
    handed = set(due_services(db, limit=20))
    assert {row.id for row in small_services} <= handed
    assert len(handed) == 20 and len(handed & {row.id for row in crowd_services}) >= 10  # the crowd's too
    assert crowd_services[0].id in handed  # each tenant's most overdue first


ANY = Room(attached=True, full=frozenset(), attached_full=frozenset())  # a worker with room for any pass


def _tenant(db: Session, subscriptions: list[str], count: int, *, attached: bool = True) -> list[Service]:
    """``count`` services, in turn of an account of each of ``subscriptions`` (one tenant: a
    subscription, whatever its case), on a target the tenant attached (or the operator's)."""
    images = []
    for subscription in subscriptions:
        first = new_service_row(db, name="x", compute_name="local")  # the account and its image
        db.get(Account, first.account_id).subscription_id = subscription  # type: ignore[union-attr]
        images.append(db.get(Image, first.image_id))
        db.delete(first)
    where = ("theirs", "swarm") if attached else ("local", "local")
    return [
        new_service_row(
            db,
            images[i % len(images)],
            name=f"t{i}",
            compute_name=where[0],
            compute_type=where[1],
            compute_attached=attached,
        )
        for i in range(count)
    ]


def _waiting(db: Session, rows: list[Service], *, since_seconds_ago: list[int]) -> None:
    """Put off (a slot was not free), each since that long ago: parked for a retry."""
    now = utcnow()
    for row, ago in zip(rows, since_seconds_ago, strict=True):
        row.put_off_since = now - timedelta(days=1, seconds=ago)  # before any other test's
        row.due_at = now + timedelta(seconds=PUT_OFF_SECONDS)
        row.lease_owner = row.lease_expires_at = None
    db.flush()


def _running(db: Session, row: Service) -> None:
    """Its pass has a slot and runs (its lease held), in some worker process."""
    row.put_off_since = None
    row.lease_owner, row.lease_expires_at = "a worker", utcnow() + timedelta(seconds=60)
    db.flush()


def test_next_in_line_is_the_tenant_with_the_fewest_passes_then_the_longest_waiting(db: Session) -> None:
    """Whichever worker process put them off: the waiting service whose tenant (its accounts'
    subscription, in any case) runs the fewest passes, the longest waiting first; services of
    the freed slot's kind first."""
    db.execute(update(Service).values(put_off_since=None))  # only these wait in this transaction
    crowd = _tenant(db, ["Crowd", "crowd"], 3)  # two accounts of one subscription
    single = _tenant(db, ["single"], 1)
    operators = _tenant(db, ["ops"], 1, attached=False)
    _waiting(db, crowd, since_seconds_ago=[60, 50, 40])
    _waiting(db, single, since_seconds_ago=[30])
    _waiting(db, operators, since_seconds_ago=[100])  # the oldest, but on the operator's target

    taken = []
    for _ in range(4):  # each freed slot on an attached target takes one, which then runs
        service_id = next_in_line(db, attached=True, room=ANY)
        assert service_id is not None
        taken.append(service_id)
        _running(db, db.get(Service, service_id))
    # crowd's oldest (neither runs a pass); single's (crowd runs one: crowd's second, in its
    # other account, waited longer); crowd's (one each); crowd's last.
    assert taken == [crowd[0].id, single[0].id, crowd[1].id, crowd[2].id]
    assert next_in_line(db, attached=True, room=ANY) == operators[0].id  # only one left: of the other kind
    assert next_in_line(db, attached=False, room=ANY) == operators[0].id
    _running(db, operators[0])
    assert next_in_line(db, attached=False, room=ANY) is None


def test_next_in_line_is_parked_and_free_and_counts_the_freed_slots_kind(db: Session) -> None:
    db.execute(update(Service).values(put_off_since=None))
    theirs = _tenant(db, ["theirs"], 3)
    ours = _tenant(db, ["ours"], 1, attached=False)
    _waiting(db, [*theirs, *ours], since_seconds_ago=[90, 80, 70, 10])
    assert next_in_line(db, attached=False, room=ANY) == ours[0].id  # the newest, but of the slot's kind

    theirs[0].lease_owner, theirs[0].lease_expires_at = "a worker", utcnow() + timedelta(seconds=60)  # claimed
    theirs[1].due_at = utcnow() + timedelta(seconds=HANDED_OUT_SECONDS - 15)  # handed out 15 s ago,
    theirs[1].handed_out_at = utcnow() - timedelta(seconds=15)  # its task still queued
    db.flush()
    assert next_in_line(db, attached=True, room=ANY) == theirs[2].id
    theirs[2].due_at = utcnow() - timedelta(seconds=1)  # due: its retry is on its way
    db.flush()
    assert next_in_line(db, attached=True, room=ANY) == ours[0].id  # none of the slot's kind is parked
    theirs[0].lease_expires_at = utcnow() - timedelta(seconds=1)  # its pass died: the lease lapsed
    db.flush()
    assert next_in_line(db, attached=True, room=ANY) == theirs[0].id

    # A tenant's passes on the operator's targets do not count against it for an attached slot.
    busy, idle = _tenant(db, ["busy"], 3), _tenant(db, ["idle"], 1)
    db.execute(update(Service).values(put_off_since=None))
    for row in busy[1:]:
        row.compute_attached, row.compute_name, row.compute_type = False, "local", "local"
        _running(db, row)
    _waiting(db, [busy[0], idle[0]], since_seconds_ago=[20, 10])
    assert next_in_line(db, attached=True, room=ANY) == busy[0].id
    # For a slot on the operator's targets, they do: (none of that kind waits, so) idle's first.
    assert next_in_line(db, attached=False, room=ANY) == idle[0].id


def test_next_in_line_fits_what_the_worker_has_room_for(db: Session) -> None:
    """A service the worker would only put off again is passed over: a tenant at its share in
    this process, attached targets' passes when their share is taken, or that tenant's."""
    db.execute(update(Service).values(put_off_since=None))
    full, other = _tenant(db, ["full"], 2), _tenant(db, ["other"], 1)
    full[1].compute_attached, full[1].compute_name, full[1].compute_type = False, "local", "local"
    _waiting(db, [*full, *other], since_seconds_ago=[30, 20, 10])
    assert next_in_line(db, attached=True, room=ANY) == full[0].id  # the longest waiting
    at_share = Room(attached=True, full=frozenset({"full"}), attached_full=frozenset())
    assert next_in_line(db, attached=True, room=at_share) == other[0].id
    attached_taken = Room(attached=False, full=frozenset(), attached_full=frozenset())
    assert next_in_line(db, attached=True, room=attached_taken) == full[1].id  # on the operator's target
    at_attached_share = Room(attached=True, full=frozenset(), attached_full=frozenset({"full"}))
    assert next_in_line(db, attached=True, room=at_attached_share) == other[0].id
    assert next_in_line(db, attached=False, room=at_attached_share) == full[1].id
    nothing = Room(attached=False, full=frozenset({"full"}), attached_full=frozenset())
    assert next_in_line(db, attached=True, room=nothing) is None


def test_the_hand_out_and_a_pass_take_a_service_out_of_line(db: Session, service: Service) -> None:
    lease = claim(db, service.id, owner="a")
    assert lease is not None
    put_off(db, lease)
    db.refresh(service)
    assert service.put_off_since is not None and service.handed_out_at is None  # parked
    service.due_at = utcnow() - timedelta(seconds=1)
    db.flush()
    assert service.id in due_services(db)
    db.refresh(service)
    assert service.handed_out_at is not None and service.put_off_since is not None  # on its way, in line
    lease = claim(db, service.id, owner="b")
    assert lease is not None
    release(db, lease, due_in=STEADY_SECONDS)  # its pass had a slot and gave up: out of line
    db.refresh(service)
    assert service.put_off_since is None


@pytest.mark.skipif("postgresql" not in os.environ.get("MMS_TEST_DATABASE_URL", ""), reason="PostgreSQL's plans")
def test_next_in_line_counts_each_tenants_passes_once_not_for_each_waiting_service(db: Session) -> None:
    """Its cost grows with the passes running and the services waiting: the passes are counted
    per tenant once (a subquery run for each waiting service took seconds with thousands)."""
    db.execute(update(Service).values(put_off_since=None))
    waiting = _tenant(db, ["many"], 3)
    _waiting(db, waiting, since_seconds_ago=[3, 2, 1])
    statements: list[tuple[str, object]] = []
    connection = db.connection()

    def seen(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append((statement, parameters))

    event.listen(connection, "before_cursor_execute", seen)
    try:
        assert next_in_line(db, attached=True, room=ANY) == waiting[0].id
    finally:
        event.remove(connection, "before_cursor_execute", seen)
    statement, parameters = statements[-1]
    plan = "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN ANALYZE " + statement, parameters))
    assert "SubPlan" not in plan, plan


def test_a_put_off_pass_keeps_its_place_in_line_and_is_retried_more_rarely_as_it_waits(
    db: Session, service: Service
) -> None:
    assert [put_off_delay(waited) for waited in (0, 20, 40, 80, 3600)] == [5, 5, 10, 20, 20]
    lease = claim(db, service.id, owner="a")
    assert lease is not None and lease.put_off_since is None
    before = utcnow()
    assert put_off(db, lease) == PUT_OFF_SECONDS
    db.refresh(service)
    since = service.put_off_since
    assert since is not None and before <= since <= utcnow()
    assert service.lease_owner is None and service.lease_expires_at is None
    assert timedelta(seconds=PUT_OFF_SECONDS - 1) <= service.due_at - before <= timedelta(seconds=PUT_OFF_SECONDS + 1)

    # Another worker process claims it a minute later and has no slot either: the place in line
    # is the first put-off's, and the next try 15 s later.
    service.put_off_since = since = since - timedelta(seconds=60)
    service.due_at = utcnow()
    db.flush()
    lease = claim(db, service.id, owner="b")
    assert lease is not None and lease.put_off_since == since
    assert 14 <= put_off(db, lease) <= 16
    db.refresh(service)
    assert service.put_off_since == since

    lease = claim(db, service.id, owner="c")  # a slot: the pass runs
    assert lease is not None
    taken_up(db, lease)
    db.refresh(service)
    assert service.put_off_since is None
    assert lease.put_off_since == since  # (what it waited for, to the pass that runs it)


def test_one_pass_at_a_time_holds_the_lease(db: Session, service: Service) -> None:
    lease = claim(db, service.id, owner="a")
    assert lease is not None and lease.attempt == 1
    assert claim(db, service.id, owner="b") is None
    service.lease_expires_at = utcnow() - timedelta(seconds=1)  # the first worker died
    db.flush()
    taken = claim(db, service.id, owner="b")
    assert taken is not None and taken.attempt == 2
    # The first pass, fenced off, writes nothing.
    spec = _spec(id=service.id, traffic_generation=1, replicas=1)
    assert not record(db, lease, spec, _decide(spec, [_replica()]), [_replica()], now=utcnow(), scoring_url=SCORING_URL)
    assert read_spec(db, lease) is None


def test_a_pass_renews_only_its_own_lease(db: Session, service: Service) -> None:
    lease = claim(db, service.id, owner="a")
    assert lease is not None
    service.lease_expires_at = utcnow() + timedelta(seconds=1)  # about to lapse: a long pull
    db.flush()
    assert renew(db, lease)
    db.refresh(service)
    assert service.lease_expires_at > utcnow() + timedelta(seconds=50)
    assert claim(db, service.id, owner="b") is None  # renewed: no second pass beside it
    service.lease_expires_at = utcnow() - timedelta(seconds=1)
    db.flush()
    assert claim(db, service.id, owner="b") is not None
    assert not renew(db, lease)  # taken over: the old pass cannot take it back


def _operation(db: Session, service: Service) -> ServiceOperation:
    return db.scalars(
        select(ServiceOperation).where(ServiceOperation.service_id == service.id, ServiceOperation.kind == "Create")
    ).one()


@pytest.fixture()
def created(db: Session, service: Service) -> Service:
    """A service as the API creates it (with its Create operation), on an image with a location."""
    image = db.get_one(Image, service.image_id)
    image.image_location, image.digest = "127.0.0.1:5000/acct/housing:1", "sha256:" + "1" * 64
    db.add(
        ServiceOperation(
            account_id=service.account_id, service_id=service.id, kind="Create", state=OperationState.RUNNING
        )
    )
    db.flush()
    return service


def test_a_converged_pass_makes_the_service_healthy_and_ends_its_operation(db: Session, created: Service) -> None:
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    replicas = [_replica(n=n) for n in range(spec.replicas)]
    assert record(db, lease, spec, _decide(spec, replicas), replicas, now=utcnow(), scoring_url=SCORING_URL)
    db.refresh(created)
    assert created.state is ServiceState.HEALTHY
    assert created.traffic_generation == 1 and created.replicas_ready == spec.replicas
    assert created.lease_owner is None and created.due_at is not None
    assert _operation(db, created).state is OperationState.SUCCEEDED
    routed = db.scalars(select(ServiceReplica.address).where(ServiceReplica.service_id == created.id)).all()
    assert sorted(routed) == sorted(r.address for r in replicas)


def test_a_failed_first_generation_fails_the_service_with_its_last_lines(db: Session, created: Service) -> None:
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    failure = Failure("a replica exited with code 3 4 times before it answered GET /", "Traceback\nValueError: no")
    record(db, lease, spec, _decide(spec, [], failure), [], now=utcnow(), scoring_url=SCORING_URL)
    db.refresh(created)
    assert created.state is ServiceState.FAILED
    assert created.error is not None and "ValueError: no" in created.error
    assert _operation(db, created).state is OperationState.FAILED


def test_a_failure_reason_of_any_length_is_stored_cut(db: Session, created: Service) -> None:
    """A reason may quote what a tenant's engine said (a task's error): megabytes of it must not
    reach the row, its events and its webhooks."""
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    failure = Failure("swarm could not run a replica: " + "E" * 4_000_000, "")
    record(db, lease, spec, _decide(spec, [], failure), [], now=utcnow(), scoring_url=SCORING_URL)
    db.refresh(created)
    assert created.error is not None and created.error.startswith("swarm could not run a replica: EEE")
    assert len(created.error) <= ERROR_REASON_CHARS


def test_a_verdict_on_an_older_spec_does_not_land(db: Session, created: Service) -> None:
    created.state = ServiceState.HEALTHY
    created.traffic_generation = 1
    db.flush()
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    # The tenant scales up while the pass looks: the pass saw the old count, all ready.
    update_service(
        db, created, scoring_url=SCORING_URL, num_replicas=spec.replicas + 1, replicas_desired=spec.replicas + 1
    )
    replicas = [_replica(n=n) for n in range(spec.replicas)]
    assert record(db, lease, spec, _decide(spec, replicas), replicas, now=utcnow(), scoring_url=SCORING_URL)
    db.refresh(created)
    assert created.state is ServiceState.TRANSITIONING  # not made Healthy on the old count
    assert created.lease_owner is None and created.due_at is not None and created.due_at <= utcnow()


def test_an_unreachable_engine_makes_a_healthy_service_unhealthy(db: Session, created: Service) -> None:
    created.state = ServiceState.HEALTHY
    db.flush()
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    assert record_unreachable(
        db, lease, spec, "the Docker engine did not answer", now=utcnow(), scoring_url=SCORING_URL
    )
    db.refresh(created)
    assert (created.state, created.error) == (ServiceState.UNHEALTHY, "the Docker engine did not answer")


def test_an_unreachable_tenant_swarm_leaves_the_gateway_no_address_of_it(db: Session, created: Service) -> None:
    """A tenant's engine away: the addresses its tasks had are another's host, vouched for by
    nothing now (the host may serve another service later), so the gateway routes to none of
    them; the replicas of our own engines are kept (they serve on if they can). The reason,
    which may quote what an engine said, is cut as a failure's is."""
    created.traffic_generation = 1
    replicas = [_replica(n=n) for n in range(2)]
    for keep, forget in ((True, False), (False, True)):
        created.state, created.error = ServiceState.HEALTHY, None
        db.flush()
        lease = claim(db, created.id, owner="w")
        assert lease is not None
        spec = read_spec(db, lease)
        assert spec is not None
        assert record(db, lease, spec, Step(busy=False), replicas, now=utcnow(), scoring_url=SCORING_URL)
        lease = claim(db, created.id, owner="w")
        assert lease is not None and (spec := read_spec(db, lease)) is not None
        said = "the swarm's engine did not answer: " + "x" * 70_000
        assert record_unreachable(db, lease, spec, said, now=utcnow(), scoring_url=SCORING_URL, forget_replicas=forget)
        rows = db.scalars(select(ServiceReplica.address).where(ServiceReplica.service_id == created.id)).all()
        assert (len(rows) == 2) is keep, rows
        db.refresh(created)
        assert created.state is ServiceState.UNHEALTHY and len(created.error or "") == ERROR_REASON_CHARS
        assert created.replicas_ready == (2 if keep else 0)


def test_a_delete_ends_its_operation_then_the_row(db: Session, created: Service) -> None:
    operation = request_delete(db, created, scoring_url=SCORING_URL)
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    assert finish_delete(db, lease)
    assert db.scalar(select(Service.id).where(Service.id == created.id)) is None
    ended = db.scalar(select(ServiceOperation.state).where(ServiceOperation.id == operation.id))
    assert ended is OperationState.SUCCEEDED


def test_a_verdict_ends_only_the_operation_of_the_change_it_judged(db: Session, created: Service) -> None:
    """Two operations running at once (a PATCH is refused while one runs, but a verdict must not
    count on it): the pass's verdict ends the newest, the change its spec is, and no other."""
    older = _operation(db, created)
    older.created_at = utcnow() - timedelta(seconds=5)
    newer = ServiceOperation(
        account_id=created.account_id, service_id=created.id, kind="Update", state=OperationState.RUNNING
    )
    db.add(newer)
    db.flush()
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    replicas = [_replica(n=n) for n in range(spec.replicas)]
    assert record(db, lease, spec, _decide(spec, replicas), replicas, now=utcnow(), scoring_url=SCORING_URL)
    db.refresh(older)
    db.refresh(newer)
    assert newer.state is OperationState.SUCCEEDED
    assert (older.state, older.ended_at) == (OperationState.RUNNING, None)


def test_a_delete_during_a_change_fails_that_change_and_ends_only_the_delete(db: Session, created: Service) -> None:
    create = _operation(db, created)
    create.created_at = utcnow() - timedelta(seconds=5)
    db.flush()
    delete = request_delete(db, created, scoring_url=SCORING_URL)  # still Transitioning: the create never lands
    db.refresh(create)
    assert (create.state, create.error) == (
        OperationState.FAILED,
        "the service was deleted before this change was applied",
    )
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    assert finish_delete(db, lease)
    db.refresh(create)
    assert db.scalar(select(ServiceOperation.state).where(ServiceOperation.id == delete.id)) is OperationState.SUCCEEDED
    assert create.state is OperationState.FAILED  # not made a success by the delete's end


def test_a_failure_seen_again_on_a_failed_service_waits_for_a_change(db: Session, created: Service) -> None:
    created.state = ServiceState.FAILED
    db.flush()
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    now = utcnow()
    assert record(db, lease, spec, Step(failure=Failure("still no kubernetes")), [], now=now, scoring_url=SCORING_URL)
    db.refresh(created)
    assert created.state is ServiceState.FAILED and created.lease_owner is None
    assert created.due_at is not None and created.due_at >= now + timedelta(seconds=5)  # not a tight loop


def test_a_failed_service_with_nothing_left_is_asked_about_every_few_minutes_not_seconds(
    db: Session, created: Service
) -> None:
    """Its target may be a tenant's cluster or swarm: a Failed service that runs nothing waits for
    a change (a PATCH or a delete makes it due at once), and is not listed there every 10 s."""
    created.state = ServiceState.FAILED
    db.flush()
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    leftover = Replica(id="left", generation=1, image_id=None, address="127.0.0.1:1", alive=True, ready=False)
    now = utcnow()
    step = decide(spec, [leftover], now=now, start_seconds=60, drain_seconds=10)
    assert record(db, lease, spec, step, [leftover], now=now, scoring_url=SCORING_URL)
    db.refresh(created)
    assert created.due_at is not None and created.due_at <= now + timedelta(seconds=STEADY_SECONDS)  # its leftover goes

    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    step = decide(spec, [], now=now, start_seconds=60, drain_seconds=10)
    assert record(db, lease, spec, step, [], now=now, scoring_url=SCORING_URL)
    db.refresh(created)
    assert created.due_at is not None and created.due_at >= now + timedelta(seconds=FAILED_SECONDS)
    assert created.state is ServiceState.FAILED


def test_a_long_build_does_not_count_against_the_start_deadline() -> None:
    # Created an hour ago, its image built only now (deployed from models): time to start.
    spec = _spec(changed_at=NOW - timedelta(hours=1), image_ended_at=NOW - timedelta(seconds=5))
    step = _decide(spec, [])
    assert step.failure is None and step.start == 2


def test_a_scale_up_that_never_answers_ends_its_operation_but_keeps_serving() -> None:
    serving = [_replica(n=0), _replica(ready=False, n=1)]
    late = _spec(traffic_generation=1, changed_at=NOW - timedelta(seconds=61))
    step = _decide(late, serving)
    assert step.failure is not None and "1 of 2 replicas answered" in step.failure.reason
    assert step.remove == [] and not step.flip_traffic  # the ready one serves on
    assert _decide(_spec(traffic_generation=1), serving).failure is None  # not before the deadline


def test_a_timed_out_scale_up_leaves_the_service_unhealthy_and_changeable(db: Session, created: Service) -> None:
    created.state, created.traffic_generation, created.replicas_desired = ServiceState.TRANSITIONING, 1, 2
    created.changed_at = utcnow() - timedelta(seconds=61)
    db.flush()
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    replicas = [_replica(n=0), _replica(ready=False, n=1)]
    now = utcnow()  # not the module's NOW: changed_at is relative to this moment
    step = decide(spec, replicas, now=now, start_seconds=60, drain_seconds=10)
    assert record(db, lease, spec, step, replicas, now=now, scoring_url=SCORING_URL)
    db.refresh(created)
    assert created.state is ServiceState.UNHEALTHY and "1 of 2 replicas answered" in (created.error or "")
    assert _operation(db, created).state is OperationState.FAILED
    update_service(
        db, created, scoring_url=SCORING_URL, num_replicas=1, replicas_desired=1
    )  # the tenant may change it again


def test_a_rollout_that_went_unhealthy_can_still_fail(db: Session, created: Service) -> None:
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    assert record_unreachable(
        db, lease, spec, "the Docker engine did not answer", now=utcnow(), scoring_url=SCORING_URL
    )
    db.expire_all()  # each pass reads in a session of its own
    lease = claim(db, created.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None and spec.state is ServiceState.UNHEALTHY
    now = utcnow()
    record(
        db,
        lease,
        spec,
        _decide(spec, [], Failure("a replica exited with code 1")),
        [],
        now=now,
        scoring_url=SCORING_URL,
    )
    db.refresh(created)
    assert created.state is ServiceState.FAILED and "exited with code 1" in (created.error or "")
    assert _operation(db, created).state is OperationState.FAILED


# -- a failed update rolled back (the API's PATCH, then the reconciler's passes) -------------


def _another_image(db: Session, service: Service) -> Image:
    """A second built image in the service's account."""
    first = db.get_one(Image, service.image_id)
    image = Image(
        account_id=first.account_id,
        manifest_id=first.manifest_id,
        name=first.name,
        version=first.version + 1 + int(uuid.uuid4().int % 1000),
        image_type="Docker",
        builder="docker",
        state=CreationState.SUCCEEDED,
        published_at=utcnow(),
        image_location="127.0.0.1:5000/acct/housing:2",
        digest="sha256:" + "2" * 64,
    )
    db.add(image)
    db.flush()
    return image


def _patch(db: Session, service: Service, **body: object) -> None:
    """The tenant's PATCH, as the API applies it."""
    account = AccountRef.of(db.get_one(Account, service.account_id))
    services_deploy.update(
        db,
        account,
        service_id=str(service.id),
        body=ServiceUpdate.model_validate(body),
        limits=services_deploy.Limits(local_enabled=True, max_replicas=10),
        scoring_url=SCORING_URL,
    )


def _pass(db: Session, service: Service, replicas: list[Replica], failure: Failure | None = None) -> Step:
    """One reconciler pass that saw ``replicas`` (and the driver's ``failure``); its step."""
    db.expire_all()  # each pass reads in a session of its own
    lease = claim(db, service.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    now = utcnow()
    step = decide(spec, replicas, now=now, start_seconds=60, drain_seconds=10, failure=failure)
    assert record(db, lease, spec, step, replicas, now=now, scoring_url=SCORING_URL)
    db.refresh(service)
    return step


@pytest.fixture()
def serving(db: Session, created: Service) -> Service:
    """A service whose first generation serves, Healthy."""
    _pass(db, created, [_replica(n=0)])
    assert (created.state, created.traffic_generation) == (ServiceState.HEALTHY, 1)
    return created


def _labelled(replica: Replica, image_id: uuid.UUID | str) -> Replica:
    return Replica(replica.id, replica.generation, str(image_id), replica.address, replica.alive, replica.ready)


def test_a_failed_update_rolls_back_the_image_and_resources_with_no_old_replica_in_sight(
    db: Session, serving: Service
) -> None:
    old_image, new_image = serving.image_id, _another_image(db, serving)
    _patch(db, serving, imageId=str(new_image.id), containerResourceRequirements={"cpu": 1, "memoryInGB": 2})
    assert (serving.generation, serving.cpu, serving.memory_gb) == (2, 1.0, 2.0)
    # The old generation's replica was killed meanwhile: no label tells what it ran.
    step = _pass(db, serving, [], Failure("a replica exited with code 1"))
    assert step.failure is not None
    assert serving.state is ServiceState.UNHEALTHY and serving.error is not None
    assert (serving.generation, serving.traffic_generation) == (1, 1)
    assert (serving.image_id, serving.cpu, serving.memory_gb) == (old_image, 0.1, 0.5)
    # The next pass starts the old generation as it was.
    spec = read_spec(db, claim(db, serving.id, owner="w2"))  # type: ignore[arg-type]
    assert spec is not None and (spec.image_id, spec.cpu, spec.memory_gb, spec.generation) == (old_image, 0.1, 0.5, 1)


def test_a_failed_resize_is_rolled_back_to_the_resources_that_served(db: Session, serving: Service) -> None:
    _patch(db, serving, containerResourceRequirements={"cpu": 1.5, "memoryInGB": 3})
    old = _labelled(_replica(n=0), serving.image_id)
    _pass(db, serving, [old], Failure("a replica ran out of memory 3 times before it answered GET /"))
    assert serving.state is ServiceState.HEALTHY and serving.generation == 1
    assert (serving.cpu, serving.memory_gb) == (0.1, 0.5)


def test_a_new_spec_the_target_refuses_is_rolled_back_to_the_serving_one(db: Session, serving: Service) -> None:
    """The pass records the target's refusal without deciding (it saw no replica): the roll back
    restores the serving spec all the same, or the next pass would apply the refused one again."""
    old_image, new_image = serving.image_id, _another_image(db, serving)
    _patch(db, serving, imageId=str(new_image.id), containerResourceRequirements={"cpu": 2, "memoryInGB": 4})
    db.expire_all()
    lease = claim(db, serving.id, owner="w")
    assert lease is not None
    spec = read_spec(db, lease)
    assert spec is not None
    refused = Step(failure=Failure("the kubernetes cluster refused a request (403): exceeded quota"))
    assert record(db, lease, spec, refused, [], now=utcnow(), scoring_url=SCORING_URL)
    db.refresh(serving)
    assert serving.error is not None and "exceeded quota" in serving.error
    assert (serving.generation, serving.image_id, serving.cpu, serving.memory_gb) == (1, old_image, 0.1, 0.5)


def test_a_generation_number_is_never_given_twice(db: Session, serving: Service) -> None:
    _patch(db, serving, imageId=str(_another_image(db, serving).id))
    assert serving.generation == 2
    old = _labelled(_replica(1, n=0), serving.image_id)
    [failed] = [_labelled(_replica(2, ready=False, n=1), serving.image_id)]
    _pass(db, serving, [old, failed], Failure("a replica exited with code 1"))
    assert serving.generation == 1
    # Generation 2's replica outlives the roll back (its removal failed): it is no part of the next update.
    _patch(db, serving, containerResourceRequirements={"cpu": 0.2, "memoryInGB": 0.5})
    assert serving.generation == 3
    leftover = _labelled(_replica(2, n=1), serving.image_id)
    step = _pass(db, serving, [old, leftover])
    assert step.remove == [leftover.id] and step.start == 1 and not step.flip_traffic
    assert serving.traffic_generation == 1


def test_the_serving_spec_is_forgotten_once_the_new_generation_takes_traffic(db: Session, serving: Service) -> None:
    new_image = _another_image(db, serving)
    _patch(db, serving, imageId=str(new_image.id))
    assert serving.serving_image_id is not None
    _pass(db, serving, [_replica(1, n=0), _replica(2, n=1)])
    assert (serving.state, serving.traffic_generation, serving.image_id) == (ServiceState.HEALTHY, 2, new_image.id)
    assert (serving.serving_image_id, serving.serving_cpu, serving.serving_memory_gb) == (None, None, None)


def test_a_roll_back_by_labels_writes_only_an_image_of_the_account(db: Session, serving: Service) -> None:
    """A row from before the serving spec was kept rolls back to the image the old replicas'
    labels name, if the account holds it: a label naming no image (or another account's: a
    tenant's cluster sets its own labels) is not written, and the pass still lands."""
    old_image, new_image = serving.image_id, _another_image(db, serving)
    strangers = new_service_row(db, name="other").image_id
    for label, restored in ((uuid.uuid4(), new_image.id), (strangers, new_image.id), (old_image, old_image)):
        serving.state, serving.generation, serving.image_id = ServiceState.TRANSITIONING, 2, new_image.id
        db.flush()
        _pass(db, serving, [_labelled(_replica(1, n=0), label)], Failure("a replica exited with code 1"))
        assert (serving.state, serving.generation, serving.image_id) == (ServiceState.HEALTHY, 1, restored)
