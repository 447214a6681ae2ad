"""A plain delete of a service on a built-in target always completes, also once the operator
has removed that target from the workers (MMS_SWARM_DOCKER_HOST unset, MMS_LOCAL_COMPUTE off
with no engine) after the service was made: force delete is refused there
(app.deployments.lifecycle.force_delete), so nothing else could end it. A target that is set
but does not answer is away, not removed: the delete waits for it. Through the real pass
(workers.deploy.reconcile.reconcile_service); no engine is reached."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.deployments.lifecycle import request_delete
from app.deployments.states import OperationState
from app.orm import Service, ServiceOperation
from tests.factories import new_service_row
from workers.deploy import reconcile
from workers.deploy.reconcile import reconcile_service


def _workers(app_context: ServiceContext, **settings: object) -> ServiceContext:
    """The deploy workers' context, on the test's transaction, with these settings."""
    return ServiceContext.build(
        app_context.settings.model_copy(update=settings),
        engine=app_context.engine,
        session_factory=app_context.session_factory,
        read_session_factory=app_context.read_session_factory,
    )


def _deleting(db: Session, compute_type: str) -> tuple[uuid.UUID, uuid.UUID]:
    """A service on the built-in target ``compute_type``, Deleting; its id and its Delete operation's."""
    service = new_service_row(db)
    db.execute(
        update(Service).where(Service.id == service.id).values(compute_type=compute_type, compute_name=compute_type)
    )
    operation = request_delete(db, service, scoring_url="http://scoring.example.com")
    db.flush()
    return service.id, operation.id


@pytest.fixture()
def no_local_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No engine answers, and none is at the default socket."""
    monkeypatch.setattr(reconcile, "local_engine", lambda settings: (None, "no Docker engine: set DOCKER_HOST"))
    monkeypatch.setattr(reconcile, "DEFAULT_DOCKER_SOCKET", str(tmp_path / "docker.sock"))


@pytest.mark.parametrize(
    ("compute_type", "removed"),
    [("swarm", {"swarm_docker_host": None}), ("local", {"local_compute": False})],
)
def test_a_delete_on_a_built_in_target_the_workers_no_longer_have_completes(
    app_context: ServiceContext, db: Session, no_local_engine: None, compute_type: str, removed: dict
) -> None:
    service_id, operation_id = _deleting(db, compute_type)
    reconcile_service(_workers(app_context, **removed), service_id)
    assert db.scalar(select(Service.id).where(Service.id == service_id)) is None
    operation = db.get_one(ServiceOperation, operation_id)
    db.refresh(operation)
    assert operation.state is OperationState.SUCCEEDED and operation.error is None


def test_a_delete_on_a_built_in_target_that_does_not_answer_waits_for_it(
    app_context: ServiceContext, db: Session, no_local_engine: None
) -> None:
    """`local` is still a target (MMS_LOCAL_COMPUTE on), its engine away: the service stays
    Deleting and is tried again, as before."""
    service_id, operation_id = _deleting(db, "local")
    reconcile_service(_workers(app_context, local_compute=True), service_id)
    assert db.scalar(select(Service.state).where(Service.id == service_id)) == "Deleting"
    operation = db.get_one(ServiceOperation, operation_id)
    db.refresh(operation)
    assert operation.state is OperationState.RUNNING


def test_a_local_delete_with_the_target_off_but_an_engine_socket_there_waits_for_it(
    app_context: ServiceContext, db: Session, no_local_engine: None, tmp_path: Path
) -> None:
    """MMS_LOCAL_COMPUTE off, but the default socket is there and its engine does not answer (it
    restarts, say): away, not removed, whatever its answer; what it runs keeps its row."""
    socket_path = tmp_path / "docker.sock"
    socket_path.touch()
    service_id, operation_id = _deleting(db, "local")
    reconcile_service(_workers(app_context, local_compute=False), service_id)
    assert db.scalar(select(Service.state).where(Service.id == service_id)) == "Deleting"
    operation = db.get_one(ServiceOperation, operation_id)
    db.refresh(operation)
    assert operation.state is OperationState.RUNNING
