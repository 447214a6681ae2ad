"""Liveness and readiness, with the real database and Redis, and with each one unreachable."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.auth.tokens import issue_token
from app.context import ServiceContext
from app.main import create_app
from app.reads import LoopReads


def test_ready_when_the_database_and_the_broker_answer(service_context: ServiceContext) -> None:
    # Not the transactional test client: on SQLite its open write transaction would hold
    # the probe's BEGIN waiting.
    client = TestClient(create_app(context=service_context), base_url="http://testserver")
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")  # no token needed, as for /health
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


def test_not_ready_names_what_is_unreachable_and_nothing_more(app_context: ServiceContext, tmp_path) -> None:
    settings = app_context.settings.model_copy(
        update={
            "broker_url": "redis://:hunter2-secret@127.0.0.1:1/0",
            "database_url": f"sqlite:///{tmp_path}/no-such-folder/mms.db",
        }
    )
    client = TestClient(create_app(context=ServiceContext.build(settings)), base_url="http://testserver")
    answer = client.get("/ready")
    assert answer.status_code == 503
    checks = answer.json()["checks"]
    assert checks["database"].startswith("unreachable") and checks["broker"].startswith("unreachable")
    assert "hunter2" not in answer.text and "127.0.0.1" not in answer.text
    assert client.get("/health").status_code == 200  # alive, only not ready


@pytest.mark.postgres_only
def test_a_request_that_finds_every_connection_busy_is_told_to_retry(service_context: ServiceContext) -> None:
    settings = service_context.settings.model_copy(
        update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout_seconds": 0.5}
    )
    context = ServiceContext.build(settings)
    assert isinstance(context.reads, LoopReads)  # reads on the event loop, from a pool of their own
    try:
        # Entered: one event loop for the app and the connection the test holds on it.
        with TestClient(create_app(context=context)) as client:
            token = issue_token(
                context.signing_key(),
                issuer=settings.issuer,
                audience=settings.audience,
                subject="someone",
                ttl_seconds=60,
            )
            url, headers = "/api/subscriptions/s/resourceGroups/rg/accounts", {"Authorization": f"Bearer {token}"}
            assert client.get(url, headers=headers).status_code == 403  # the keys are loaded; no role
            # The only connection the caller's roles may be read with, held: its pool's own timeout answers.
            held = client.portal.call(_take_connection, context.reads.engine)
            started = time.monotonic()
            busy = client.get(url, headers=headers)
            waited = time.monotonic() - started
            client.portal.call(held.close)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert waited < 2, waited  # MMS_DB_POOL_TIMEOUT_SECONDS (0.5 s), not a default
            assert busy.json()["code"] == "ServiceUnavailable"
            assert client.get("/health").status_code == 200
            assert client.get(url, headers=headers).status_code == 403  # and reads again once they are free
    finally:
        context.dispose()


async def _take_connection(engine: AsyncEngine) -> AsyncConnection:
    return await engine.connect()
