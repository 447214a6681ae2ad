"""Polling an image with its ETag: a 304 from memory, with no database query, exactly while
nothing changed, and the full answer, 401, 403 or 404 as soon as anything did."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event

from app.builds.leases import claim_build
from app.context import ServiceContext
from app.database import session_scope
from app.reads import LoopReads
from tests.factories import bearer
from tests.live_server import Live, live_service


@pytest.fixture()
def live(service_context: ServiceContext, tmp_path: Path) -> Iterator[Live]:
    with live_service(service_context, tmp_path, events_poll_seconds=0.05, auth_cache_seconds=5) as live:
        yield live


@contextmanager
def _queries(live: Live) -> Iterator[list[str]]:
    """Statements the app sends meanwhile, but for the event poller's own. A request that
    queried would send a SELECT, so transaction control and SQLite's per-connection pragmas
    (the poller sets ``query_only`` when its pooled connection last served a write) are left out."""
    seen: list[str] = []

    def record(_conn, _cursor, statement: str, *_: object) -> None:
        if (
            not statement.startswith(("BEGIN", "PRAGMA query_only"))
            and "events.id >" not in statement
            and "max(events.id)" not in statement
        ):
            seen.append(statement)

    engines = {live.context.engine, live.context.read_engine}
    if isinstance(live.context.reads, LoopReads):  # PostgreSQL: reads on the event loop, from a pool of their own
        engines.add(live.context.reads.engine.sync_engine)
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)


def _until(condition, seconds: float = 5):
    deadline = time.monotonic() + seconds
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


def test_an_unchanged_image_is_answered_from_memory_and_a_change_is_seen_at_once(live: Live) -> None:
    account = live.account()
    image = live.image(account)
    url = f"{account}/images/{image['Id']}"
    first = httpx.get(url, headers=live.headers)
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"v')

    with _queries(live) as queries:
        for _ in range(5):
            again = httpx.get(url, headers={**live.headers, "If-None-Match": etag})
            assert again.status_code == 304 and again.content == b""
            assert again.headers["etag"] == etag and again.headers["retry-after"] == "2"
            assert again.headers["x-ms-request-id"]
    assert queries == []

    with session_scope(live.context.session_factory) as session:  # a worker takes the build
        assert claim_build(session, uuid.UUID(image["Id"]), owner="poll-test", lease_seconds=60, max_attempts=3)
    changed = _until(
        lambda: (r := httpx.get(url, headers={**live.headers, "If-None-Match": etag})).status_code == 200 and r
    )
    assert changed and changed.json()["CreationState"] == "Running" and changed.headers["etag"] != etag


def test_the_shortcut_never_answers_for_a_caller_the_route_would_refuse(live: Live) -> None:
    account, other = live.account(), live.account()
    image = live.image(account)
    url = f"{account}/images/{image['Id']}"
    etag = httpx.get(url, headers=live.headers).headers["etag"]
    assert httpx.get(url, headers={**live.headers, "If-None-Match": etag}).status_code == 304

    outsider = live.token("Reader", other.split("/api", 1)[1])
    httpx.get(f"{other}/images", headers=outsider)  # its roles are cached now, and exclude this account
    assert httpx.get(url, headers={**outsider, "If-None-Match": etag}).status_code == 403
    assert httpx.get(url, headers={**bearer("not.a.token"), "If-None-Match": etag}).status_code == 401
    assert httpx.get(url, headers={"If-None-Match": etag}).status_code == 401
    # The same image under another account's path is not that account's.
    assert (
        httpx.get(f"{other}/images/{image['Id']}", headers={**live.headers, "If-None-Match": etag}).status_code == 404
    )


def test_a_deleted_image_or_account_is_a_404_not_a_304(live: Live) -> None:
    account = live.account()
    image, kept = live.image(account), live.image(account, name="kept")
    url, kept_url = f"{account}/images/{image['Id']}", f"{account}/images/{kept['Id']}"
    etag, kept_etag = (httpx.get(u, headers=live.headers).headers["etag"] for u in (url, kept_url))
    assert httpx.delete(url, headers=live.headers).status_code == 204
    assert _until(lambda: httpx.get(url, headers={**live.headers, "If-None-Match": etag}).status_code == 404)

    assert httpx.get(kept_url, headers={**live.headers, "If-None-Match": kept_etag}).status_code == 304
    assert httpx.delete(f"{account}?force=true", headers=live.headers).status_code == 204
    live.accounts.remove(account)
    assert _until(lambda: httpx.get(kept_url, headers={**live.headers, "If-None-Match": kept_etag}).status_code == 404)
