"""The lease and the reaper on the real database: claims are exclusive, lost builds move on."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from app.config import Settings
from app.orm import Account, CreationState, Image, Manifest
from app.orm.base import utcnow
from workers.leases import LeaseLost, claim_build, finish_build, renew_lease
from workers.reaper import reap


@pytest.fixture()
def image(db: Session) -> Image:
    account = Account(
        subscription_id="s",
        resource_group="rg",
        name=f"a{uuid.uuid4().hex[:8]}",
        location="x",
        sku_name="S1",
        sku_capacity=1,
    )
    db.add(account)
    db.flush()
    manifest = Manifest(
        account_id=account.id,
        name="m",
        version=1,
        driver_program="score",
        model_type="Registered",
        runtime_type="Python",
        webservice_type="Realtime",
    )
    db.add(manifest)
    db.flush()
    row = Image(
        account_id=account.id,
        manifest_id=manifest.id,
        name="i",
        version=1,
        image_type="Docker",
        builder="docker",
        state="NotStarted",
        published_at=utcnow(),
    )
    db.add(row)
    db.flush()
    return row


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
