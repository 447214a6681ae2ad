"""The lease on the real database: claims are exclusive, a stale worker is fenced off."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from app.builds import CreationState
from app.builds.leases import LeaseLost, claim_build, finish_build, renew_lease
from app.orm import Image
from app.orm.base import utcnow


def test_a_claim_is_exclusive_and_fences_the_stale_worker(db: Session, image: Image) -> None:
    first = claim_build(db, image.id, owner="w1", lease_seconds=60, max_attempts=3)
    assert first is not None and first.attempt == 1
    assert claim_build(db, image.id, owner="w2", lease_seconds=60, max_attempts=3) is None  # duplicate delivery

    image.lease_expires_at = utcnow() - timedelta(seconds=1)  # w1 went quiet
    db.flush()
    second = claim_build(db, image.id, owner="w2", lease_seconds=60, max_attempts=3)
    assert second is not None and second.attempt == 2
    with pytest.raises(LeaseLost):
        renew_lease(db, first, lease_seconds=60)
    assert finish_build(db, first, state=CreationState.SUCCEEDED) is False
    assert finish_build(db, second, state=CreationState.FAILED, error="boom") is True
    db.refresh(image)
    assert image.state == "Failed" and image.error == "boom"
