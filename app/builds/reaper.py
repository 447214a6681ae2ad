"""Keeping every build moving: lost messages re-sent, lapsed leases re-queued, deadlines enforced;
and the account event log kept to its retention period (image and web service events alike)."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import ColumnElement
from sqlalchemy.orm import Session

from app.builds.transitions import Transition, move
from app.config import Settings
from app.event_log import prune as prune_events
from app.orm import Image
from app.orm.base import utcnow

log = logging.getLogger("mms.reaper")


def _fail(session: Session, transition: Transition, condition: ColumnElement[bool], error: str) -> int:
    return len(
        move(session, transition, condition, ended_at=utcnow(), error=error, lease_owner=None, lease_expires_at=None)
    )


def reap(session: Session, settings: Settings) -> list[str]:
    """One pass; returns the ids of builds to ring the queue for (after the commit).

    Each step is a move of the transition table, so its from-state (Running, or NotStarted)
    is part of its conditional UPDATE.
    """
    now = utcnow()
    lapsed = Image.lease_expires_at < now
    cancelled = len(
        move(
            session,
            Transition.REAP_CANCELLED,
            lapsed,
            Image.cancel_requested.is_(True),
            ended_at=now,
            error="cancelled while building",
            lease_owner=None,
        )
    )
    gave_up = _fail(
        session,
        Transition.REAP_ABANDONED,
        lapsed & (Image.attempt - Image.releases >= settings.build_max_attempts),
        f"the build's worker stopped answering {settings.build_max_attempts} times; giving up",
    )
    requeued = len(
        move(session, Transition.REAP_LAPSED, lapsed, lease_owner=None, lease_expires_at=None, published_at=None)
    )
    overdue = _fail(
        session,
        Transition.REAP_OVERDUE,
        Image.started_at < now - timedelta(seconds=settings.build_run_deadline_seconds),
        f"the build ran longer than {settings.build_run_deadline_seconds} s",
    )
    stale = _fail(
        session,
        Transition.REAP_STALE,
        Image.created_at < now - timedelta(seconds=settings.build_queue_deadline_seconds),
        f"the build waited longer than {settings.build_queue_deadline_seconds} s for a worker",
    )
    # Committed but never (or long ago) sent: ring again; a duplicate finds the lease held.
    waiting = move(
        session,
        Transition.REPUBLISH,
        Image.published_at.is_(None) | (Image.published_at < now - timedelta(seconds=settings.build_republish_seconds)),
        published_at=now,
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
    return [str(row.id) for row in waiting]


__all__ = ["reap"]
