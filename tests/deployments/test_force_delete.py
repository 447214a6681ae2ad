"""A service's force delete racing another writer, on real PostgreSQL connections: its
account's force delete (the service's objects on the swarm its account attached are queued
for cleanup once, not once by each), and a reconciler pass writing what it saw (both lock the
service's row first, so neither waits on the other in a circle: no deadlock)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, event, func, select, text, update
from sqlalchemy.orm import Session

from app.config import compute_path
from app.context import ServiceContext
from app.deployments import reconciler
from app.deployments.lifecycle import delete_account_services, force_delete
from app.deployments.states import OperationKind, OperationState, ServiceState
from app.errors import Conflict, NotFound
from app.orm import Account, ClusterCleanup, Compute, Image, Service, ServiceOperation, ServiceReplica
from app.orm.base import utcnow
from tests.factories import new_image_row
from tests.locks import in_thread, waiting_on_a_lock

pytestmark = pytest.mark.postgres_only


@pytest.fixture()
def committed_service(service_context: ServiceContext) -> Iterator[tuple[uuid.UUID, uuid.UUID]]:
    """A service on a swarm its account attached, committed (the two sessions must both see it)."""
    with service_context.session_factory.begin() as session:
        image = new_image_row(session)
        session.execute(update(Image).where(Image.id == image.id).values(state="Succeeded"))
        account_id = image.account_id
        session.add(
            Compute(
                account_id=account_id,
                name="theirs",
                compute_type="swarm",
                properties={"dockerHost": "tcp://swarm.example.com:2376"},
                sealed_credentials="sealed-tls",
            )
        )
        service = Service(
            account_id=account_id,
            name="svc",
            state=ServiceState.DELETING,
            compute_name="theirs",
            compute_type="swarm",
            compute_attached=True,
            image_id=image.id,
            num_replicas=1,
            cpu=0.1,
            memory_gb=0.5,
            auth_enabled=False,
            scoring_timeout_ms=60000,
            replicas_desired=1,
            attempt=1,  # a reconciler pass took it: it may have made something on the swarm
            sealed_primary_key="sealed-1",
            sealed_secondary_key="sealed-2",
            primary_key_digest="1" * 64,
            secondary_key_digest="2" * 64,
        )
        session.add(service)
        session.flush()
        service_id = service.id
    try:
        yield service_id, account_id
    finally:
        with service_context.session_factory.begin() as session:
            session.execute(delete(ClusterCleanup).where(ClusterCleanup.service_id == service_id))
            session.execute(delete(Service).where(Service.id == service_id))
            session.execute(delete(Account).where(Account.id == account_id))


def test_an_accounts_delete_keeps_each_computes_path_for_its_cleanup(
    service_context: ServiceContext, committed_service: tuple[uuid.UUID, uuid.UUID]
) -> None:
    """The hosts the operator allows for the compute alone (MMS_COMPUTE_ALLOW_HOSTS) are found by
    its path when the account and its computes are gone."""
    service_id, account_id = committed_service
    with service_context.session_factory.begin() as session:
        account = session.get_one(Account, account_id)
        path = compute_path(account.subscription_id, account.resource_group, account.name, "theirs")
        delete_account_services(session, account_id)
    with service_context.session_factory() as session:
        [cleanup] = session.scalars(select(ClusterCleanup).where(ClusterCleanup.service_id == service_id))
        assert cleanup.compute_path == path


def test_a_service_and_its_account_force_deleted_at_once_queue_one_cleanup(
    service_context: ServiceContext, committed_service: tuple[uuid.UUID, uuid.UUID]
) -> None:
    service_id, account_id = committed_service
    account_done = threading.Event()
    failures: list[BaseException] = []

    def delete_the_account() -> None:
        try:
            with service_context.session_factory.begin() as session:
                session.execute(text("SET LOCAL lock_timeout = '20s'"))
                delete_account_services(session, account_id)
        except BaseException as exc:  # noqa: BLE001  (reported by the test's thread)
            failures.append(exc)
        finally:
            account_done.set()

    with service_context.session_factory.begin() as session:
        force_delete(session, session.get_one(Service, service_id), max_cleanups=50)
        other = threading.Thread(target=delete_the_account, daemon=True)
        other.start()
        # The account's delete waits on the service's row until this one commits.
        assert not account_done.wait(1.0)
    other.join(timeout=30)
    assert not other.is_alive() and failures == []
    with service_context.session_factory() as session:
        queued = session.scalar(
            select(func.count()).select_from(ClusterCleanup).where(ClusterCleanup.service_id == service_id)
        )
        assert queued == 1
        assert session.get(Service, service_id) is None


def test_two_force_deletes_at_once_one_deletes_and_the_other_finds_it_gone(
    service_context: ServiceContext, committed_service: tuple[uuid.UUID, uuid.UUID]
) -> None:
    """Not yet Deleting (each would record a Delete operation): the second waits for the first,
    then is a 404, never a foreign key's refusal."""
    service_id, _ = committed_service
    with service_context.session_factory.begin() as session:
        session.execute(update(Service).where(Service.id == service_id).values(state=ServiceState.TRANSITIONING))
    second_done = threading.Event()
    outcome: list[BaseException | None] = []

    def force_again() -> None:
        try:
            with service_context.session_factory.begin() as session:
                session.execute(text("SET LOCAL lock_timeout = '20s'"))
                force_delete(session, session.get_one(Service, service_id), max_cleanups=50)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (reported by the test's thread)
            outcome.append(exc)
        finally:
            second_done.set()

    with service_context.session_factory.begin() as session:
        force_delete(session, session.get_one(Service, service_id), max_cleanups=50)
        other = threading.Thread(target=force_again, daemon=True)
        other.start()
        assert not second_done.wait(1.0)  # it waits on the service's row
    other.join(timeout=30)
    assert not other.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], NotFound), outcome
    with service_context.session_factory() as session:
        queued = session.scalar(
            select(func.count()).select_from(ClusterCleanup).where(ClusterCleanup.service_id == service_id)
        )
        assert queued == 1


# ---- a reconciler pass's write and a force delete at once

SEEN = [reconciler.Replica(id="ef" * 32, generation=1, image_id=None, address="10.0.0.4:5001", alive=True, ready=True)]


def _pass_up_to_record(
    service_context: ServiceContext, service_id: uuid.UUID
) -> tuple[reconciler.Lease, reconciler.Spec]:
    """A pass that took the service's lease and read its spec (committed), with a replica row
    of an earlier pass to replace and the Delete operation under way."""
    with service_context.session_factory.begin() as session:
        session.add(
            ServiceReplica(
                service_id=service_id, generation=1, replica_id="cd" * 32, address="10.0.0.3:5001", ready=True
            )
        )
        account_id = session.get_one(Service, service_id).account_id
        session.add(
            ServiceOperation(
                account_id=account_id,
                service_id=service_id,
                kind=OperationKind.DELETE.value,
                state=OperationState.RUNNING,
            )
        )
        session.flush()
        lease = reconciler.claim(session, service_id, owner="racing-pass")
        assert lease is not None
        spec = reconciler.read_spec(session, lease)
        assert spec is not None
    return lease, spec


def test_a_pass_recording_while_a_force_delete_holds_the_service_waits_then_writes_nothing(
    service_context: ServiceContext, committed_service: tuple[uuid.UUID, uuid.UUID]
) -> None:
    """The force delete has the service's row (and has deleted it), not yet committed: the
    pass's record waits for the row, then finds it gone and writes nothing (no replica row
    refused by its foreign key, no deadlock)."""
    service_id, _ = committed_service
    lease, spec = _pass_up_to_record(service_context, service_id)
    outcome: list[object] = []

    def record() -> bool:
        with service_context.session_factory.begin() as session:
            session.execute(text("SET LOCAL lock_timeout = '20s'"))
            return reconciler.record(
                session, lease, spec, reconciler.Step(), SEEN, now=utcnow(), scoring_url="http://scoring.example.com"
            )

    with service_context.session_factory.begin() as session:
        force_delete(session, session.get_one(Service, service_id), max_cleanups=50)
        recording = in_thread(record, outcome)
        assert waiting_on_a_lock(service_context)  # the pass waits on the force delete
        assert outcome == []
    recording.join(timeout=30)
    assert not recording.is_alive()
    assert outcome == [False], outcome
    with service_context.session_factory() as session:
        assert session.get(Service, service_id) is None
        assert session.scalar(select(ServiceReplica.replica_id).where(ServiceReplica.service_id == service_id)) is None


def _record(session: Session, lease: reconciler.Lease, spec: reconciler.Spec) -> bool:
    return reconciler.record(
        session, lease, spec, reconciler.Step(), SEEN, now=utcnow(), scoring_url="http://scoring.example.com"
    )


def _unreachable(session: Session, lease: reconciler.Lease, spec: reconciler.Spec) -> bool:
    return reconciler.record_unreachable(
        session, lease, spec, "away", now=utcnow(), scoring_url="http://scoring.example.com", forget_replicas=True
    )


def _finish_delete(session: Session, lease: reconciler.Lease, spec: reconciler.Spec) -> bool:
    return reconciler.finish_delete(session, lease)


@pytest.mark.parametrize(
    ("write", "first_statement", "force_outcome"),
    [
        (_record, "DELETE FROM SERVICE_REPLICAS", None),
        (_unreachable, "DELETE FROM SERVICE_REPLICAS", None),
        # The pass deletes the row itself: the force delete then finds it gone.
        (_finish_delete, "UPDATE SERVICE_OPERATIONS", NotFound),
    ],
)
def test_a_force_delete_coming_while_a_pass_writes_waits_for_it_without_a_deadlock(
    service_context: ServiceContext,
    committed_service: tuple[uuid.UUID, uuid.UUID],
    write,  # type: ignore[no-untyped-def]
    first_statement: str,
    force_outcome: type[Exception] | None,
) -> None:
    """The pass has begun writing (the replica rows of an earlier pass deleted, or its Delete
    operation ended) when the force delete comes: the force delete waits on the pass, which
    then ends; the force delete follows. Were the pass to take the service's row only later (a
    replica's insert checks its foreign key; ``finish_delete`` deletes the row) the two would
    wait on each other: PostgreSQL would fail one of them as a deadlock."""
    service_id, _ = committed_service
    lease, spec = _pass_up_to_record(service_context, service_id)
    paused, resume = threading.Event(), threading.Event()
    written: list[object] = []
    forced: list[object] = []

    def pass_writes() -> bool:
        with service_context.engine.connect() as connection:

            def pause_after_the_first_write(_conn, _cursor, statement: str, *_: object) -> None:  # type: ignore[no-untyped-def]
                if statement.lstrip().upper().startswith(first_statement) and not paused.is_set():
                    paused.set()
                    assert resume.wait(30)

            event.listen(connection, "after_cursor_execute", pause_after_the_first_write)
            with Session(bind=connection) as session, session.begin():
                session.execute(text("SET LOCAL lock_timeout = '20s'"))
                return write(session, lease, spec)

    def force() -> None:
        with service_context.session_factory.begin() as session:
            session.execute(text("SET LOCAL lock_timeout = '20s'"))
            force_delete(session, session.get_one(Service, service_id), max_cleanups=50)

    writing = in_thread(pass_writes, written)
    assert paused.wait(10)
    forcing = in_thread(force, forced)
    assert waiting_on_a_lock(service_context)  # the force delete waits on the pass
    resume.set()
    writing.join(timeout=30)
    forcing.join(timeout=30)
    assert not writing.is_alive() and not forcing.is_alive()
    assert written == [True], written
    if force_outcome is None:
        assert forced == [None], forced
    else:
        assert len(forced) == 1 and isinstance(forced[0], force_outcome), forced
    with service_context.session_factory() as session:
        assert session.get(Service, service_id) is None


# ---- the account's cap on pending cleanups, under concurrent force deletes


def test_concurrent_force_deletes_never_pass_the_accounts_cap_on_pending_cleanups(
    service_context: ServiceContext, committed_service: tuple[uuid.UUID, uuid.UUID]
) -> None:
    """Six force deletes of six services of one account, the cap at 3: exactly 3 rows queued,
    the others refused (409 TooManyCleanups), however they interleave. The first holds its
    transaction open after its count; the others come meanwhile: counted without the account's
    lock, each would see no row pending and pass."""
    first_id, account_id = committed_service
    with service_context.session_factory.begin() as session:
        template = session.get_one(Service, first_id)
        others = []
        for i in range(5):
            other = Service(
                **{
                    column.key: getattr(template, column.key)
                    for column in Service.__table__.columns
                    if column.key not in ("id", "name", "created_at", "changed_at")
                },
                name=f"svc{i}",
            )
            session.add(other)
            others.append(other)
        session.flush()
        other_ids = [other.id for other in others]
    outcomes: list[object] = []

    def force(service_id: uuid.UUID) -> None:
        with service_context.session_factory.begin() as session:
            session.execute(text("SET LOCAL lock_timeout = '20s'"))
            force_delete(session, session.get_one(Service, service_id), max_cleanups=3)

    try:
        with service_context.session_factory.begin() as session:
            force_delete(session, session.get_one(Service, first_id), max_cleanups=3)
            threads = [in_thread(lambda service_id=service_id: force(service_id), outcomes) for service_id in other_ids]
            # Each of the others is either done or waiting on the account's row before the first commits.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(outcomes) + _waiting(service_context) < len(threads):
                time.sleep(0.05)
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        refused = [outcome for outcome in outcomes if isinstance(outcome, Conflict)]
        assert all(getattr(outcome, "code", None) == "TooManyCleanups" for outcome in refused), outcomes
        assert outcomes.count(None) == 2 and len(refused) == 3, outcomes
        with service_context.session_factory() as session:
            queued = session.scalar(
                select(func.count()).select_from(ClusterCleanup).where(ClusterCleanup.account_id == account_id)
            )
            assert queued == 3
            left = session.scalar(select(func.count()).select_from(Service).where(Service.account_id == account_id))
            assert left == 3  # the refused ones stay
    finally:
        with service_context.session_factory.begin() as session:
            session.execute(delete(ClusterCleanup).where(ClusterCleanup.account_id == account_id))
            session.execute(delete(ServiceOperation).where(ServiceOperation.account_id == account_id))
            session.execute(delete(Service).where(Service.account_id == account_id))


def _waiting(service_context: ServiceContext) -> int:
    """How many other connections to this database wait on a lock now."""
    with service_context.engine.connect() as watcher:
        return int(
            watcher.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )
            or 0
        )
