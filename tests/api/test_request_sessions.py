"""The request's session ends with its endpoint (app.api.routing): a write commits, a write that
raises rolls back, a read is closed, an upload (a coroutine endpoint) commits after it; each
gives its connection back before the answer goes out (test_thread_hops: a write whose answer
breaks its model is rolled back). Served by uvicorn on PostgreSQL with the
service's own pool (the routes' other tests join the test's transaction, which hides the pool)."""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.context import ServiceContext
from app.reads import LoopReads
from tests.factories import model_body
from tests.live_server import Live, live_service

pytestmark = pytest.mark.postgres_only


@pytest.fixture()
def live(service_context: ServiceContext, data_dir: Path) -> Iterator[Live]:
    with live_service(service_context, data_dir) as live:
        yield live


@pytest.fixture()
def no_collection() -> Iterator[None]:
    """A session nobody ended holds its connection until the collector frees it (its objects
    form cycles): with the collector off, a leak stays visible. The server runs in this process."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_each_request_s_session_ends_before_its_answer_and_a_write_is_committed(
    live: Live, no_collection: None
) -> None:
    account = live.account()
    context = live.context
    assert isinstance(context.reads, LoopReads)
    pools = [context.engine.pool, context.read_engine.pool, context.reads.engine.sync_engine.pool]  # writes, reads

    def checked_out_after(answer: httpx.Response, status: int) -> int:
        """Connections still checked out once the answer is in. The service's own background
        reads (the event hub's polls) take one for a moment: a leaked one stays out."""
        assert answer.status_code == status, answer.text
        deadline = time.monotonic() + 2
        while (out := sum(pool.checkedout() for pool in pools)) and time.monotonic() < deadline:
            time.sleep(0.02)
        return out

    registered = httpx.post(f"{account}/models", json=model_body(), headers=live.headers)
    assert checked_out_after(registered, 200) == 0
    uploaded = httpx.post(f"{account}/assets?name=a.bin", content=b"bytes", headers=live.headers)
    assert checked_out_after(uploaded, 201) == 0
    missing = httpx.delete(f"{account}/models/{uuid.uuid4()}", headers=live.headers)  # raises in its endpoint
    assert checked_out_after(missing, 404) == 0
    listed = httpx.get(f"{live.base}/api/accounts", headers=live.headers)  # a read with a session of its own
    assert checked_out_after(listed, 200) == 0
    token = httpx.get(
        f"{live.base}/v2/token", auth=live.credentials("Reader", "/subscriptions/sub-live")
    )  # the registry's routes, a router of their own
    assert checked_out_after(token, 200) == 0
    registry = {"Authorization": f"Bearer {token.json()['token']}"}
    assert checked_out_after(httpx.get(f"{live.base}/v2/", headers=registry), 200) == 0

    # What the writes did is there for the next request: committed, not only answered.
    assert httpx.get(f"{account}/models/{registered.json()['id']}", headers=live.headers).status_code == 200
    assert httpx.get(f"{account}/assets/{uploaded.json()['id']}", headers=live.headers).status_code == 200
    assert checked_out_after(httpx.get(f"{live.base}/health"), 200) == 0
