"""A service made on an attached target while another request moves or detaches that target,
on real PostgreSQL connections: the move or detach waits for the create, then sees its service
and is refused (409 ComputeInUse); never does the service end up on a target that moved (what
its first pass made at the old place would stay there) or that is gone."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, text, update
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.deployments.states import ServiceState
from app.errors import Conflict
from app.orm import Account, Compute, Image, Service
from app.schemas.services import ComputePut
from app.services import computes
from app.services.accounts import AccountRef
from tests.api.test_computes import swarm
from tests.factories import new_image_row

pytestmark = pytest.mark.postgres_only

POOL = "10.213.0.0/16"


@pytest.fixture()
def attached(service_context: ServiceContext) -> Iterator[tuple[AccountRef, uuid.UUID]]:
    """An account with a built image and a swarm it attached, committed."""
    with service_context.session_factory.begin() as session:
        image = new_image_row(session)
        session.execute(update(Image).where(Image.id == image.id).values(state="Succeeded"))
        account = session.get_one(Account, image.account_id)
        ref = AccountRef(account.id, account.subscription_id, account.resource_group, account.name)
        computes.put_target(
            session,
            ref,
            name="theirs",
            body=ComputePut.model_validate(swarm()),
            sealer=service_context.sealer,
            created_by=None,
            service_pool=POOL,
        )
        image_id = image.id
    try:
        yield ref, image_id
    finally:
        with service_context.session_factory.begin() as session:
            session.execute(delete(Service).where(Service.account_id == ref.id))
            session.execute(delete(Compute).where(Compute.account_id == ref.id))
            session.execute(delete(Account).where(Account.id == ref.id))


def _move(session: Session, ref: AccountRef, service_context: ServiceContext) -> object:
    return computes.put_target(
        session,
        ref,
        name="theirs",
        body=ComputePut.model_validate(swarm("tcp://swarm-2.example.com:2376")),
        sealer=service_context.sealer,
        created_by=None,
        service_pool=POOL,
    )


def _detach(session: Session, ref: AccountRef, service_context: ServiceContext) -> object:
    return computes.delete_target(session, ref, name="theirs")


@pytest.mark.parametrize("change", [_move, _detach])
def test_a_target_moved_or_detached_while_a_service_is_made_on_it_waits_then_is_refused(
    service_context: ServiceContext, attached: tuple[AccountRef, uuid.UUID], change
) -> None:  # type: ignore[no-untyped-def]
    ref, image_id = attached
    outcome: list[object] = []

    def other_request() -> None:
        try:
            with service_context.session_factory.begin() as session:
                session.execute(text("SET LOCAL lock_timeout = '20s'"))
                outcome.append(change(session, ref, service_context))
        except BaseException as exc:  # noqa: BLE001  (reported by the test's thread)
            outcome.append(exc)

    with service_context.session_factory.begin() as session:
        # As a service's create does (app/services/services_deploy.py), then its row.
        target = computes.get_target(session, ref, name="theirs", local_enabled=False, for_service=True)
        session.add(_service(ref, image_id, target.name))
        session.flush()
        thread = threading.Thread(target=other_request, daemon=True)
        thread.start()
        assert _waiting_on_a_lock(service_context)  # the move or detach waits on the create
        assert outcome == []
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert outcome[0].code == "ComputeInUse"
    with service_context.session_factory() as session:
        compute = session.query(Compute).filter_by(account_id=ref.id, name="theirs").one()
        assert compute.properties["dockerHost"] == "tcp://swarm.example.com:2376"


def _service(ref: AccountRef, image_id: uuid.UUID, compute_name: str) -> Service:
    return Service(
        account_id=ref.id,
        name="svc",
        state=ServiceState.TRANSITIONING,
        compute_name=compute_name,
        compute_type="swarm",
        compute_attached=True,
        image_id=image_id,
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


def _waiting_on_a_lock(service_context: ServiceContext, seconds: float = 5.0) -> bool:
    """Whether another connection to this database waits on a lock (within ``seconds``)."""
    deadline = time.monotonic() + seconds
    with service_context.engine.connect() as watcher:
        while time.monotonic() < deadline:
            waiting = watcher.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )
            watcher.rollback()
            if waiting:
                return True
            time.sleep(0.05)
    return False


def test_an_accounts_delete_while_a_service_is_made_on_its_target_waits_without_a_deadlock(
    service_context: ServiceContext, attached: tuple[AccountRef, uuid.UUID]
) -> None:
    """The create holds the target's row when the account's delete comes, whose cascade takes
    that row after the account's: the create takes the account's row first, so the delete waits
    for it, then deletes both (were the target's row taken first, the create's insert would wait
    on the account's delete while that waits on the target: a deadlock, one of them failed)."""
    ref, image_id = attached
    outcome: list[object] = []

    def delete_the_account() -> None:
        try:
            with service_context.session_factory.begin() as session:
                session.execute(text("SET LOCAL lock_timeout = '20s'"))
                session.execute(delete(Account).where(Account.id == ref.id))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (reported by the test's thread)
            outcome.append(exc)

    with service_context.session_factory.begin() as session:
        session.execute(text("SET LOCAL lock_timeout = '20s'"))
        computes.get_target(session, ref, name="theirs", local_enabled=False, for_service=True)
        thread = threading.Thread(target=delete_the_account, daemon=True)
        thread.start()
        assert _waiting_on_a_lock(service_context)
        session.add(_service(ref, image_id, "theirs"))
        session.flush()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert outcome == [None], outcome
    with service_context.session_factory() as session:
        assert session.get(Account, ref.id) is None
