"""The reaper on the real database: lost builds move on, deadlines hold, lost messages are re-sent,
old events (of images and web services) go."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.builds.leases import claim_build
from app.builds.reaper import reap
from app.config import Settings
from app.deployments.states import ServiceState
from app.deployments.transitions import Transition as ServiceTransition
from app.deployments.transitions import move as move_service
from app.orm import Event, Image, Service, Webhook, WebhookDelivery
from app.orm.base import utcnow
from tests.factories import new_service_row


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


def test_events_past_their_retention_go_with_their_deliveries_images_and_services_alike(
    db: Session, settings: Settings
) -> None:
    service = new_service_row(db)  # on a new image of the same account: both have a first event
    hook = Webhook(account_id=service.account_id, url="https://hooks.example.com/x", sealed_secret="s")
    db.add(hook)
    db.flush()
    assert move_service(db, ServiceTransition.CONVERGE, Service.id == service.id, to=ServiceState.HEALTHY)
    subjects = [service.id, service.image_id]
    old = utcnow() - timedelta(days=settings.events_retention_days, seconds=1)
    db.execute(update(Event).where(Event.subject_id.in_(subjects)).values(created_at=old))
    assert move_service(db, ServiceTransition.DEGRADE, Service.id == service.id, error="gone quiet")  # a fresh one
    reap(db, settings)
    kept = db.execute(select(Event.id, Event.subject_kind, Event.state).where(Event.subject_id.in_(subjects))).all()
    assert [(kind, state) for _, kind, state in kept] == [("service", "Unhealthy")]
    deliveries = db.scalars(select(WebhookDelivery.event_id).where(WebhookDelivery.webhook_id == hook.id)).all()
    assert deliveries == [kept[0].id]
