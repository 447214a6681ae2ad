"""Reads on the event loop (app.reads.LoopReads, PostgreSQL): a plain function of a session runs
on the loop's own thread, refuses writes, and survives a pooled connection the server cut; a
prebuilt statement run with the driver alone (``rows``) gives what a session gives and handles
its connection the same way."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy import (
    Integer,
    Select,
    String,
    Uuid,
    bindparam,
    cast,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from app.config import Settings
from app.context import ServiceContext
from app.database import WriteInReadOnlySession, make_async_read_engine
from app.orm import Account
from app.orm.base import UtcDateTime
from app.reads import LoopReads, ThreadReads

pytestmark = pytest.mark.postgres_only


@pytest.fixture()
def migrated(service_context: ServiceContext) -> Settings:
    return service_context.settings  # its database migrated


def _run(settings: Settings, body):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        reads = LoopReads(make_async_read_engine(settings), threads=ThreadReads(sessionmaker()))  # no many here
        try:
            return await body(reads)
        finally:
            await reads.close()

    return asyncio.run(main())


async def _cancelled_while_waiting(read: Coroutine[Any, Any, object]) -> bool:
    """Start ``read``, cancel it 0.3 s later (while the database works on it, as when a client
    goes away), and say whether it ended cancelled within 3 s."""
    task = asyncio.create_task(read)
    await asyncio.sleep(0.3)
    task.cancel()
    try:
        await asyncio.wait_for(task, 3)
    except asyncio.CancelledError:
        return True
    return False


def test_a_read_runs_on_the_event_loop_thread_with_no_trip_to_a_thread(migrated: Settings) -> None:
    def read(session: Session) -> tuple[int, int]:
        return threading.get_ident(), session.scalar(select(func.count()).select_from(Account)) or 0

    async def body(reads: LoopReads) -> tuple[int, tuple[int, int]]:
        return threading.get_ident(), await reads.run(read)

    loop_thread, (read_thread, _) = _run(migrated, body)
    assert read_thread == loop_thread


def test_a_read_that_writes_is_refused_by_the_session_and_by_the_database(migrated: Settings) -> None:
    account = Account(
        subscription_id="reads", resource_group="rg", name=f"a{uuid.uuid4().hex[:8]}", location="l", sku_name="S1"
    )

    def orm_write(session: Session) -> None:
        session.add(account)
        session.flush()

    def raw_write(session: Session) -> None:
        session.connection().exec_driver_sql("CREATE TABLE reads_refused (id int)")

    async def body(reads: LoopReads) -> tuple[Exception, Exception]:
        errors = []
        for write in (orm_write, raw_write):
            try:
                await reads.run(write)
            except Exception as error:  # noqa: BLE001 - the test looks at which
                errors.append(error)
        return errors[0], errors[1]

    orm_error, raw_error = _run(migrated, body)
    assert isinstance(orm_error, WriteInReadOnlySession)
    assert isinstance(raw_error, DBAPIError) and isinstance(raw_error.orig, psycopg.errors.ReadOnlySqlTransaction)


def test_a_pooled_connection_the_server_cut_is_replaced_without_a_failed_read(migrated: Settings) -> None:
    def backend(session: Session) -> int:
        return session.scalar(text("SELECT pg_backend_pid()"))  # type: ignore[return-value]

    async def body(reads: LoopReads) -> tuple[int, int, int]:
        first = await reads.run(backend)  # its connection back in the pool, idle
        with psycopg.connect(migrated.resolved_database_url.replace("+psycopg", ""), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        await asyncio.sleep(0.2)  # the server's goodbye reaches the socket
        second = await reads.run(backend)  # would raise on the cut connection without the check
        third = await reads.run(backend)
        return first, second, third

    first, second, third = _run(migrated, body)
    assert second != first
    assert third == second  # the new connection is pooled, not thrown away each time


def test_a_cancelled_read_gives_its_connection_back_and_the_next_read_works(migrated: Settings) -> None:
    """A request cancelled while its read waits on the database (a client gone, the server
    stopping) leaves no connection checked out of the loop's pool."""

    def slow(session: Session) -> None:
        session.execute(text("SELECT pg_sleep(5)"))

    def count(session: Session) -> int:
        return session.scalar(select(func.count()).select_from(Account)) or 0

    async def body(reads: LoopReads) -> tuple[bool, int, int, int]:
        before = await reads.run(count)
        cancelled = await _cancelled_while_waiting(reads.run(slow))
        checked_out = reads.engine.sync_engine.pool.checkedout()
        return cancelled, checked_out, before, await asyncio.wait_for(reads.run(count), 5)

    cancelled, checked_out, before, after = _run(migrated, body)
    assert cancelled
    assert checked_out == 0
    assert after == before  # the next read answers, and the same


class _Shouted(TypeDecorator[str]):
    """A type SQLAlchemy converts both ways: stored lower-case, read upper-case."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: object) -> str | None:
        return None if value is None else value.lower()

    def process_result_value(self, value: str | None, dialect: object) -> str | None:
        return None if value is None else value.upper()


_CONVERTED = select(
    bindparam("word", type_=_Shouted).label("shouted"),
    cast(bindparam("word", type_=_Shouted), String).label("stored"),  # as sent: no conversion back
    literal(datetime(2026, 12, 5, 6, 0, tzinfo=UTC), UtcDateTime).label("at"),
    bindparam("id", type_=Uuid).label("id"),
)
_BACKEND = select(func.pg_backend_pid())


def test_rows_are_what_a_session_gives_with_the_types_conversions(migrated: Settings) -> None:
    """rows() runs past SQLAlchemy's execution, yet each parameter and column is converted as a
    session converts it (a type's processors): a model's created_at, say."""
    params = {"word": "MiXeD", "id": uuid.uuid4()}

    async def body(reads: LoopReads) -> tuple[list[tuple], list[tuple]]:
        direct = await reads.rows(_CONVERTED, params)
        again = await reads.rows(_CONVERTED, params)  # compiled once, the same the second time
        assert direct == again
        by_session = await reads.run(lambda session: session.execute(_CONVERTED, params).all())
        return [tuple(row) for row in direct], [tuple(row) for row in by_session]

    direct, by_session = _run(migrated, body)
    assert direct == by_session == [("MIXED", "mixed", datetime(2026, 12, 5, 6, 0, tzinfo=UTC), params["id"])]


def test_rows_runs_a_select_only_and_the_database_refuses_a_write_hidden_in_one(migrated: Settings) -> None:
    table = Account.__table__
    name = f"a{uuid.uuid4().hex[:8]}"
    written = (
        insert(table)
        .values(
            id=uuid.uuid4(),
            subscription_id="reads",
            resource_group="rg",
            name=name,
            location="l",
            sku_name="S1",
            created_at=datetime.now(UTC),  # a Python default left to fill is refused before the database sees it
        )
        .returning(table.c.id)
        .cte("written")
    )

    async def body(reads: LoopReads) -> tuple[Exception, Exception, int, int]:
        try:
            await reads.rows(insert(table), {})  # type: ignore[arg-type]
        except TypeError as error:
            not_a_select = error
        try:
            await reads.rows(select(Account.__table__.c.id).where(Account.__table__.c.name.in_(["a", "b"])), {})
        except TypeError as error:
            assert "rewrites" in str(error)
        else:
            raise AssertionError("ran a statement whose IN list its execution would have expanded")
        try:
            await reads.rows(select(text("1")), {})  # a column whose type nobody knows
        except TypeError as error:
            assert "each column's type" in str(error)
        else:
            raise AssertionError("ran a statement whose columns' conversions are not known")
        try:
            await reads.rows(select(written.c.id), {})
        except DBAPIError as error:
            refused = error
        pid = (await reads.rows(_BACKEND, {}))[0][0]
        return not_a_select, refused, reads.engine.sync_engine.pool.checkedout(), pid

    not_a_select, refused, checked_out, _ = _run(migrated, body)
    assert "runs a Select, not Insert" in str(not_a_select)
    assert isinstance(refused.orig, psycopg.errors.ReadOnlySqlTransaction) and refused.hide_parameters
    assert checked_out == 0
    with psycopg.connect(migrated.resolved_database_url.replace("+psycopg", "")) as check:
        assert check.execute("SELECT count(*) FROM accounts WHERE name = %s", (name,)).fetchone() == (0,)


def test_rows_keeps_a_connection_a_refused_statement_left_whole_and_a_cancelled_read_runs_on(
    migrated: Settings,
) -> None:
    """A statement the server refused leaves its connection idle: kept. A read cancelled while
    the server works on it (a client gone) stops the server's work too, gives its connection
    back, and the next read answers."""

    async def body(reads: LoopReads) -> tuple[int, int, int, bool, int, list[tuple]]:
        first = (await reads.rows(_BACKEND, {}))[0][0]
        try:
            await reads.rows(select(literal(1) / bindparam("zero", type_=Integer)), {"zero": 0})
        except DBAPIError as error:
            assert isinstance(error.orig, psycopg.errors.DivisionByZero), error
        else:
            raise AssertionError("divided by zero")
        after_error = (await reads.rows(_BACKEND, {}))[0][0]
        cancelled = await _cancelled_while_waiting(reads.rows(select(func.pg_sleep(5)), {}))
        checked_out = reads.engine.sync_engine.pool.checkedout()
        after_cancel = (await asyncio.wait_for(reads.rows(_BACKEND, {}), 5))[0][0]
        sleeping = await reads.rows(
            select(literal_column("pid", Integer))
            .select_from(text("pg_stat_activity"))
            .where(text("state = 'active' AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()")),
            {},
        )
        return first, after_error, after_cancel, cancelled, checked_out, list(sleeping)

    first, after_error, after_cancel, cancelled, checked_out, sleeping = _run(migrated, body)
    assert after_error == first  # a division by zero leaves the connection idle: kept
    assert cancelled and checked_out == 0
    assert after_cancel  # the next read answers
    assert sleeping == []  # the server is not still sleeping for a read nobody waits for


def test_rows_replaces_a_pooled_connection_the_server_cut(migrated: Settings) -> None:
    async def body(reads: LoopReads) -> tuple[int, int, int]:
        first = (await reads.rows(_BACKEND, {}))[0][0]
        with psycopg.connect(migrated.resolved_database_url.replace("+psycopg", ""), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        await asyncio.sleep(0.2)
        second = (await reads.rows(_BACKEND, {}))[0][0]
        third = (await reads.rows(_BACKEND, {}))[0][0]
        return first, second, third

    first, second, third = _run(migrated, body)
    assert second != first and third == second


def test_rows_with_the_database_away_raises_what_the_api_answers_503(migrated: Settings) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    away = migrated.model_copy(update={"database_url": f"postgresql+psycopg://postgres@127.0.0.1:{port}/none"})

    async def body(reads: LoopReads) -> Exception:
        try:
            await reads.rows(_BACKEND, {})
        except Exception as error:  # noqa: BLE001 - the test looks at which
            return error
        raise AssertionError("read a database that is not there")

    error = _run(away, body)
    assert isinstance(error, OperationalError), repr(error)


def test_compiled_statements_are_kept_by_identity_and_bounded() -> None:
    from sqlalchemy.dialects import postgresql

    from app.prebuilt import CompiledStatements

    kept = CompiledStatements(postgresql.psycopg.dialect())
    first = select(literal_column("1", Integer))
    assert kept.get(first, Select) is kept.get(first, Select)
    assert kept.get(select(literal_column("1", Integer)), Select) is not kept.get(first, Select)  # equal text, another
    built = [select(literal_column(str(n), Integer)) for n in range(kept.KEPT + 10)]
    assert [kept.get(statement, Select).sql for statement in built] == [f"SELECT {n}" for n in range(kept.KEPT + 10)]
    assert len(kept._compiled) == kept.KEPT
