"""Keeping every build moving: lost messages re-sent, lapsed leases re-queued, deadlines enforced."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import and_, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.orm import CreationState, Image
from app.orm.base import utcnow
from app.services.events import prune_events, record_state_changes

log = logging.getLogger("mms.reaper")
NOT_STARTED, RUNNING = CreationState.NOT_STARTED.value, CreationState.RUNNING.value


def _transition(session: Session, condition, **values: object) -> int:  # type: ignore[no-untyped-def]
    """Move the builds matching ``condition``, record their events, and count them."""
    moved = session.execute(update(Image).where(condition).values(**values).returning(Image.id)).scalars().all()
    record_state_changes(session, moved)
    return len(moved)


def _fail(session: Session, condition, error: str) -> int:  # type: ignore[no-untyped-def]
    return _transition(
        session,
        condition,
        state=CreationState.FAILED.value,
        ended_at=utcnow(),
        error=error,
        lease_owner=None,
        lease_expires_at=None,
    )


def reap(session: Session, settings: Settings) -> list[str]:
    """One pass; returns the ids of builds to ring the queue for (after the commit)."""
    now = utcnow()
    lapsed = and_(Image.state == RUNNING, Image.lease_expires_at < now)
    cancelled = _transition(
        session,
        and_(lapsed, Image.cancel_requested.is_(True)),
        state=CreationState.CANCELLED.value,
        ended_at=now,
        error="cancelled while building",
        lease_owner=None,
    )
    gave_up = _fail(
        session,
        and_(lapsed, Image.attempt - Image.releases >= settings.build_max_attempts),
        f"the build's worker stopped answering {settings.build_max_attempts} times; giving up",
    )
    requeued = _transition(
        session, lapsed, state=NOT_STARTED, lease_owner=None, lease_expires_at=None, published_at=None
    )
    overdue = _fail(
        session,
        and_(Image.state == RUNNING, Image.started_at < now - timedelta(seconds=settings.build_run_deadline_seconds)),
        f"the build ran longer than {settings.build_run_deadline_seconds} s",
    )
    stale = _fail(
        session,
        and_(
            Image.state == NOT_STARTED,
            Image.created_at < now - timedelta(seconds=settings.build_queue_deadline_seconds),
        ),
        f"the build waited longer than {settings.build_queue_deadline_seconds} s for a worker",
    )
    # Committed but never (or long ago) sent: ring again; a duplicate finds the lease held.
    waiting = (
        session.execute(
            update(Image)
            .where(
                Image.state == NOT_STARTED,
                (Image.published_at.is_(None))
                | (Image.published_at < now - timedelta(seconds=settings.build_republish_seconds)),
            )
            .values(published_at=now)
            .returning(Image.id)
        )
        .scalars()
        .all()
    )
    pruned = prune_events(session, older_than=now - timedelta(days=settings.events_retention_days))
    if any((cancelled, gave_up, requeued, overdue, stale, waiting, pruned)):
        log.info(
            "reaper.pass",
            extra={
                "cancelled": cancelled,
                "failed": gave_up + overdue + stale,
                "requeued": requeued,
                "republished": len(waiting),
                "eventsPruned": pruned,
            },
        )
    return [str(i) for i in waiting]


__all__ = ["reap"]
