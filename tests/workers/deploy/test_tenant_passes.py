"""One tenant's (subscription's) passes hold at most MMS_DEPLOY_PASSES_PER_TENANT of a deploy
worker's pass threads: a tenant whose passes are slow (a pull from a registry that trickles)
cannot keep every other tenant's services waiting, whatever number of accounts it makes. Passes
on targets tenants attached hold at most all threads but two, one tenant at most half of those:
slow tenants never take the threads of the operator's targets' passes and the schedule. A pass
past a bound gives its lease back and waits in line: a worker whose pass ends takes the next one
in the slot it freed, and a waiting one is tried again on its own after a quarter of its wait
(PUT_OFF_SECONDS at first)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.database import session_scope
from app.deployments import reconciler
from app.deployments.reconciler import PUT_OFF_SECONDS, Room
from app.orm import Account, Image, Service
from app.orm.base import utcnow
from tests.factories import new_image_row, new_service_row
from workers.deploy import reconcile
from workers.deploy.pass_slots import PassSlots, pass_slots


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
                assert running.enter_context(pass_slots.slot(subscription.lower(), attached=False, per_tenant=limit))
            for service_id in services:
                _assert_put_off(service_context, service_id)
            # Another tenant's pass has its slots.
            with pass_slots.slot("another-subscription", attached=False, per_tenant=limit) as free:
                assert free
        with pass_slots.slot(subscription.lower(), attached=False, per_tenant=limit) as free:  # the slow ones ended
            assert free
    finally:
        with session_scope(service_context.session_factory) as session:
            session.execute(Account.__table__.delete().where(Account.id.in_(accounts)))


def test_a_tenant_never_has_more_than_its_share_running_and_a_failed_pass_frees_its_slot() -> None:
    passes, tenant = PassSlots(threads=8), "sub-1"
    running, most, lock = 0, 0, threading.Lock()
    ran: list[bool] = []

    def a_pass() -> None:
        nonlocal running, most
        with passes.slot(tenant, attached=False, per_tenant=2) as free:
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

    with pytest.raises(RuntimeError), passes.slot(tenant, attached=True, per_tenant=1) as free:
        assert free
        raise RuntimeError("the pass failed")
    with passes.slot(tenant, attached=True, per_tenant=1) as free:
        assert free  # the failed pass's slot is free again
    assert not passes.running()  # nothing kept for tenants with nothing running


def test_passes_leave_threads_to_the_schedule_and_attached_targets_passes_to_the_operators() -> None:
    passes = PassSlots(threads=8)
    assert passes.limits() == (6, 4, 2)  # 2 threads for the schedule and sweep; 4 attached, 2 a tenant
    with ExitStack() as running:
        for tenant in ("slow-1", "slow-1", "slow-2", "slow-2"):  # two slow tenants on their swarms
            assert running.enter_context(passes.slot(tenant, attached=True, per_tenant=2))
        with passes.slot("fast", attached=True, per_tenant=2) as free:
            assert not free  # the attached share is taken
        with passes.slot("slow-1", attached=False, per_tenant=2) as free:
            assert not free  # an attached pass counts toward the tenant's own share
        # The operator's targets' passes have the two threads left to passes...
        assert running.enter_context(passes.slot("fast", attached=False, per_tenant=2))
        assert running.enter_context(passes.slot("other", attached=False, per_tenant=2))
        with passes.slot("third", attached=False, per_tenant=2) as free:
            assert not free  # ... and the schedule and sweep the last two
    with passes.slot("fast", attached=True, per_tenant=2) as free:
        assert free

    small = PassSlots(threads=4)  # a worker started with fewer threads by hand: still bounded
    assert small.limits() == (2, 1, 1)
    with ExitStack() as running:
        assert running.enter_context(small.slot("slow-1", attached=True, per_tenant=2))
        with small.slot("slow-2", attached=True, per_tenant=2) as free:
            assert not free
    assert PassSlots().limits() is None  # outside a worker: the tenant's share only


def test_the_room_a_worker_has_for_the_next_in_line() -> None:
    passes = PassSlots(threads=8)  # 6 passes, 4 on attached targets, 2 of those a tenant
    assert passes.room(per_tenant=2) == Room(attached=True, full=frozenset(), attached_full=frozenset())
    with ExitStack() as running:
        for tenant, attached in (("a", True), ("a", False), ("b", True), ("b", True)):
            assert running.enter_context(passes.slot(tenant, attached=attached, per_tenant=2))
        # a and b at their share; b at its attached share (a's operator pass is not attached)
        assert passes.room(per_tenant=2) == Room(
            attached=True, full=frozenset({"a", "b"}), attached_full=frozenset({"b"})
        )
        assert running.enter_context(passes.slot("c", attached=True, per_tenant=2))
        assert passes.room(per_tenant=3).attached is False  # the attached share (4) is taken
        assert running.enter_context(passes.slot("d", attached=False, per_tenant=2))
        assert passes.room(per_tenant=2) is None  # every pass slot is taken
    assert PassSlots().room(per_tenant=1) == Room(attached=True, full=frozenset(), attached_full=frozenset())


def test_one_sweep_at_a_time_in_a_worker_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # The schedule sends a sweep every minute and a sweep of slow clusters takes longer: a second
    # one must not take another pass thread beside it.
    from workers import tasks

    sweeping, release, swept = threading.Event(), threading.Event(), []

    def slow_sweep(context: object) -> list[object]:
        swept.append(threading.get_ident())
        sweeping.set()
        release.wait(10)
        return []

    monkeypatch.setattr(reconcile, "sweep_orphans", slow_sweep)
    monkeypatch.setattr(reconcile, "clean_up_deleted_accounts", lambda context: [])
    monkeypatch.setattr(tasks, "worker_context", lambda: None)
    first = threading.Thread(target=tasks.sweep_services)
    first.start()
    try:
        assert sweeping.wait(10)
        started = time.monotonic()
        tasks.sweep_services()  # returns at once: one sweep runs
        assert time.monotonic() - started < 1 and len(swept) == 1
    finally:
        release.set()
        first.join(10)
    tasks.sweep_services()  # the first one done: the next one sweeps
    assert len(swept) == 2


def test_an_attached_targets_pass_past_their_share_gives_its_lease_back(
    service_context: ServiceContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pass_slots, "threads", 8)  # a deploy worker's 8 threads: 4 for attached targets
    limit = service_context.settings.deploy_passes_per_tenant
    subscription = f"sub-{uuid.uuid4().hex[:8]}"
    with session_scope(service_context.session_factory) as session:
        image = new_image_row(session)
        session.execute(update(Image).where(Image.id == image.id).values(state="Succeeded"))
        session.execute(update(Account).where(Account.id == image.account_id).values(subscription_id=subscription))
        service = new_service_row(session, image, compute_name="theirs", compute_type="swarm", compute_attached=True)
        # A cluster is always the tenant's, whatever the row says.
        cluster = new_service_row(session, image, name="k", compute_name="k8s", compute_type="kubernetes")
    try:
        with ExitStack() as running:  # two slow tenants' passes on their swarms
            for tenant in ("slow-1", "slow-1", "slow-2", "slow-2"):
                assert running.enter_context(pass_slots.slot(tenant, attached=True, per_tenant=limit))
            _assert_put_off(service_context, service.id)
            _assert_put_off(service_context, cluster.id)
            with pass_slots.slot(subscription, attached=False, per_tenant=limit) as free:
                assert free  # its services on the operator's targets would run
    finally:
        with session_scope(service_context.session_factory) as session:
            session.execute(Account.__table__.delete().where(Account.id == service.account_id))


def test_a_worker_whose_pass_ends_takes_the_services_another_worker_process_put_off(
    service_context: ServiceContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two deploy worker processes: the first has its attached share taken by slow tenants and
    puts five passes off. A pass that ends in the second is followed there at once by the
    waiting ones, in their order in line, up to PASSES_A_TASK passes in all; the rest wait on."""
    limit = service_context.settings.deploy_passes_per_tenant
    first_process, second_process = PassSlots(threads=8), PassSlots(threads=8)
    ran: list[uuid.UUID] = []

    def a_pass(context: ServiceContext, lease: reconciler.Lease) -> None:  # all went well
        ran.append(lease.service_id)
        assert second_process.running() == {lease.subscription_id: 1}  # its own slot, no other
        with session_scope(context.session_factory) as session:
            reconciler.release(session, lease, due_in=reconciler.STEADY_SECONDS)

    monkeypatch.setattr(reconcile, "_pass", a_pass)
    with session_scope(service_context.session_factory) as session:
        other, *waiting = (_attached_service(session, f"sub-{uuid.uuid4().hex[:8]}") for _ in range(6))
    try:
        with ExitStack() as running:  # the first process's attached share: two slow tenants'
            for tenant in ("slow-1", "slow-1", "slow-2", "slow-2"):
                assert running.enter_context(first_process.slot(tenant, attached=True, per_tenant=limit))
            monkeypatch.setattr(reconcile, "pass_slots", first_process)
            for service_id in waiting:
                _assert_put_off(service_context, service_id)
            with session_scope(service_context.session_factory) as session:
                for n, service_id in enumerate(waiting):  # in line in this order, before any other test's
                    since = utcnow() - timedelta(days=1, seconds=60 - n)
                    session.execute(update(Service).where(Service.id == service_id).values(put_off_since=since))

            monkeypatch.setattr(reconcile, "pass_slots", second_process)
            reconcile.reconcile_service(service_context, other)  # runs, frees its slot, takes the next
            assert ran == [other, *waiting[: reconcile.PASSES_A_TASK - 1]]
            with session_scope(service_context.session_factory) as session:
                in_line = dict(
                    session.execute(select(Service.id, Service.put_off_since).where(Service.id.in_(waiting))).all()
                )
            assert [in_line[service_id] is not None for service_id in waiting] == [False, False, False, True, True]
    finally:
        with session_scope(service_context.session_factory) as session:
            accounts = select(Service.account_id).where(Service.id.in_([other, *waiting]))
            session.execute(Account.__table__.delete().where(Account.id.in_(accounts.scalar_subquery())))


def _attached_service(session: Session, subscription: str) -> uuid.UUID:
    """A new account's service on a swarm it attached."""
    image = new_image_row(session)
    session.execute(update(Image).where(Image.id == image.id).values(state="Succeeded"))
    session.execute(update(Account).where(Account.id == image.account_id).values(subscription_id=subscription))
    return new_service_row(session, image, compute_name="theirs", compute_type="swarm", compute_attached=True).id


def _assert_put_off(service_context: ServiceContext, service_id: uuid.UUID) -> None:
    """A pass of the service is put off at once: its lease given back, due in PUT_OFF_SECONDS
    (the first time it is put off), nothing moved."""
    before = utcnow()
    started = time.monotonic()
    reconcile.reconcile_service(service_context, service_id)
    assert time.monotonic() - started < 5  # put off, not waiting for a slot
    with session_scope(service_context.session_factory) as session:
        row = session.execute(
            select(Service.lease_owner, Service.lease_expires_at, Service.due_at, Service.attempt, Service.state).where(
                Service.id == service_id
            )
        ).one()
    assert row.lease_owner is None and row.lease_expires_at is None  # the lease given back
    assert row.attempt == 1  # claimed once
    assert row.state == "Transitioning"  # no pass ran: nothing moved
    due_in = (row.due_at - before).total_seconds()
    assert PUT_OFF_SECONDS - 1 <= due_in <= PUT_OFF_SECONDS + 2, due_in


def test_a_deploy_worker_bounds_attached_targets_passes_by_its_threads(tmp_path: Path) -> None:
    # The real command (embedded database and broker): the bound is read off the thread pool
    # Celery starts, whatever --concurrency says.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_") and k != "DOCKER_HOST"}
    env.update({"MMS_DATA_DIR": str(tmp_path / "data"), "MMS_LOG_FORMAT": "json"})
    command = [sys.executable, "-m", "workers", "worker", "--deploy", "--concurrency", "10", "--no-beat"]
    seen: list[str] = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as worker:
        bound = threading.Timer(60, worker.kill)  # a worker that never says it ends the read
        bound.start()
        try:
            assert worker.stdout is not None
            for line in worker.stdout:
                seen.append(line)
                if '"worker.pass_threads"' in line:
                    break
        finally:
            bound.cancel()
            worker.terminate()
            worker.communicate(timeout=60)
    event = json.loads(seen[-1]) if seen and '"worker.pass_threads"' in seen[-1] else None
    assert event is not None, "".join(seen)[-3000:]
    assert (event["threads"], event["limits"]) == (10, [8, 6, 3])
