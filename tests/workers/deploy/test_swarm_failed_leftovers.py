"""A Failed service on a swarm whose older generations lie past the MAX_OTHER_GENERATIONS a
pass observes: each pass removes more of them (SwarmDriver.remove_generations) and, while some
are left, the next pass comes in STEADY_SECONDS, not FAILED_SECONDS. Through the real pass
(workers.deploy.reconcile.reconcile_service), on a driver that stands for the swarm."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.deployments.reconciler import FAILED_SECONDS, STEADY_SECONDS
from app.deployments.states import ServiceState
from app.orm import Service
from app.orm.base import utcnow
from tests.factories import new_service_row
from workers.deploy import reconcile
from workers.deploy.reconcile import reconcile_service
from workers.deploy.swarm import MAX_REMOVED_SERVICES, SwarmDriver


class _Swarm(SwarmDriver):
    """A swarm holding ``left`` generations of the service, none of them among those a pass
    observes (the newest ones went already)."""

    def __init__(self, left: int) -> None:  # no engine
        self.left = left
        self.calls = 0

    def close(self) -> None:
        pass

    def observe(self, spec):  # type: ignore[no-untyped-def]
        return [], None

    def read_logs(self, spec, replicas):  # type: ignore[no-untyped-def]
        return []

    def remove(self, replica_ids: Sequence[str]) -> None:
        pass

    def remove_generations(self, service_id: uuid.UUID) -> bool:
        self.calls += 1
        self.left = max(0, self.left - MAX_REMOVED_SERVICES)
        return self.left == 0


def _due_in(db: Session, service_id: uuid.UUID) -> float:
    due_at = db.scalar(select(Service.due_at).where(Service.id == service_id))
    assert due_at is not None
    return (due_at - utcnow()).total_seconds()


def test_a_failed_swarm_service_removes_its_older_generations_pass_after_pass(
    app_context: ServiceContext, db: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    swarm = _Swarm(left=2 * MAX_REMOVED_SERVICES + 1)
    monkeypatch.setattr(reconcile, "_swarm_driver", lambda context, docker_host: swarm)
    workers = ServiceContext.build(
        app_context.settings.model_copy(update={"swarm_docker_host": "tcp://swarm.example.com:2376"}),
        engine=app_context.engine,
        session_factory=app_context.session_factory,
        read_session_factory=app_context.read_session_factory,
    )
    service = new_service_row(db)
    db.execute(
        update(Service)
        .where(Service.id == service.id)
        .values(compute_type="swarm", compute_name="swarm", state=ServiceState.FAILED, error="it failed")
    )
    db.flush()
    for _ in range(3):  # 17 generations left, 8 removed a pass
        db.execute(update(Service).where(Service.id == service.id).values(due_at=utcnow()))
        reconcile_service(workers, service.id)
        if swarm.left:
            assert _due_in(db, service.id) <= STEADY_SECONDS
    assert swarm.calls == 3 and swarm.left == 0
    assert _due_in(db, service.id) >= FAILED_SECONDS - 5  # nothing left: looked at rarely
    assert db.scalar(select(Service.state).where(Service.id == service.id)) == ServiceState.FAILED
