"""One tenant's (subscription's) passes hold at most MMS_DEPLOY_PASSES_PER_TENANT of a deploy
worker's pass threads: a tenant whose passes are slow (a pull from a registry that trickles)
cannot keep every other tenant's services waiting, whatever number of accounts it makes. A
pass past the tenant's share gives its lease back and is tried again PUT_OFF_SECONDS later."""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import ExitStack

import pytest
from sqlalchemy import select, update

from app.context import ServiceContext
from app.database import session_scope
from app.orm import Account, Image, Service
from app.orm.base import utcnow
from tests.factories import new_image_row, new_service_row
from workers.deploy import reconcile
from workers.deploy.reconcile import PUT_OFF_SECONDS, TenantPasses


def test_a_pass_past_its_tenants_share_gives_its_lease_back_and_runs_later(service_context: ServiceContext) -> None:
    limit = service_context.settings.deploy_passes_per_tenant
    subscription = f"Sub-{uuid.uuid4().hex[:8]}"  # roles are scoped case-insensitively: so is the share
    services, accounts = [], []
    with session_scope(service_context.session_factory) as session:
        for _ in range(2):  # two accounts of one tenant
            image = new_image_row(session)
            session.execute(update(Image).where(Image.id == image.id).values(state="Succeeded"))
            session.execute(update(Account).where(Account.id == image.account_id).values(subscription_id=subscription))
            service = new_service_row(session, image)
            services.append(service.id)
            accounts.append(service.account_id)
    try:
        with ExitStack() as running:  # the tenant's share of this process, taken by its slow passes
            for _ in range(limit):
                assert running.enter_context(reconcile._tenant_passes.slot(subscription.lower(), limit=limit))
            for service_id in services:
                before = utcnow()
                started = time.monotonic()
                reconcile.reconcile_service(service_context, service_id)
                assert time.monotonic() - started < 5  # put off, not waiting for a slot
                with session_scope(service_context.session_factory) as session:
                    row = session.execute(
                        select(
                            Service.lease_owner,
                            Service.lease_expires_at,
                            Service.due_at,
                            Service.attempt,
                            Service.state,
                        ).where(Service.id == service_id)
                    ).one()
                assert row.lease_owner is None and row.lease_expires_at is None  # the lease given back
                assert row.attempt == 1  # claimed once
                assert row.state == "Transitioning"  # no pass ran: nothing moved
                due_in = (row.due_at - before).total_seconds()
                assert PUT_OFF_SECONDS - 1 <= due_in <= PUT_OFF_SECONDS + 2, due_in
            # Another tenant's pass has its slots.
            with reconcile._tenant_passes.slot("another-subscription", limit=limit) as free:
                assert free
        with reconcile._tenant_passes.slot(subscription.lower(), limit=limit) as free:  # the slow ones ended
            assert free
    finally:
        with session_scope(service_context.session_factory) as session:
            session.execute(Account.__table__.delete().where(Account.id.in_(accounts)))


def test_a_tenant_never_has_more_than_its_share_running_and_a_failed_pass_frees_its_slot() -> None:
    passes, tenant = TenantPasses(), "sub-1"
    running, most, lock = 0, 0, threading.Lock()
    ran: list[bool] = []

    def a_pass() -> None:
        nonlocal running, most
        with passes.slot(tenant, limit=2) as free:
            ran.append(free)
            if not free:
                return
            with lock:
                running += 1
                most = max(most, running)
            time.sleep(0.2)
            with lock:
                running -= 1

    threads = [threading.Thread(target=a_pass) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert most == 2 and ran.count(True) >= 2 and not running

    with pytest.raises(RuntimeError), passes.slot(tenant, limit=1) as free:
        assert free
        raise RuntimeError("the pass failed")
    with passes.slot(tenant, limit=1) as free:
        assert free  # the failed pass's slot is free again
    assert not passes._running  # nothing kept for tenants with nothing running
