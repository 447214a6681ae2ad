"""What a move of a web service records: an event, in the transaction that moves it, for the
event streams and the webhooks (through ``app.event_log``, the account event log shared with
image builds).

An event says what a client sees of the service: its state and error, image, scoring URI and
replica counts. A move that changes none of these (a reconciler pass that finds all as it was)
records nothing: each new event is compared with the service's newest one.

Only ``app.deployments.transitions`` records service events; ``app.services.events`` reads them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.deployments.states import DELETED_STATE, scoring_base, service_error
from app.event_log import Change, EventType, last_bodies
from app.event_log import record as record_changes
from app.orm import Service, SubjectKind

# What an event tells of the service (the row as it is after the move, or as it was when deleted).
SERVICE_COLUMNS = (
    Service.id,
    Service.account_id,
    Service.name,
    Service.state,
    Service.error,
    Service.image_id,
    Service.compute_name,
    Service.compute_type,
    Service.traffic_generation,
    Service.endpoint,
    Service.replicas_desired,
    Service.replicas_ready,
)


def record_state_changes(session: Session, service_ids: Iterable[uuid.UUID], *, scoring_url: str | None) -> list[int]:
    """Append an event for each service whose visible state differs from its newest event's,
    and queue it for the account's webhooks. ``scoring_url``: the scoring gateway's address
    (MMS_SCORING_URL), for the event's scoringUri; without it the scoringUri is null."""
    ids = list(dict.fromkeys(service_ids))
    if not ids:
        return []
    # Columns, not entities: a bulk UPDATE just changed these rows under the identity map.
    rows = session.execute(select(*SERVICE_COLUMNS).where(Service.id.in_(ids))).all()
    told = last_bodies(session, SubjectKind.SERVICE, ids)
    changes = [_change(row, scoring_url, deleted=False) for row in rows]
    return record_changes(session, [change for change in changes if told.get(change.subject_id) != change.body])


def record_deletions(session: Session, rows: Sequence) -> list[int]:  # type: ignore[type-arg]
    """Events for deleted services (``rows``: ``SERVICE_COLUMNS`` each, as they were)."""
    return record_changes(session, [_change(row, None, deleted=True) for row in rows])


def _change(row, scoring_url: str | None, *, deleted: bool) -> Change:  # type: ignore[no-untyped-def]
    error = service_error(row.state, row.error)
    base = None
    if not deleted:
        base = scoring_base(
            scoring_url,
            row.id,
            compute_type=row.compute_type,
            endpoint=row.endpoint,
            traffic_generation=row.traffic_generation,
        )
    return Change(
        account_id=row.account_id,
        kind=SubjectKind.SERVICE,
        subject_id=row.id,
        state=DELETED_STATE if deleted else row.state.value,
        type=EventType.SERVICE_DELETED if deleted else EventType.SERVICE_STATE_CHANGED,
        body={
            "id": str(row.id),
            "name": row.name,
            "state": row.state.value,
            "error": None if error is None else {"code": error[0], "message": error[1]},
            "imageId": str(row.image_id),
            "computeName": row.compute_name,
            "computeType": row.compute_type,
            "scoringUri": None if base is None else f"{base}/score",
            "deploymentStatus": {"desiredReplicas": row.replicas_desired, "readyReplicas": row.replicas_ready},
        },
    )
