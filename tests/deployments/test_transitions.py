"""The service transition table: every move it lists applies, every other is refused by the
conditional UPDATE itself, two racing moves never both win (on the real database, committed,
from two connections), and nothing outside app/deployments writes a service's state."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.database import session_scope
from app.deployments import ServiceState
from app.deployments.states import SETTLED
from app.deployments.transitions import GONE, SILENT, TRANSITIONS, IllegalTransition, Transition, allowed_sources, move
from app.orm import Account, Image, Service
from tests.factories import new_service_row

ROOT = Path(__file__).resolve().parents[2]
MOVES = [(transition, source, target) for transition, pairs in TRANSITIONS.items() for source, target in pairs]


def _put(db: Session, service: Service, state: ServiceState) -> None:
    service.state = state
    db.flush()


@pytest.mark.parametrize(
    ("transition", "source", "target"),
    [m for m in MOVES if m[0] is not Transition.CREATE],
    ids=lambda v: str(v) if v is not None else "gone",
)
def test_every_move_in_the_table_applies(
    db: Session, service: Service, transition: Transition, source: ServiceState, target: ServiceState | None
) -> None:
    _put(db, service, source)
    before = service.updated_at
    assert move(db, transition, Service.id == service.id, to=target)
    if target is GONE:
        assert db.scalar(select(Service.id).where(Service.id == service.id)) is None
        return
    db.refresh(service)
    assert service.state is target
    assert (service.updated_at == before) is (transition in SILENT)


@pytest.mark.parametrize("transition", [t for t in Transition if t is not Transition.CREATE])
def test_every_move_not_in_the_table_is_refused_and_writes_nothing(
    db: Session, service: Service, transition: Transition
) -> None:
    for target in {target for _, target in TRANSITIONS[transition]}:
        for state in set(ServiceState) - allowed_sources(transition, target):
            _put(db, service, state)
            written = {} if target is GONE else {"error": "must not be written"}
            assert not move(db, transition, Service.id == service.id, to=target, **written)
            db.refresh(service)
            assert (service.state, service.error) == (state, None)


def test_a_new_service_is_transitioning(service: Service) -> None:
    assert service.state is ServiceState.TRANSITIONING
    assert TRANSITIONS[Transition.CREATE] == {(GONE, ServiceState.TRANSITIONING)}


def test_a_destination_the_table_does_not_list_is_a_bug() -> None:
    with pytest.raises(IllegalTransition):
        allowed_sources(Transition.FAIL, ServiceState.HEALTHY)
    with pytest.raises(IllegalTransition):
        allowed_sources(Transition.UPDATE, ServiceState.HEALTHY)
    with pytest.raises(IllegalTransition, match="several outcomes"):
        move(None, Transition.ROLL_BACK)  # type: ignore[arg-type]  # which outcome?
    with pytest.raises(IllegalTransition, match="several outcomes"):
        move(None, Transition.OBSERVE)  # type: ignore[arg-type]  # observe keeps which state?
    with pytest.raises(IllegalTransition, match="create"):
        move(None, Transition.CREATE)  # type: ignore[arg-type]


def test_the_tenant_changes_only_a_settled_service_and_a_deleting_one_only_goes_away() -> None:
    assert {source for source, _ in TRANSITIONS[Transition.UPDATE]} == SETTLED
    # Once deleting, only the reconciler's watch and the removal itself.
    leaving = {(transition, target) for transition, source, target in MOVES if source is ServiceState.DELETING}
    assert leaving == {
        (Transition.OBSERVE, ServiceState.DELETING),
        (Transition.DELETE, GONE),
        (Transition.DELETE_WITH_ACCOUNT, GONE),
        (Transition.FORCE_DELETE, GONE),  # the tenant, when its target will never finish the delete
    }


def test_the_database_refuses_a_state_that_is_not_one(db: Session, service: Service) -> None:
    with pytest.raises(IntegrityError), db.begin_nested():
        db.execute(text("UPDATE services SET state = 'Paused' WHERE id = :id"), {"id": service.id.hex})
    with pytest.raises(StatementError, match="not among the defined enum values"):
        _put(db, service, "Paused")  # type: ignore[arg-type]


def test_an_image_a_service_runs_cannot_be_deleted_under_it(db: Session, service: Service) -> None:
    with pytest.raises(IntegrityError), db.begin_nested():
        db.execute(text("DELETE FROM images WHERE id = :id"), {"id": service.image_id.hex})
    # Nor one its serving generation runs during a rollout (a roll back goes back to it).
    serving = new_service_row(db, name="other")
    db.execute(text("DELETE FROM services WHERE id = :id"), {"id": serving.id.hex})  # its image alone left
    service.serving_image_id = serving.image_id
    db.flush()
    with pytest.raises(IntegrityError), db.begin_nested():
        db.execute(text("DELETE FROM images WHERE id = :id"), {"id": serving.image_id.hex})
    # ... but the account's cascade removes both.
    account = db.get(Account, service.account_id)
    db.delete(account)
    db.flush()
    assert db.scalar(select(Service.id).where(Service.id == service.id)) is None


# Writing the state: an UPDATE or DELETE of services, or a state set on a Service.
_WRITES = re.compile(r"update\(Service\)|delete\(Service\)|\bstate=ServiceState|(?<!class )\bService\(")


def test_only_app_deployments_writes_a_services_state() -> None:
    writers = {
        str(path.relative_to(ROOT))
        for top in ("app", "workers")
        for path in (ROOT / top).rglob("*.py")
        if _WRITES.search(path.read_text())
    }
    assert writers <= {"app/deployments/transitions.py"}, writers


# Races: committed rows, two connections, each move in its own transaction.


@pytest.fixture()
def committed_service(service_context: ServiceContext) -> Iterator[Service]:
    with session_scope(service_context.session_factory) as session:
        service = new_service_row(session)
        account_id = service.account_id
    yield service
    with session_scope(service_context.session_factory) as session:
        session.delete(session.get(Account, account_id))


def _race(
    service_context: ServiceContext, service: Service, moves: list[tuple[Transition, ServiceState]]
) -> list[bool]:
    """Run each move in its own thread and transaction, all started together; which applied."""
    start = threading.Barrier(len(moves))
    applied: list[bool] = [False] * len(moves)
    failures: list[BaseException] = []

    def run(index: int, transition: Transition, target: ServiceState) -> None:
        try:
            with session_scope(service_context.session_factory) as session:
                start.wait(timeout=10)
                applied[index] = bool(move(session, transition, Service.id == service.id, to=target))
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i, *m)) for i, m in enumerate(moves)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    return applied


def _state(service_context: ServiceContext, service: Service) -> ServiceState | None:
    with session_scope(service_context.session_factory) as session:
        return session.scalar(select(Service.state).where(Service.id == service.id))


@pytest.mark.parametrize("_round", range(3))
def test_a_reconcilers_converge_and_fail_race_and_one_wins(
    service_context: ServiceContext, committed_service: Service, _round: int
) -> None:
    applied = _race(
        service_context,
        committed_service,
        [(Transition.CONVERGE, ServiceState.HEALTHY), (Transition.FAIL, ServiceState.FAILED)],
    )
    assert applied.count(True) == 1, applied
    assert _state(service_context, committed_service) is (ServiceState.HEALTHY if applied[0] else ServiceState.FAILED)


def test_two_updates_of_a_settled_service_race_and_one_wins(
    service_context: ServiceContext, committed_service: Service
) -> None:
    with session_scope(service_context.session_factory) as session:
        assert move(session, Transition.CONVERGE, Service.id == committed_service.id, to=ServiceState.HEALTHY)
    applied = _race(
        service_context,
        committed_service,
        [(Transition.UPDATE, ServiceState.TRANSITIONING), (Transition.UPDATE, ServiceState.TRANSITIONING)],
    )
    assert applied.count(True) == 1, applied
    assert _state(service_context, committed_service) is ServiceState.TRANSITIONING


def test_the_loser_of_a_race_reads_the_winners_commit_not_its_own_snapshot(
    service_context: ServiceContext, committed_service: Service
) -> None:
    # The tenant's delete holds its row (uncommitted) while the reconciler's converge is sent:
    # the converge waits, then finds the service Deleting and applies to nothing.
    deleted, sent = threading.Event(), threading.Event()
    converged: list[bool] = []

    def converge() -> None:
        deleted.wait(timeout=10)
        with session_scope(service_context.session_factory) as session:
            sent.set()
            converged.append(
                bool(move(session, Transition.CONVERGE, Service.id == committed_service.id, to=ServiceState.HEALTHY))
            )

    worker = threading.Thread(target=converge)
    worker.start()
    with session_scope(service_context.session_factory) as session:
        assert move(session, Transition.REQUEST_DELETE, Service.id == committed_service.id)
        deleted.set()
        sent.wait(timeout=10)
        worker.join(timeout=0.5)  # the converge is waiting for this transaction
        assert worker.is_alive()
    worker.join(timeout=60)
    assert converged == [False]
    assert _state(service_context, committed_service) is ServiceState.DELETING


def test_two_beats_racing_hand_each_due_service_to_one_of_them(service_context: ServiceContext) -> None:
    # On the real database, committed, from two connections at once: the second beat's UPDATE
    # finds a service the first handed out no longer due, so no service gets two passes' tasks.
    from datetime import timedelta

    from app.deployments.reconciler import due_services
    from app.orm.base import utcnow

    with session_scope(service_context.session_factory) as session:
        first = new_service_row(session, name="r0")
        image = session.get(Image, first.image_id)
        rows = [first, *(new_service_row(session, image, name=f"r{i}") for i in range(1, 40))]
        ids = {row.id for row in rows}
        accounts = {row.account_id for row in rows}
        for row in rows:
            row.due_at = utcnow() - timedelta(days=2)  # before any other test's: handed out first
    handed: list[list] = [[], []]

    def second_beat() -> None:
        with session_scope(service_context.session_factory) as session:
            handed[1] = due_services(session, limit=100)

    # The first beat's hand-out not yet committed when the second one's statement starts: the
    # second reads the same services as due, and must find them handed out once it may write.
    first_beat = service_context.session_factory()
    second = threading.Thread(target=second_beat)
    try:
        handed[0] = due_services(first_beat, limit=100)
        second.start()
        time.sleep(0.5)  # the second beat is waiting on the first one's rows (or its BEGIN)
        first_beat.commit()
        first_beat.close()
        second.join(30)
        ours = [[i for i in got if i in ids] for got in handed]
        assert not set(ours[0]) & set(ours[1])  # never both
        assert set(ours[0]) | set(ours[1]) == ids  # and none lost
    finally:
        first_beat.close()  # its locks let go, if it did not get to commit
        second.join(30)
        with session_scope(service_context.session_factory) as session:
            session.execute(Account.__table__.delete().where(Account.id.in_(accounts)))
