"""Image state changes as events, read by the event stream, the ETags and the webhooks.

They are written by ``app.builds`` (``app.builds.events``), in the transaction of the move of
the build's ``CreationState`` they tell of, so every transition is seen once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from app.orm import ImageEvent


@dataclass(frozen=True)
class Event:
    """One committed state change, ready to send: ``data`` is the JSON body, id included."""

    id: int
    account_id: uuid.UUID
    image_id: uuid.UUID
    state: str  # the CreationState it moved to, or DELETED_STATE
    data: str


def render(event_id: int, payload: str) -> str:
    """The event's JSON body: its stored payload with its id first."""
    return f'{{"id":"{event_id}",{payload[1:]}'


def latest_event_id(session: Session) -> int:
    """The newest event's id (0 when there is none): where a fresh subscriber starts."""
    return session.scalar(select(func.max(ImageEvent.id))) or 0


def stream_start(session: Session, *, account_id: uuid.UUID, after_id: int) -> tuple[int, set[int]]:
    """The newest event's id, and the ids above ``after_id`` of the account's events, as one
    snapshot sees them (one statement: on PostgreSQL each has its own snapshot)."""
    newest = select(func.coalesce(func.max(ImageEvent.id), 0).label("newest")).subquery()
    rows = session.execute(
        select(newest.c.newest, ImageEvent.id.label("visible")).select_from(
            newest.outerjoin(ImageEvent, and_(ImageEvent.account_id == account_id, ImageEvent.id > after_id))
        )
    ).all()
    return rows[0].newest, {row.visible for row in rows if row.visible is not None}


def events_after(
    session: Session, *, after_id: int, account_id: uuid.UUID | None = None, limit: int = 500
) -> list[Event]:
    """Events with an id above ``after_id``, oldest first (one account's, or every account's)."""
    query = select(
        ImageEvent.id, ImageEvent.account_id, ImageEvent.image_id, ImageEvent.state, ImageEvent.payload
    ).where(ImageEvent.id > after_id)
    if account_id is not None:
        query = query.where(ImageEvent.account_id == account_id)
    rows = session.execute(query.order_by(ImageEvent.id).limit(limit)).all()
    return [Event(row.id, row.account_id, row.image_id, row.state, render(row.id, row.payload)) for row in rows]
