"""Every move of an image's build, in one table, applied by one function.

``TRANSITIONS`` names each move and the (from, to) pairs it may make; ``None`` stands for
no row (before the build is created, after it is deleted). ``move`` is the only code that
writes ``Image.state``: one conditional UPDATE (or DELETE) ``WHERE state IN (<the allowed
from-states>) AND <the caller's conditions>``, so two API processes or workers racing for the
same build cannot both win: the database decides, and the loser's statement matches no row.
A move that changes what the build looks like records its event (and webhook deliveries) in
the same transaction, through ``app.builds.events``; a move that ends a build also counts its
duration there (``app.builds.durations``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, delete, select, update
from sqlalchemy.orm import Session

from app.builds.durations import count_finished
from app.builds.events import IMAGE_COLUMNS, record_events, record_state_changes
from app.builds.states import CreationState
from app.orm import Image
from app.orm.base import utcnow
from app.transition_table import IllegalTransition, TransitionTable

log = logging.getLogger("mms.builds")

NOT_STARTED, RUNNING = CreationState.NOT_STARTED, CreationState.RUNNING
SUCCEEDED, FAILED, CANCELLED = CreationState.SUCCEEDED, CreationState.FAILED, CreationState.CANCELLED
GONE = None  # no row: before create, after delete

State = CreationState | None


class Transition(enum.StrEnum):
    CREATE = "create"  # the API records a build
    CLAIM = "claim"  # a worker takes it (a lapsed lease may be taken over: Running → Running)
    RENEW = "renew"  # the worker's heartbeat extends its lease
    HAND_BACK = "hand back"  # the worker is stopping: release the build to the queue
    FINISH = "finish"  # the worker records the outcome
    CANCEL = "cancel"  # the tenant cancels a queued build
    REQUEST_CANCEL = "request cancel"  # the tenant asks the worker of a running build to stop
    REAP_CANCELLED = "reap cancelled"  # its worker went quiet after a cancel was asked for
    REAP_ABANDONED = "reap abandoned"  # its workers went quiet too many times
    REAP_LAPSED = "reap lapsed"  # its worker went quiet: back to the queue
    REAP_OVERDUE = "reap overdue"  # it ran past the run deadline
    REAP_STALE = "reap stale"  # it waited past the queue deadline
    REPUBLISH = "republish"  # it was never (or long ago) sent to the queue: ring again
    DELETE = "delete"  # the tenant deletes an image that is not being built
    DELETE_WITH_ACCOUNT = "delete with account"  # the account goes, and every image in it


TRANSITIONS: dict[Transition, frozenset[tuple[State, State]]] = {
    Transition.CREATE: frozenset({(GONE, NOT_STARTED)}),
    Transition.CLAIM: frozenset({(NOT_STARTED, RUNNING), (RUNNING, RUNNING)}),
    Transition.RENEW: frozenset({(RUNNING, RUNNING)}),
    Transition.HAND_BACK: frozenset({(RUNNING, NOT_STARTED)}),
    Transition.FINISH: frozenset({(RUNNING, SUCCEEDED), (RUNNING, FAILED), (RUNNING, CANCELLED)}),
    Transition.CANCEL: frozenset({(NOT_STARTED, CANCELLED)}),
    Transition.REQUEST_CANCEL: frozenset({(RUNNING, RUNNING)}),
    Transition.REAP_CANCELLED: frozenset({(RUNNING, CANCELLED)}),
    Transition.REAP_ABANDONED: frozenset({(RUNNING, FAILED)}),
    Transition.REAP_LAPSED: frozenset({(RUNNING, NOT_STARTED)}),
    Transition.REAP_OVERDUE: frozenset({(RUNNING, FAILED)}),
    Transition.REAP_STALE: frozenset({(NOT_STARTED, FAILED)}),
    Transition.REPUBLISH: frozenset({(NOT_STARTED, NOT_STARTED)}),
    Transition.DELETE: frozenset({(state, GONE) for state in CreationState if state is not RUNNING}),
    Transition.DELETE_WITH_ACCOUNT: frozenset({(state, GONE) for state in CreationState}),
}

# Moves that leave the build as it was to anyone looking (a lease, a flag, a queue stamp): no event.
SILENT = frozenset({Transition.RENEW, Transition.REQUEST_CANCEL, Transition.REPUBLISH})


_TABLE = TransitionTable(TRANSITIONS, "build")
allowed_sources = _TABLE.allowed_sources
only_target = _TABLE.only_target


_ONLY: Any = object()


def move(
    session: Session,
    transition: Transition,
    *where: ColumnElement[bool],
    to: State = _ONLY,
    returning: Sequence[Any] = (),
    **values: object,
) -> Sequence[Row[Any]]:
    """Apply ``transition`` to the builds matching ``where`` that are in an allowed state;
    the rows it applied to (``Image.id`` first, then ``returning``), empty when none."""
    target = only_target(transition) if to is _ONLY else to
    sources = allowed_sources(transition, target)
    if GONE in sources:
        raise IllegalTransition(f"{transition} makes a build: use create()")
    condition = and_(Image.state.in_(sources), *where)
    if target is GONE:
        if values:
            raise IllegalTransition(f"{transition} deletes the build: there is nothing to set")
        # The deleted rows as they were: what their deletion events tell.
        rows = session.execute(delete(Image).where(condition).returning(*IMAGE_COLUMNS, *returning)).all()
        record_events(session, rows, deleted=True)
    else:
        values["state"] = target  # the same state for a silent move: the WHERE is what counts
        rows = session.execute(update(Image).where(condition).values(**values).returning(Image.id, *returning)).all()
        if transition not in SILENT:
            record_state_changes(session, [row.id for row in rows])
        if rows and target.is_final:
            ended = select(Image.builder, Image.state, Image.started_at, Image.ended_at)
            count_finished(session, session.execute(ended.where(Image.id.in_([row.id for row in rows]))).all())
    if rows:
        log.debug("build.moved", extra={"transition": str(transition), "to": target, "builds": len(rows)})
    return rows


def create(session: Session, **fields: object) -> Image:
    """Record a new build (``fields``: the Image's columns but its state) and its first event."""
    image = Image(state=only_target(Transition.CREATE), published_at=utcnow(), **fields)
    session.add(image)
    session.flush()
    record_state_changes(session, [image.id])
    return image
