"""Image state changes as events: written in the transaction that changes the state, read
by the event stream and sent by the webhooks.

Every code path that moves a build's ``CreationState`` calls ``record_state_changes`` with
the ids its UPDATE touched, so the stream and the webhooks see every transition once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, delete, func, select
from sqlalchemy.orm import Session

from app.orm import Account, Image, ImageEvent, Webhook, WebhookDelivery
from app.orm.base import utcnow

EVENT_TYPE = "ImageStateChanged"
DELETED_TYPE = "ImageDeleted"
DELETED_STATE = "Deleted"  # the state column of a deletion event


@dataclass(frozen=True)
class Event:
    """One committed state change, ready to send: ``data`` is the JSON body, id included."""

    id: int
    account_id: uuid.UUID
    image_id: uuid.UUID
    state: str  # the CreationState it moved to, or Deleted
    data: str


def record_state_changes(session: Session, image_ids: Iterable[uuid.UUID], *, deleted: bool = False) -> list[int]:
    """Append an event for each image's current state (or its deletion, called just before it),
    and queue it for the account's webhooks."""
    ids = list(dict.fromkeys(image_ids))
    if not ids:
        return []
    # Columns, not entities: a bulk UPDATE just changed these rows under the identity map.
    rows = session.execute(
        select(
            Image.id,
            Image.account_id,
            Image.name,
            Image.version,
            Image.state,
            Image.error,
            Image.image_location,
            Image.digest,
            Account.subscription_id,
            Account.resource_group,
            Account.name.label("account_name"),
        )
        .join(Account, Account.id == Image.account_id)
        .where(Image.id.in_(ids))
    ).all()
    now = utcnow()
    events = [
        ImageEvent(
            account_id=row.account_id,
            image_id=row.id,
            state=DELETED_STATE if deleted else row.state,
            created_at=now,
            payload=json.dumps(_payload(row, now, deleted), separators=(",", ":")),
        )
        for row in rows
    ]
    session.add_all(events)
    session.flush()
    _queue_deliveries(session, events, now)
    return [event.id for event in events]


def _payload(row, now: datetime, deleted: bool) -> dict[str, object]:  # type: ignore[no-untyped-def]
    error = None
    if row.state in ("Failed", "Cancelled") and row.error:
        error = {"code": f"Build{row.state}", "message": row.error}
    return {
        "type": DELETED_TYPE if deleted else EVENT_TYPE,
        "time": now.isoformat(),
        "account": f"/subscriptions/{row.subscription_id}/resourceGroups/{row.resource_group}"
        f"/accounts/{row.account_name}",
        "image": {
            "Id": str(row.id),
            "Name": row.name,
            "Version": row.version,
            "CreationState": row.state,
            "ImageLocation": row.image_location,
            "Digest": row.digest,
            "Error": error,
        },
    }


def _queue_deliveries(session: Session, events: list[ImageEvent], now: datetime) -> None:
    accounts = {event.account_id for event in events}
    hooks = session.execute(
        select(Webhook.id, Webhook.account_id).where(Webhook.account_id.in_(accounts), Webhook.active.is_(True))
    ).all()
    session.add_all(
        WebhookDelivery(webhook_id=hook.id, event_id=event.id, next_attempt_at=now)
        for event in events
        for hook in hooks
        if hook.account_id == event.account_id
    )
    session.flush()


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


def image_version(session: Session, image_id: uuid.UUID) -> int:
    """The id of the image's newest event: it changes exactly when the image's representation does."""
    return session.scalar(select(func.max(ImageEvent.id)).where(ImageEvent.image_id == image_id)) or 0


def prune_events(session: Session, *, older_than: datetime) -> int:
    """Forget events (and their deliveries) recorded before ``older_than``."""
    return session.execute(delete(ImageEvent).where(ImageEvent.created_at < older_than)).rowcount
