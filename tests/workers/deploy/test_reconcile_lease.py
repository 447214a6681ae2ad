"""A reconciler pass keeps its lease while it runs (workers/deploy/reconcile.renewing): a pass
longer than the lease (a large image's pull) must not have a second pass beside it."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import select

from app.context import ServiceContext
from app.database import session_scope
from app.deployments import reconciler
from app.orm import Account, Service
from app.orm.base import utcnow
from tests.factories import new_service_row
from workers.deploy.reconcile import renewing


def _expires(context: ServiceContext, service_id) -> object:  # type: ignore[no-untyped-def]
    with session_scope(context.session_factory) as session:
        return session.scalar(select(Service.lease_expires_at).where(Service.id == service_id))


def test_a_long_pass_keeps_its_lease_and_stops_renewing_when_it_ends(service_context: ServiceContext) -> None:
    with session_scope(service_context.session_factory) as session:
        service = new_service_row(session)
        service_id, account_id = service.id, service.account_id
        lease = reconciler.claim(session, service_id, owner="long-pass")
        assert lease is not None
        # As if the pass had already run most of its lease.
        session.execute(
            Service.__table__.update()
            .where(Service.id == service_id)
            .values(lease_expires_at=utcnow() + timedelta(seconds=1))
        )
    try:
        _check(service_context, lease, service_id)
    finally:  # committed rows: gone with their account (no deploy worker of another test sees them)
        with session_scope(service_context.session_factory) as session:
            session.execute(Account.__table__.delete().where(Account.id == account_id))


def _check(service_context: ServiceContext, lease: reconciler.Lease, service_id) -> None:  # type: ignore[no-untyped-def]
    with renewing(service_context, lease, every=0.2):
        time.sleep(1.5)  # past the lease it had
        with session_scope(service_context.session_factory) as session:
            assert reconciler.claim(session, service_id, owner="second-pass") is None
        assert _expires(service_context, service_id) > utcnow() + timedelta(seconds=50)
    with session_scope(service_context.session_factory) as session:  # ended: nothing renews it
        session.execute(Service.__table__.update().where(Service.id == service_id).values(lease_expires_at=utcnow()))
    time.sleep(0.5)
    assert _expires(service_context, service_id) <= utcnow()
    with session_scope(service_context.session_factory) as session:
        assert reconciler.claim(session, service_id, owner="next-pass") is not None
