"""The account event log (image and web service state changes) as events, read by the event
streams, the ETags and the webhooks.

They are written through ``app.event_log`` by the owners of those states (``app.builds``,
``app.deployments``), in the transaction of the move they tell of, so every change is seen once.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from app.orm import Event


@dataclass(frozen=True)
class StreamEvent:
    """One committed state change: ``id`` is internal (ordering, cursors); clients see
    ``render(token, payload)`` under the id's token (``app.services.event_ids``)."""

    id: int
    account_id: uuid.UUID
    kind: str  # a SubjectKind: image, service
    subject_id: uuid.UUID
    state: str  # the state it moved to, or Deleted
    payload: str


def render(token: str, payload: str) -> str:
    """The event's JSON body: its stored payload with its id's token first."""
    return f'{{"id":"{token}",{payload[1:]}'


def latest_event_id(session: Session) -> int:
    """The newest event's id (0 when there is none): where the event hub starts."""
    return session.scalar(select(func.max(Event.id))) or 0


def stream_start(session: Session, *, account_id: uuid.UUID, after_id: int) -> tuple[int, set[int]]:
    """The account's newest event's id (0 when it has none), and the ids above ``after_id`` of
    its events, as one snapshot sees them (one statement: on PostgreSQL each has its own
    snapshot). Only the account's own: where a stream starts must not move with other
    accounts' activity."""
    newest = (
        select(func.coalesce(func.max(Event.id), 0).label("newest")).where(Event.account_id == account_id).subquery()
    )
    rows = session.execute(
        select(newest.c.newest, Event.id.label("visible")).select_from(
            newest.outerjoin(Event, and_(Event.account_id == account_id, Event.id > after_id))
        )
    ).all()
    return rows[0].newest, {row.visible for row in rows if row.visible is not None}


def events_after(
    session: Session,
    *,
    after_id: int,
    account_id: uuid.UUID | None = None,
    kinds: Collection[str] | None = None,
    limit: int = 500,
) -> list[StreamEvent]:
    """Events with an id above ``after_id``, oldest first (one account's, or every account's;
    of ``kinds`` only, when given)."""
    query = select(Event.id, Event.account_id, Event.subject_kind, Event.subject_id, Event.state, Event.payload).where(
        Event.id > after_id
    )
    if account_id is not None:
        query = query.where(Event.account_id == account_id)
    if kinds is not None:
        query = query.where(Event.subject_kind.in_(kinds))
    rows = session.execute(query.order_by(Event.id).limit(limit)).all()
    return [
        StreamEvent(row.id, row.account_id, row.subject_kind, row.subject_id, row.state, row.payload) for row in rows
    ]
