"""The tenant's moves of a service: create it, change it, delete it (alone, at once with
force, or with its account); each but the last records the operation a client polls."""

from __future__ import annotations

import uuid

from sqlalchemy import case, select, update
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session

from app.deployments.cluster_cleanup import queue_cleanups
from app.deployments.states import OperationKind, OperationState, ServiceState
from app.deployments.transitions import Transition, create, move
from app.errors import Conflict, NotFound
from app.orm import Service, ServiceOperation
from app.orm.base import utcnow


def _start_operation(session: Session, service: Service, kind: OperationKind) -> ServiceOperation:
    operation = ServiceOperation(
        account_id=service.account_id, service_id=service.id, kind=kind.value, state=OperationState.RUNNING
    )
    session.add(operation)
    session.flush()
    return operation


def create_service(session: Session, **fields: object) -> tuple[Service, ServiceOperation]:
    """Record a service as Transitioning (``fields``: its other columns) and its Create operation."""
    service = create(session, **fields)
    return service, _start_operation(session, service, OperationKind.CREATE)


def update_service(
    session: Session, service: Service, *, scoring_url: str, new_generation: bool = False, **values: object
) -> ServiceOperation:
    """Apply a new desired spec to a settled service in one statement; 409 while another
    change is being applied or the service is being deleted. ``new_generation``: the change
    needs new replicas (an image swap, a resize). (``scoring_url``: for its event.)"""
    changed = {"revision": Service.revision + 1, "changed_at": utcnow(), "due_at": utcnow()}
    if new_generation:
        changed |= _next_generation()
    if not move(session, Transition.UPDATE, Service.id == service.id, scoring_url=scoring_url, **changed, **values):
        _reread(session, service)
        if service.state is ServiceState.DELETING:
            raise Conflict(f"service '{service.name}' is being deleted", code="ServiceDeleting")
        raise Conflict(
            f"service '{service.name}' is {service.state}: wait until the change being applied ends",
            code="ServiceBusy",
        )
    _reread(session, service)
    return _start_operation(session, service, OperationKind.UPDATE)


def _next_generation() -> dict[str, object]:
    """The columns of an update that starts a new generation, as the UPDATE's own expressions
    (each reads the row as it was): a number above every one given before, and, when the spec
    being replaced is the one that serves, that spec kept for a roll back (while an earlier
    rollout is still on, the serving spec it kept stays)."""
    serves = Service.traffic_generation == Service.generation  # NULL (never served): false

    def kept(spec: object, serving: object) -> object:
        return case((serves, spec), else_=serving)

    return {
        "generation": Service.last_generation + 1,
        "last_generation": Service.last_generation + 1,
        "serving_image_id": kept(Service.image_id, Service.serving_image_id),
        "serving_cpu": kept(Service.cpu, Service.serving_cpu),
        "serving_memory_gb": kept(Service.memory_gb, Service.serving_memory_gb),
    }


def request_delete(session: Session, service: Service, *, scoring_url: str) -> ServiceOperation:
    """Mark a service Deleting (the reconciler removes what it made, then the row); asked
    again, the delete already under way. (``scoring_url``: for its event.)"""
    changed = {"revision": Service.revision + 1, "changed_at": utcnow(), "due_at": utcnow()}
    if move(session, Transition.REQUEST_DELETE, Service.id == service.id, scoring_url=scoring_url, **changed):
        _reread(session, service)
        _end_superseded(session, service)
        return _start_operation(session, service, OperationKind.DELETE)
    _reread(session, service)  # 404 when it is already gone
    running = latest_operations(session, [service.id], kind=OperationKind.DELETE).get(service.id)
    if running is None:  # deleting since before operations were recorded: record one now
        return _start_operation(session, service, OperationKind.DELETE)
    return running


def _end_superseded(session: Session, service: Service) -> None:
    """A create or update still being applied when the delete comes never will be: its
    operation ends now (the reconciler's verdicts end only the operation they are about)."""
    session.execute(
        update(ServiceOperation)
        .where(ServiceOperation.service_id == service.id, ServiceOperation.state == OperationState.RUNNING)
        .values(
            state=OperationState.FAILED,
            error="the service was deleted before this change was applied",
            ended_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )


def force_delete(session: Session, service: Service, *, max_cleanups: int) -> ServiceOperation:
    """Forget a service on a target the account attached now, whatever its state, without
    waiting for that target (one that will never answer again): its Delete operation (the one
    under way, or a new one) ends Succeeded, and the row goes with its replicas (the gateway
    routes to it no more) and its log lines. What the target still runs of it is removed later,
    through the row queued for it (app.deployments.cluster_cleanup); refused (409, the service
    untouched) when the account already has ``max_cleanups`` of those pending. 404 when another
    request deleted it first; 409 on a built-in target (``local``, the operator's swarm), whose plain
    delete always completes: forgotten at once, what it ran would outlive its row (and the
    account's service cap) until the orphan sweep."""
    _reread(session, service, lock=True)  # held until the commit: a delete racing this one waits
    if not service.compute_attached:
        raise Conflict(
            f"service '{service.name}' runs on the built-in target '{service.compute_name}': delete it without "
            "force, a delete its target always completes",
            code="ForceDeleteNotAllowed",
        )
    operation = latest_operations(session, [service.id], kind=OperationKind.DELETE).get(service.id)
    if operation is None or operation.state is not OperationState.RUNNING:  # not Deleting yet
        _end_superseded(session, service)
        operation = _start_operation(session, service, OperationKind.DELETE)
    queue_cleanups(session, service.account_id, service_ids=[service.id], cap=max_cleanups)
    # Its deletion event as the reconciler's end of a delete records it; losing a race to another
    # delete, the 404 rolls the cleanup row back with the rest.
    if not move(session, Transition.FORCE_DELETE, Service.id == service.id, to=None):
        raise NotFound(f"service '{service.id}' was not found in this account", code="ServiceNotFound")
    # As every operation's end is written here: a statement (the session's object follows it).
    session.execute(
        update(ServiceOperation)
        .where(ServiceOperation.id == operation.id)
        .values(state=OperationState.SUCCEEDED, ended_at=utcnow())
    )
    return operation


def delete_account_services(session: Session, account_id: uuid.UUID) -> None:
    """Forget every service of an account that is going (the reconciler's orphan sweep
    removes what the orchestrator still runs for them; a kubernetes service's objects, or those
    of a service on a swarm the account attached, are removed from there through the row left
    for it, app.deployments.cluster_cleanup)."""
    queue_cleanups(session, account_id)
    move(session, Transition.DELETE_WITH_ACCOUNT, Service.account_id == account_id, to=None)


def latest_operations(
    session: Session, service_ids: list[uuid.UUID], *, kind: OperationKind | None = None
) -> dict[uuid.UUID, ServiceOperation]:
    """The newest operation (of ``kind``, when given) of each service."""
    if not service_ids:
        return {}
    query = select(ServiceOperation).where(ServiceOperation.service_id.in_(service_ids))
    if kind is not None:
        query = query.where(ServiceOperation.kind == kind.value)
    newest: dict[uuid.UUID, ServiceOperation] = {}
    for operation in session.scalars(query.order_by(ServiceOperation.created_at, ServiceOperation.id)):
        assert operation.service_id is not None
        newest[operation.service_id] = operation
    return newest


def _reread(session: Session, service: Service, *, lock: bool = False) -> None:
    """``service`` as the database has it now (``lock``: its row locked until the commit); 404
    once another request deleted it."""
    service_id = service.id  # read now: a refresh that finds no row leaves the object unreadable
    try:
        session.refresh(service, with_for_update=lock or None)
    except InvalidRequestError:  # the row is gone
        raise NotFound(f"service '{service_id}' was not found in this account", code="ServiceNotFound") from None
