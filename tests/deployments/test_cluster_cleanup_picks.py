"""The deploy worker's cleanup sweep picks due rows fairly across tenants (subscriptions)
(app.deployments.cluster_cleanup.due_cleanups): one tenant's backlog of old rows, over however
many accounts, never keeps another tenant's row out of a sweep."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy.orm import Session

from app.deployments.cluster_cleanup import due_cleanups
from app.orm import ClusterCleanup
from app.orm.base import utcnow


def _row(db: Session, subscription: str | None, minutes_ago: float) -> uuid.UUID:
    """A row of a new account of ``subscription`` (None: a row from before 0021, nobody's)."""
    row = ClusterCleanup(
        service_id=uuid.uuid4(),
        account_id=None if subscription is None else uuid.uuid4(),
        subscription_id=subscription,
        namespace="scoring",
        sealed_credentials="sealed",
        attempts=0,
        next_attempt_at=utcnow() - timedelta(minutes=minutes_ago),
    )
    db.add(row)
    db.flush()
    return row.id


def test_every_tenant_with_due_rows_is_tried_before_a_second_row_of_any_one(db: Session) -> None:
    a, b, c = "tenant-a", "tenant-b", "tenant-c"
    # Oldest first, all older than b's and c's, each of an account of its own (accounts are free).
    a_rows = [_row(db, a, 100 - i) for i in range(30)]
    b_row = _row(db, b, 5)
    c_rows = [_row(db, c, 4), _row(db, c, 3)]
    before_0021 = _row(db, None, 50)  # a row from before accounts were kept: nobody's
    _row(db, b, -10)  # not due yet

    picked = due_cleanups(db, now=utcnow(), limit=20)
    assert len(picked) == 20
    # Each tenant's oldest first (oldest first among them), then each one's second, and so on.
    assert picked[:4] == [a_rows[0], before_0021, b_row, c_rows[0]]
    assert picked[4:6] == [a_rows[1], c_rows[1]]
    assert picked[6:] == a_rows[2:16]
    assert due_cleanups(db, now=utcnow(), limit=3) == [a_rows[0], before_0021, b_row]
