"""app.writes.LoopWrites on PostgreSQL: a one-statement write run on the event loop with the
driver alone, committed as it ends, its connection handled as a session would handle it; and a
model registered that way, through a live server, is what the thread path registers."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import sessionmaker

from app.config import Settings
from app.context import ServiceContext
from app.database import make_async_write_engine, session_scope
from app.orm import Account, IdempotencyRecord
from app.orm.base import utcnow
from app.writes import LoopWrites, ThreadWrites
from tests.factories import model_body
from tests.live_server import Live, live_service

pytestmark = pytest.mark.postgres_only

# A URL the request's schema takes and the service's URL policy refuses (app.services.source_urls).
_EXPIRED_SAS = "https://acct.blob.core.windows.net/models/m.pkl?sv=2021-08-06&sp=r&se=2000-01-01T00:00:00Z&sig=c2ln"

_ACCOUNTS = Account.__table__
_ADD_ACCOUNT = (
    insert(_ACCOUNTS)
    .values(
        id=bindparam("id", type_=_ACCOUNTS.c.id.type),
        subscription_id="writes",
        resource_group="rg",
        name=bindparam("name", type_=_ACCOUNTS.c.name.type),
        location="l",
        sku_name="S1",
        sku_capacity=1,
        created_at=bindparam("created_at", type_=_ACCOUNTS.c.created_at.type),
    )
    .returning(_ACCOUNTS.c.id, _ACCOUNTS.c.name, _ACCOUNTS.c.created_at)
)


def _run(settings: Settings, body):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        writes = LoopWrites(make_async_write_engine(settings), threads=ThreadWrites(sessionmaker(), "postgresql"))
        try:
            return await body(writes)
        finally:
            await writes.close()

    return asyncio.run(main())


def _accounts_named(settings: Settings, name: str) -> int:
    with psycopg.connect(settings.resolved_database_url.replace("+psycopg", "")) as check:
        return check.execute("SELECT count(*) FROM accounts WHERE name = %s", (name,)).fetchone()[0]


def test_a_write_alone_commits_as_it_ends_and_a_refused_one_keeps_its_connection(
    service_context: ServiceContext,
) -> None:
    settings = service_context.settings
    name = f"w{uuid.uuid4().hex[:8]}"
    made, now = uuid.uuid4(), utcnow()

    async def body(writes: LoopWrites):  # type: ignore[no-untyped-def]
        rows = await writes.alone(_ADD_ACCOUNT, {"id": made, "name": name, "created_at": now})
        committed = _accounts_named(settings, name)  # another connection sees it at once
        pool = writes.engine.sync_engine.pool
        try:
            await writes.alone(_ADD_ACCOUNT, {"id": uuid.uuid4(), "name": name, "created_at": now})  # name taken
        except IntegrityError as error:
            refused = error
        else:
            raise AssertionError("the database took a second account of one name")
        kept = pool.checkedin()  # the refused statement left its connection idle: back in the pool
        again = await writes.alone(_ADD_ACCOUNT, {"id": uuid.uuid4(), "name": name + "b", "created_at": now})
        return rows, committed, refused, kept, pool.checkedout(), again

    try:
        rows, committed, refused, kept, checked_out, again = _run(settings, body)
        assert [tuple(row) for row in rows] == [(made, name, now)]  # its types' conversions, as a session's
        assert committed == 1
        assert refused.hide_parameters and isinstance(refused.orig, psycopg.errors.UniqueViolation)
        assert kept == 1 and checked_out == 0 and len(again) == 1
        assert _accounts_named(settings, name) == 1
    finally:
        with psycopg.connect(settings.resolved_database_url.replace("+psycopg", "")) as cleanup:
            cleanup.execute("DELETE FROM accounts WHERE subscription_id = 'writes'")


def test_a_transaction_commits_both_trips_or_nothing(service_context: ServiceContext) -> None:
    """BEGIN and the first statements in one trip, the next ones and COMMIT in another; a ROLLBACK
    after them when told so (their rows still given), and when a statement is refused: nothing of
    it stays, the pool is whole."""
    settings = service_context.settings
    prefix = f"t{uuid.uuid4().hex[:6]}"

    def add(name: str) -> tuple[object, dict[str, object]]:
        return _ADD_ACCOUNT, {"id": uuid.uuid4(), "name": f"{prefix}{name}", "created_at": utcnow()}

    async def body(writes: LoopWrites):  # type: ignore[no-untyped-def]
        seen: list[list[list[tuple[object, ...]]]] = []
        both = await writes.transaction([add("a")], lambda rows: (seen.append(rows) or [add("b")], True))
        rolled_back = await writes.transaction([add("c")], lambda rows: ([add("c2")], False))
        try:
            await writes.transaction([add("d"), add("d")], lambda rows: ([], True))  # the name twice: refused
        except IntegrityError as error:
            refused = error
        else:
            raise AssertionError("the database took a second account of one name")
        try:
            await writes.transaction([add("e")], lambda rows: ([add("e")], True))  # refused in the second trip
        except IntegrityError:
            pass
        else:
            raise AssertionError("the database took a second account of one name")
        pool = writes.engine.sync_engine.pool
        return seen, both, rolled_back, refused, pool.checkedout()

    try:
        seen, both, rolled_back, refused, checked_out = _run(settings, body)
        assert [[row[1] for row in rows] for rows in seen[0]] == [[f"{prefix}a"]]  # then() saw the first rows
        assert [[row[1] for row in rows] for rows in both] == [[f"{prefix}a"], [f"{prefix}b"]]
        assert [[row[1] for row in rows] for rows in rolled_back] == [[f"{prefix}c"], [f"{prefix}c2"]]
        assert refused.hide_parameters and isinstance(refused.orig, psycopg.errors.UniqueViolation)
        assert checked_out == 0
        made = {name: _accounts_named(settings, f"{prefix}{name}") for name in ("a", "b", "c", "c2", "d", "e")}
        assert made == {"a": 1, "b": 1, "c": 0, "c2": 0, "d": 0, "e": 0}
    finally:
        with psycopg.connect(settings.resolved_database_url.replace("+psycopg", "")) as cleanup:
            cleanup.execute("DELETE FROM accounts WHERE subscription_id = 'writes'")


def test_a_write_alone_runs_an_insert_that_gives_every_value_and_a_database_away_is_an_operational_error(
    service_context: ServiceContext,
) -> None:
    async def refused(writes: LoopWrites) -> list[str]:
        errors = []
        for statement in (
            select(_ACCOUNTS.c.id),
            # id and created_at left to their Python defaults, which only a session's execution fills
            insert(_ACCOUNTS).values(subscription_id="writes", resource_group="rg", name="n", location="l"),
        ):
            try:
                await writes.alone(statement, {})  # type: ignore[arg-type]
            except TypeError as error:
                errors.append(str(error))
        return errors

    not_an_insert, defaults_left = _run(service_context.settings, refused)
    assert "runs a Insert, not Select" in not_an_insert
    assert "every column a Python default would fill" in defaults_left

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    away = service_context.settings.model_copy(
        update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{port}/none"}
    )

    async def written(writes: LoopWrites) -> Exception:
        try:
            await writes.alone(_ADD_ACCOUNT, {"id": uuid.uuid4(), "name": "away", "created_at": utcnow()})
        except Exception as error:  # noqa: BLE001 - the test looks at which
            return error
        raise AssertionError("wrote to a database that is not there")

    error = _run(away, written)
    assert isinstance(error, OperationalError), repr(error)


@pytest.fixture()
def live(service_context: ServiceContext, data_dir: Path) -> Iterator[Live]:
    with live_service(service_context, data_dir) as live:
        assert isinstance(live.context.writes, LoopWrites)
        yield live


def test_a_registration_on_the_loop_is_what_the_thread_path_registers(live: Live) -> None:
    """Without a key the registration is its one statement on the loop; with one, a transaction
    there with the key's claim and answer. Both give
    the name its next version, with the tags in order, and read back the same."""
    account = live.account()
    tags = ["z", "a", "m"]
    plain = httpx.post(f"{account}/models", json=model_body(tags=tags), headers=live.headers)
    keyed = httpx.post(
        f"{account}/models", json=model_body(tags=tags), headers={**live.headers, "Idempotency-Key": "loop"}
    )
    third = httpx.post(f"{account}/models", json=model_body(tags=[]), headers=live.headers)
    assert [r.status_code for r in (plain, keyed, third)] == [200] * 3, plain.text
    assert [r.json()["version"] for r in (plain, keyed, third)] == [1, 2, 3]
    for answer in (plain, keyed, third):
        got = httpx.get(f"{account}/models/{answer.json()['id']}", headers=live.headers)
        assert got.json() == answer.json()
    assert plain.json()["tags"] == tags and third.json()["tags"] == []

    refused = httpx.post(f"{account}/models", json=model_body(url="ftp://example.com/m.pkl"), headers=live.headers)
    assert refused.status_code == 400, refused.text
    missing = account.rsplit("/", 1)[0] + "/no-such-account"
    assert httpx.post(f"{missing}/models", json=model_body(), headers=live.headers).status_code == 404
    listed = httpx.get(f"{account}/models", headers=live.headers).json()["value"]
    assert sorted(m["version"] for m in listed) == [1, 2, 3]


def test_a_keyed_registration_on_the_loop_answers_once(live: Live) -> None:
    """The key's claim, the registration and the stored answer in one transaction on the loop:
    a retry is the first answer replayed, another body a 422, a refused request leaves the key
    free, and a key past its lifetime is a new request before the workers delete its row."""
    account = live.account()
    keyed = {**live.headers, "Idempotency-Key": "loop-once"}
    first = httpx.post(f"{account}/models", json=model_body(), headers=keyed)
    again = httpx.post(f"{account}/models", json=model_body(), headers=keyed)
    assert first.status_code == again.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    other = httpx.post(f"{account}/models", json=model_body(description="other"), headers=keyed)
    assert other.status_code == 422 and other.json()["code"] == "IdempotencyKeyReused"

    # Refused before it runs (its URL), with a key already answered for another body: that key's
    # 422, as when the request is checked after the claim.
    bad_url = httpx.post(f"{account}/models", json=model_body(url=_EXPIRED_SAS), headers=keyed)
    assert bad_url.status_code == 422 and bad_url.json()["code"] == "IdempotencyKeyReused", bad_url.text

    free = {**live.headers, "Idempotency-Key": "loop-refused"}
    refused = httpx.post(f"{account}/models", json=model_body(url=_EXPIRED_SAS), headers=free)
    assert refused.status_code == 400 and "expired" in refused.text, refused.text
    made = httpx.post(f"{account}/models", json=model_body(), headers=free)
    assert made.status_code == 200 and "Idempotent-Replayed" not in made.headers

    with session_scope(live.context.session_factory) as session:
        session.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.key == "loop-once")
            .values(created_at=utcnow() - timedelta(seconds=live.context.settings.idempotency_ttl_seconds + 5))
        )
    anew = httpx.post(f"{account}/models", json=model_body(description="later"), headers=keyed)
    assert anew.status_code == 200 and "Idempotent-Replayed" not in anew.headers, anew.text
    listed = httpx.get(f"{account}/models", headers=live.headers).json()["value"]
    assert sorted(m["version"] for m in listed) == [1, 2, 3]  # the first, the freed key's, the lapsed key's
    assert anew.json()["version"] == 3


def test_a_hostile_key_on_the_loop_is_refused_or_its_callers_own(live: Live) -> None:
    """Keys a client controls, on the production path: a malformed one is a 400 that makes
    nothing; another caller's same key is a request of its own, never their answer replayed."""
    account = live.account()
    for key in ("", "x" * 256, "tab\tkey"):  # httpx itself refuses a line break
        answer = httpx.post(f"{account}/models", json=model_body(), headers={**live.headers, "Idempotency-Key": key})
        assert answer.status_code == 400 and "Idempotency-Key" in answer.json()["message"], answer.text
    assert httpx.get(f"{account}/models", headers=live.headers).json()["value"] == []

    mine = httpx.post(f"{account}/models", json=model_body(), headers={**live.headers, "Idempotency-Key": "shared"})
    other_caller = {**live.token("Owner", "/subscriptions/sub-live"), "Idempotency-Key": "shared"}
    theirs = httpx.post(f"{account}/models", json=model_body(), headers=other_caller)
    assert (mine.status_code, theirs.status_code) == (200, 200), theirs.text
    assert "Idempotent-Replayed" not in theirs.headers
    assert (mine.json()["version"], theirs.json()["version"]) == (1, 2)
