"""A service's force delete and its account's force delete at once, on two real PostgreSQL
connections: the service's objects on the swarm its account attached are queued for cleanup
once, not once by each."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, func, select, text, update

from app.context import ServiceContext
from app.deployments.lifecycle import delete_account_services, force_delete
from app.deployments.states import ServiceState
from app.errors import NotFound
from app.orm import Account, ClusterCleanup, Compute, Image, Service
from tests.factories import new_image_row

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
        force_delete(session, session.get_one(Service, service_id))
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
                force_delete(session, session.get_one(Service, service_id))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (reported by the test's thread)
            outcome.append(exc)
        finally:
            second_done.set()

    with service_context.session_factory.begin() as session:
        force_delete(session, session.get_one(Service, service_id))
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
