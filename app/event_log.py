"""The account event log's one writer, shared by the two state owners: ``app.builds`` records
its images' state changes here, ``app.deployments`` its web services', each in the transaction
of the move it tells of, with one webhook delivery per active webhook of the account that takes
the event's type.

An owner says what changed (``Change``: the subject's part of the payload); this module adds
the envelope every event shares, ``{"type", "time", "account", "<kind>": {...}}``. Ids come from
one sequence for every kind (and every account: clients see them only as tokens,
``app.services.event_ids``), so one Last-Event-ID resumes any stream. ``app.services.events``
reads what is written here; the build reaper prunes old events of every kind.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.orm import Account, Event, SubjectKind, Webhook, WebhookDelivery
from app.orm.base import utcnow


class EventType(enum.StrEnum):
    """Every event's ``type``; a webhook may take some of them (``eventTypes``). Receivers must
    ignore types they do not know: new ones may come."""

    IMAGE_STATE_CHANGED = "ImageStateChanged"
    IMAGE_DELETED = "ImageDeleted"
    SERVICE_STATE_CHANGED = "ServiceStateChanged"
    SERVICE_DELETED = "ServiceDeleted"


@dataclass(frozen=True)
class Change:
    """What one event tells: ``body`` is the subject as it is after the move (or was when deleted)."""

    account_id: uuid.UUID
    kind: SubjectKind
    subject_id: uuid.UUID
    state: str  # the state it moved to, or Deleted
    type: EventType
    body: dict[str, object]


def record(session: Session, changes: Sequence[Change]) -> list[int]:
    """Append an event for each change and queue it for the account's webhooks; their ids."""
    if not changes:
        return []
    accounts = {
        row.id: f"/subscriptions/{row.subscription_id}/resourceGroups/{row.resource_group}/accounts/{row.name}"
        for row in session.execute(
            select(Account.id, Account.subscription_id, Account.resource_group, Account.name).where(
                Account.id.in_({change.account_id for change in changes})
            )
        )
    }
    now = utcnow()
    events = [
        Event(
            account_id=change.account_id,
            subject_kind=change.kind.value,
            subject_id=change.subject_id,
            state=change.state,
            created_at=now,
            payload=json.dumps(
                {
                    "type": change.type.value,
                    "time": now.isoformat(),
                    "account": accounts[change.account_id],
                    change.kind.value: change.body,
                },
                separators=(",", ":"),
            ),
        )
        for change in changes
    ]
    session.add_all(events)
    session.flush()
    _queue_deliveries(session, list(zip(events, (change.type for change in changes), strict=True)), now)
    return [event.id for event in events]


def _queue_deliveries(session: Session, events: list[tuple[Event, EventType]], now: datetime) -> None:
    accounts = {event.account_id for event, _ in events}
    hooks = session.execute(
        select(Webhook.id, Webhook.account_id, Webhook.event_types).where(
            Webhook.account_id.in_(accounts), Webhook.active.is_(True)
        )
    ).all()
    session.add_all(
        WebhookDelivery(webhook_id=hook.id, event_id=event.id, next_attempt_at=now)
        for event, event_type in events
        for hook in hooks
        if hook.account_id == event.account_id and (hook.event_types is None or event_type in hook.event_types)
    )
    session.flush()


def last_bodies(session: Session, kind: SubjectKind, subject_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, object]:
    """The subject's part of each subject's newest event (absent when it has none left)."""
    if not subject_ids:
        return {}
    newest = (
        select(func.max(Event.id))
        .where(Event.subject_kind == kind.value, Event.subject_id.in_(subject_ids))
        .group_by(Event.subject_id)
    )
    rows = session.execute(select(Event.subject_id, Event.payload).where(Event.id.in_(newest)))
    return {row.subject_id: json.loads(row.payload).get(kind.value) for row in rows}


def prune(session: Session, *, older_than: datetime) -> int:
    """Forget events of every kind (and their deliveries) recorded before ``older_than``."""
    return session.execute(delete(Event).where(Event.created_at < older_than)).rowcount
