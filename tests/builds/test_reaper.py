"""The reaper on the real database: lost builds move on, deadlines hold, lost messages are re-sent."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from app.builds.leases import claim_build
from app.builds.reaper import reap
from app.config import Settings
from app.orm import Image
from app.orm.base import utcnow


def test_reaper_requeues_lapsed_leases_then_gives_up(db: Session, image: Image, settings: Settings) -> None:
    lease = claim_build(db, image.id, owner="w1", lease_seconds=60, max_attempts=3)
    assert lease is not None
    image.lease_expires_at = utcnow() - timedelta(seconds=1)
    db.flush()
    assert reap(db, settings) == [str(image.id)]  # back to NotStarted and rung again
    db.refresh(image)
    assert image.state == "NotStarted"

    image.state, image.attempt, image.lease_expires_at = (
        "Running",
        settings.build_max_attempts,
        utcnow() - timedelta(seconds=1),
    )
    db.flush()
    reap(db, settings)
    db.refresh(image)
    assert image.state == "Failed" and "stopped answering" in image.error


def test_reaper_enforces_deadlines_and_republishes(db: Session, image: Image, settings: Settings) -> None:
    image.published_at = utcnow() - timedelta(seconds=settings.build_republish_seconds + 1)
    db.flush()
    assert reap(db, settings) == [str(image.id)]
    assert reap(db, settings) == []  # just rung: not again yet

    image.created_at = utcnow() - timedelta(seconds=settings.build_queue_deadline_seconds + 1)
    db.flush()
    reap(db, settings)
    db.refresh(image)
    assert image.state == "Failed" and "waited longer" in image.error
