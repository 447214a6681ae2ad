"""A service made on an attached target while another request moves or detaches that target,
on real PostgreSQL connections: the move or detach waits for the create, then sees its service
and is refused (409 ComputeInUse); never does the service end up on a target that moved (what
its first pass made at the old place would stay there) or that is gone."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, text, update
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.errors import Conflict
from app.orm import Account, Compute, Image, Service
from app.schemas.services import ComputePut
from app.services import computes
from app.services.accounts import AccountRef
from tests.api.test_computes import swarm
from tests.factories import new_image_row, new_service_row
from tests.locks import in_thread, waiting_on_a_lock

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


def _service(session: Session, image_id: uuid.UUID, compute_name: str) -> Service:
    image = session.get_one(Image, image_id)
    return new_service_row(session, image, compute_name=compute_name, compute_type="swarm", compute_attached=True)


@pytest.mark.parametrize("change", [_move, _detach])
def test_a_target_moved_or_detached_while_a_service_is_made_on_it_waits_then_is_refused(
    service_context: ServiceContext, attached: tuple[AccountRef, uuid.UUID], change
) -> None:  # type: ignore[no-untyped-def]
    ref, image_id = attached
    outcome: list[object] = []

    def other_request() -> object:
        with service_context.session_factory.begin() as session:
            session.execute(text("SET LOCAL lock_timeout = '20s'"))
            return change(session, ref, service_context)

    with service_context.session_factory.begin() as session:
        # As a service's create does (app/services/services_deploy.py), then its row.
        target = computes.get_target(session, ref, name="theirs", local_enabled=False, for_service=True)
        _service(session, image_id, target.name)
        thread = in_thread(other_request, outcome)
        assert waiting_on_a_lock(service_context)  # the move or detach waits on the create
        assert outcome == []
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert outcome[0].code == "ComputeInUse"
    with service_context.session_factory() as session:
        compute = session.query(Compute).filter_by(account_id=ref.id, name="theirs").one()
        assert compute.properties["dockerHost"] == "tcp://swarm.example.com:2376"


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
        with service_context.session_factory.begin() as session:
            session.execute(text("SET LOCAL lock_timeout = '20s'"))
            session.execute(delete(Account).where(Account.id == ref.id))

    with service_context.session_factory.begin() as session:
        session.execute(text("SET LOCAL lock_timeout = '20s'"))
        computes.get_target(session, ref, name="theirs", local_enabled=False, for_service=True)
        thread = in_thread(delete_the_account, outcome)
        assert waiting_on_a_lock(service_context)
        _service(session, image_id, "theirs")
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert outcome == [None], outcome
    with service_context.session_factory() as session:
        assert session.get(Account, ref.id) is None
