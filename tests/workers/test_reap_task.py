"""The workers' periodic pass (REAP_TASK) forgets Idempotency-Keys past their TTL, in batches."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, select

from app.context import ServiceContext
from app.database import session_scope
from app.orm import IdempotencyRecord
from app.orm.base import utcnow
from app.services import idempotency


def _records(context: ServiceContext, owner: str, ages_seconds: list[int]) -> None:
    with session_scope(context.session_factory) as session:
        for number, age in enumerate(ages_seconds):
            session.add(
                IdempotencyRecord(
                    owner=owner,
                    key=f"k{number}",
                    fingerprint="f",
                    status_code=200,
                    response_body={"n": number},
                    created_at=utcnow() - timedelta(seconds=age),
                )
            )


def _left(context: ServiceContext, owner: str) -> list[str]:
    with session_scope(context.session_factory) as session:
        return sorted(session.scalars(select(IdempotencyRecord.key).where(IdempotencyRecord.owner == owner)))


@pytest.fixture()
def owner(service_context: ServiceContext):  # type: ignore[no-untyped-def]
    name = f"reap-test-{id(service_context)}"
    yield name
    with session_scope(service_context.session_factory) as session:
        session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.owner == name))


def test_the_periodic_pass_deletes_the_keys_past_their_ttl_and_keeps_the_rest(
    service_context: ServiceContext, owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.tasks
    from workers.celery_app import REAP_TASK, celery_app

    ttl = service_context.settings.idempotency_ttl_seconds
    _records(service_context, owner, [ttl + 3600, ttl + 60, ttl - 600, 5])
    monkeypatch.setattr(workers.tasks, "worker_context", lambda: service_context)

    celery_app.tasks[REAP_TASK].apply().get()

    assert _left(service_context, owner) == ["k2", "k3"]


def test_a_backlog_goes_a_batch_a_pass(
    service_context: ServiceContext, owner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idempotency, "FORGET_BATCH", 2)
    # Past a TTL of 20 days, which no row this test session made (the other tests') can be.
    ttl, day = 20 * 86400, 86400
    _records(service_context, owner, [ttl + day, ttl + day, ttl + day, 10])
    with session_scope(service_context.session_factory) as session:
        first = idempotency.forget_expired(session, ttl_seconds=ttl)
    assert first == 2 and len(_left(service_context, owner)) == 2
    with session_scope(service_context.session_factory) as session:
        assert idempotency.forget_expired(session, ttl_seconds=ttl) == 1
    assert _left(service_context, owner) == ["k3"]
