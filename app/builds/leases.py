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

from sqlalchemy import func, or_
from sqlalchemy.orm import Session

from app.builds.states import CreationState
from app.builds.transitions import Transition, move
from app.orm import Image
from app.orm.base import utcnow


@dataclass(frozen=True)
class Lease:
    image_id: uuid.UUID
    attempt: int
    owner: str


def _held(lease: Lease):  # type: ignore[no-untyped-def]
    """The lease is still this attempt's (the table's RUNNING-only moves add the state)."""
    return (Image.id == lease.image_id) & (Image.attempt == lease.attempt)


def claim_build(
    session: Session, image_id: uuid.UUID, *, owner: str, lease_seconds: int, max_attempts: int
) -> Lease | None:
    """Take the build if it is waiting (or its lease lapsed); None when another worker holds it."""
    now = utcnow()
    rows = move(
        session,
        Transition.CLAIM,
        Image.id == image_id,
        Image.cancel_requested.is_(False),
        Image.attempt - Image.releases < max_attempts,  # a re-queue on shutdown is no failure
        # Running only once its lease lapsed: the table allows Running → Running for that.
        or_(Image.state != CreationState.RUNNING, Image.lease_expires_at < now),
        returning=(Image.attempt,),
        attempt=Image.attempt + 1,
        lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        started_at=func.coalesce(Image.started_at, now),
    )
    return Lease(image_id, rows[0].attempt, owner) if rows else None


class LeaseLost(Exception):
    """The build is no longer this worker's: another attempt took it, or it was ended."""


def renew_lease(session: Session, lease: Lease, *, lease_seconds: int) -> bool:
    """Extend the lease; returns whether a cancel was asked for. LeaseLost when fenced off."""
    rows = move(
        session,
        Transition.RENEW,
        _held(lease),
        returning=(Image.cancel_requested,),
        lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
    )
    if not rows:
        raise LeaseLost(f"build {lease.image_id} attempt {lease.attempt} was taken over or ended")
    return bool(rows[0].cancel_requested)


def release_build(session: Session, lease: Lease) -> bool:
    """Hand a build back to the queue (the worker is shutting down); False when fenced off.

    The attempt number stays, so the released worker stays fenced off; ``releases`` keeps
    the hand-back from counting as a failed attempt.
    """
    return bool(
        move(
            session,
            Transition.HAND_BACK,
            _held(lease),
            releases=Image.releases + 1,
            lease_owner=None,
            lease_expires_at=None,
            published_at=None,
        )
    )


def finish_build(session: Session, lease: Lease, *, state: CreationState, **fields: object) -> bool:
    """Record the outcome if the lease is still ours; False when fenced off (nothing written)."""
    return bool(
        move(
            session,
            Transition.FINISH,
            _held(lease),
            to=state,
            ended_at=utcnow(),
            lease_owner=None,
            lease_expires_at=None,
            **fields,
        )
    )
