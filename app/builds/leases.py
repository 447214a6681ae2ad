"""The build lease: an atomic claim, a heartbeat, and a fenced finish.

A worker owns a build while its attempt number is the row's and its lease has not
expired. Every write it makes is conditional on that attempt, so a worker that lost its
lease (paused, partitioned, or replaced after its lease expired) cannot overwrite the
outcome another worker wrote.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, or_, update
from sqlalchemy.orm import Session

from app.orm import CreationState, Image
from app.orm.base import utcnow
from app.services.events import record_state_changes

RUNNING = CreationState.RUNNING.value


@dataclass(frozen=True)
class Lease:
    image_id: uuid.UUID
    attempt: int
    owner: str


def claim_build(
    session: Session, image_id: uuid.UUID, *, owner: str, lease_seconds: int, max_attempts: int
) -> Lease | None:
    """Take the build if it is waiting (or its lease lapsed); None when another worker holds it."""
    now = utcnow()
    attempt = session.execute(
        update(Image)
        .where(
            Image.id == image_id,
            Image.cancel_requested.is_(False),
            Image.attempt - Image.releases < max_attempts,  # a re-queue on shutdown is no failure
            or_(
                Image.state == CreationState.NOT_STARTED.value,
                and_(Image.state == RUNNING, Image.lease_expires_at < now),
            ),
        )
        .values(
            state=RUNNING,
            attempt=Image.attempt + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=func.coalesce(Image.started_at, now),
        )
        .returning(Image.attempt)
    ).scalar()
    if attempt is None:
        return None
    record_state_changes(session, [image_id])
    return Lease(image_id, attempt, owner)


class LeaseLost(Exception):
    """The build is no longer this worker's: another attempt took it, or it was ended."""


def renew_lease(session: Session, lease: Lease, *, lease_seconds: int) -> bool:
    """Extend the lease; returns whether a cancel was asked for. LeaseLost when fenced off."""
    cancel = session.execute(
        update(Image)
        .where(Image.id == lease.image_id, Image.attempt == lease.attempt, Image.state == RUNNING)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .returning(Image.cancel_requested)
    ).scalar()
    if cancel is None:
        raise LeaseLost(f"build {lease.image_id} attempt {lease.attempt} was taken over or ended")
    return bool(cancel)


def release_build(session: Session, lease: Lease) -> bool:
    """Give a build back to the queue (the worker is shutting down); False when fenced off.

    The attempt number stays, so the released worker stays fenced off; ``releases`` keeps
    the hand-back from counting as a failed attempt.
    """
    released = (
        session.execute(
            update(Image)
            .where(Image.id == lease.image_id, Image.attempt == lease.attempt, Image.state == RUNNING)
            .values(
                state=CreationState.NOT_STARTED.value,
                releases=Image.releases + 1,
                lease_owner=None,
                lease_expires_at=None,
                published_at=None,
            )
            .returning(Image.id)
        )
        .scalars()
        .all()
    )
    record_state_changes(session, released)
    return bool(released)


def finish_build(session: Session, lease: Lease, *, state: CreationState, **fields: object) -> bool:
    """Record the outcome if the lease is still ours; False when fenced off (nothing written)."""
    finished = (
        session.execute(
            update(Image)
            .where(Image.id == lease.image_id, Image.attempt == lease.attempt, Image.state == RUNNING)
            .values(state=state.value, ended_at=utcnow(), lease_owner=None, lease_expires_at=None, **fields)
            .returning(Image.id)
        )
        .scalars()
        .all()
    )
    record_state_changes(session, finished)
    return bool(finished)
