"""What a move of a build records: an event, in the transaction that moves it, for the event
stream, the ETags and the webhooks (one delivery per active webhook of the account).

Only ``app.builds.transitions`` records events (the reaper prunes old ones); ``app.services.events``
reads what it wrote.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.builds.states import DELETED_STATE, build_error
from app.orm import Account, Image, ImageEvent, Webhook, WebhookDelivery
from app.orm.base import utcnow

EVENT_TYPE = "ImageStateChanged"
DELETED_TYPE = "ImageDeleted"

# What an event tells of the image (the row as it is after the move, or as it was when deleted).
IMAGE_COLUMNS = (
    Image.id,
    Image.account_id,
    Image.name,
    Image.version,
    Image.state,
    Image.error,
    Image.image_location,
    Image.digest,
    Image.smoke_test,
    Image.smoke_test_reason,
)


def record_state_changes(session: Session, image_ids: Iterable[uuid.UUID]) -> list[int]:
    """Append an event for each image's current state and queue it for the account's webhooks."""
    ids = list(dict.fromkeys(image_ids))
    if not ids:
        return []
    # Columns, not entities: a bulk UPDATE just changed these rows under the identity map.
    rows = session.execute(select(*IMAGE_COLUMNS).where(Image.id.in_(ids))).all()
    return record_events(session, rows, deleted=False)


def record_events(session: Session, rows: Sequence, *, deleted: bool) -> list[int]:  # type: ignore[type-arg]
    """Events for ``rows`` (``IMAGE_COLUMNS`` each): state changes, or deletions."""
    if not rows:
        return []
    accounts = {
        row.id: row
        for row in session.execute(
            select(Account.id, Account.subscription_id, Account.resource_group, Account.name).where(
                Account.id.in_({row.account_id for row in rows})
            )
        )
    }
    now = utcnow()
    events = [
        ImageEvent(
            account_id=row.account_id,
            image_id=row.id,
            state=DELETED_STATE if deleted else row.state.value,
            created_at=now,
            payload=json.dumps(_payload(row, accounts[row.account_id], now, deleted), separators=(",", ":")),
        )
        for row in rows
    ]
    session.add_all(events)
    session.flush()
    _queue_deliveries(session, events, now)
    return [event.id for event in events]


def _payload(row, account, now: datetime, deleted: bool) -> dict[str, object]:  # type: ignore[no-untyped-def]
    error = build_error(row.state, row.error)
    return {
        "type": DELETED_TYPE if deleted else EVENT_TYPE,
        "time": now.isoformat(),
        "account": f"/subscriptions/{account.subscription_id}/resourceGroups/{account.resource_group}"
        f"/accounts/{account.name}",
        "image": {
            "Id": str(row.id),
            "Name": row.name,
            "Version": row.version,
            "CreationState": row.state.value,
            "ImageLocation": row.image_location,
            "Digest": row.digest,
            "Error": None if error is None else {"code": error[0], "message": error[1]},
            "SmokeTest": row.smoke_test and {"result": row.smoke_test, "reason": row.smoke_test_reason},
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


def prune_events(session: Session, *, older_than: datetime) -> int:
    """Forget events (and their deliveries) recorded before ``older_than``."""
    return session.execute(delete(ImageEvent).where(ImageEvent.created_at < older_than)).rowcount
