"""Every move of a web service, in one table, applied by one function.

``TRANSITIONS`` names each move and the (from, to) pairs it may make; ``None`` stands for no
row (before the service is created, after it is deleted). ``move`` is the only code that
writes ``Service.state``: one conditional UPDATE (or DELETE) ``WHERE state IN (<the allowed
from-states>) AND <the caller's conditions>``, so two API requests or reconciler passes racing
for the same service cannot both win: the database decides, and the loser's statement
matches no row. A move that changes what a client sees of the service records its event (and
webhook deliveries) in the same transaction, through ``app.deployments.events``.

One departure from docs/design/web-services.md §3: a delete asked for is a state,
``Deleting``, not a flag beside the state, so that the table itself refuses a PATCH or a
reconciler's CONVERGE of a service that is going.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, delete, update
from sqlalchemy.orm import Session

from app.deployments.events import SERVICE_COLUMNS, record_deletions, record_state_changes
from app.deployments.states import ServiceState
from app.orm import Service
from app.orm.base import utcnow
from app.transition_table import IllegalTransition, TransitionTable

log = logging.getLogger("mms.deployments")

TRANSITIONING, HEALTHY, UNHEALTHY = ServiceState.TRANSITIONING, ServiceState.HEALTHY, ServiceState.UNHEALTHY
FAILED, DELETING = ServiceState.FAILED, ServiceState.DELETING
GONE = None  # no row: before create, after delete

State = ServiceState | None


class Transition(enum.StrEnum):
    CREATE = "create"  # the API records a service
    UPDATE = "update"  # the tenant swaps the image, scales, resizes or switches key auth
    CONVERGE = "converge"  # the reconciler: every desired replica of the traffic generation is ready
    DEGRADE = "degrade"  # the reconciler: fewer ready, or the orchestrator unreachable
    FAIL = "fail"  # the reconciler: the build failed, or the generation never became ready
    ROLL_BACK = "roll back"  # the reconciler: an update's new generation failed; the old one serves on
    OBSERVE = "observe"  # the reconciler: counts and lease, the state as it was
    REQUEST_DELETE = "request delete"  # the tenant deletes: the reconciler removes what it made
    DELETE = "delete"  # the reconciler, once the orchestrator holds nothing of the service
    DELETE_WITH_ACCOUNT = "delete with account"  # the account goes, and every service in it
    FORCE_DELETE = "force delete"  # the tenant: the row goes now, its target never asked (it may be gone)


TRANSITIONS: dict[Transition, frozenset[tuple[State, State]]] = {
    Transition.CREATE: frozenset({(GONE, TRANSITIONING)}),
    Transition.UPDATE: frozenset({(HEALTHY, TRANSITIONING), (UNHEALTHY, TRANSITIONING), (FAILED, TRANSITIONING)}),
    Transition.CONVERGE: frozenset({(TRANSITIONING, HEALTHY), (UNHEALTHY, HEALTHY)}),
    Transition.DEGRADE: frozenset({(HEALTHY, UNHEALTHY), (TRANSITIONING, UNHEALTHY)}),
    # From Unhealthy too: a rollout the orchestrator was unreachable during, then failed.
    Transition.FAIL: frozenset({(TRANSITIONING, FAILED), (UNHEALTHY, FAILED)}),
    Transition.ROLL_BACK: frozenset(
        {(TRANSITIONING, HEALTHY), (TRANSITIONING, UNHEALTHY), (UNHEALTHY, HEALTHY), (UNHEALTHY, UNHEALTHY)}
    ),
    Transition.OBSERVE: frozenset({(state, state) for state in ServiceState}),
    Transition.REQUEST_DELETE: frozenset({(state, DELETING) for state in ServiceState if state is not DELETING}),
    Transition.DELETE: frozenset({(DELETING, GONE)}),
    Transition.DELETE_WITH_ACCOUNT: frozenset({(state, GONE) for state in ServiceState}),
    Transition.FORCE_DELETE: frozenset({(state, GONE) for state in ServiceState}),
}

# Moves that leave the service as it was to anyone looking: updated_at stays, and no event.
SILENT = frozenset({Transition.OBSERVE})


_TABLE = TransitionTable(TRANSITIONS, "service")
allowed_sources = _TABLE.allowed_sources
only_target = _TABLE.only_target


_ONLY: Any = object()


def move(
    session: Session,
    transition: Transition,
    *where: ColumnElement[bool],
    to: State = _ONLY,
    returning: Sequence[Any] = (),
    scoring_url: str | None = None,
    **values: object,
) -> Sequence[Row[Any]]:
    """Apply ``transition`` to the services matching ``where`` that are in an allowed state;
    the rows it applied to (``Service.id`` first, then ``returning``), empty when none.
    ``values``: the other columns to set in the same statement (the new spec of an UPDATE).
    ``scoring_url``: the scoring gateway's address (MMS_SCORING_URL), for the scoringUri of the
    move's event; without it that is null."""
    target = only_target(transition) if to is _ONLY else to
    sources = allowed_sources(transition, target)
    if GONE in sources:
        raise IllegalTransition(f"{transition} makes a service: use create()")
    condition = and_(Service.state.in_(sources), *where)
    if target is GONE:
        if values:
            raise IllegalTransition(f"{transition} deletes the service: there is nothing to set")
        # The deleted rows as they were: what their deletion events tell.
        rows = session.execute(delete(Service).where(condition).returning(*SERVICE_COLUMNS, *returning)).all()
        record_deletions(session, rows)
    else:
        values["state"] = target  # the same state for a silent move: the WHERE is what counts
        if transition not in SILENT:
            values.setdefault("updated_at", utcnow())
        rows = session.execute(
            update(Service).where(condition).values(**values).returning(Service.id, *returning)
        ).all()
        if transition not in SILENT:
            record_state_changes(session, [row.id for row in rows], scoring_url=scoring_url)
    if rows:
        log.debug("service.moved", extra={"transition": str(transition), "to": target, "services": len(rows)})
    return rows


def bookkeep(
    session: Session, *where: ColumnElement[bool], returning: Sequence[Any] = (), **values: object
) -> Sequence[Row[Any]]:
    """Set the reconciler's own columns (its lease, the next pass's due time) of the services
    matching ``where``, never the state: one UPDATE; the rows (``Service.id`` first)."""
    if "state" in values:
        raise IllegalTransition("bookkeeping never sets a state: use move()")
    return session.execute(
        update(Service)
        .where(*where)
        .values(**values)
        .returning(Service.id, *returning)
        .execution_options(synchronize_session=False)
    ).all()


def create(session: Session, **fields: object) -> Service:
    """Record a new service (``fields``: the Service's columns but its state) and its first
    event (no scoringUri yet: nothing takes requests)."""
    service = Service(state=only_target(Transition.CREATE), **fields)
    session.add(service)
    session.flush()
    record_state_changes(session, [service.id], scoring_url=None)
    return service
