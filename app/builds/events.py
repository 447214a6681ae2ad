"""What a move of a build records: an event, in the transaction that moves it, for the event
streams, the ETags and the webhooks (through ``app.event_log``, the account event log shared
with web services).

Only ``app.builds.transitions`` records image events (the reaper prunes old ones);
``app.services.events`` reads them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.builds.states import DELETED_STATE, build_error
from app.event_log import Change, EventType
from app.event_log import record as record_changes
from app.orm import Image, SubjectKind

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
    return record_changes(
        session,
        [
            Change(
                account_id=row.account_id,
                kind=SubjectKind.IMAGE,
                subject_id=row.id,
                state=DELETED_STATE if deleted else row.state.value,
                type=EventType.IMAGE_DELETED if deleted else EventType.IMAGE_STATE_CHANGED,
                body=_image(row),
            )
            for row in rows
        ],
    )


def _image(row) -> dict[str, object]:  # type: ignore[no-untyped-def]
    error = build_error(row.state, row.error)
    return {
        "Id": str(row.id),
        "Name": row.name,
        "Version": row.version,
        "CreationState": row.state.value,
        "ImageLocation": row.image_location,
        "Digest": row.digest,
        "Error": None if error is None else {"code": error[0], "message": error[1]},
        "SmokeTest": row.smoke_test and {"result": row.smoke_test, "reason": row.smoke_test_reason},
    }
