"""Reads on the event loop (app.reads.LoopReads, PostgreSQL): a plain function of a session runs
on the loop's own thread, refuses writes, and survives a pooled connection the server cut."""

from __future__ import annotations

import asyncio
import threading
import uuid

import psycopg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.context import ServiceContext
from app.database import WriteInReadOnlySession, make_async_read_engine
from app.orm import Account
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
        task = asyncio.create_task(reads.run(slow))
        await asyncio.sleep(0.3)
        task.cancel()
        try:
            await asyncio.wait_for(task, 3)
        except asyncio.CancelledError:
            cancelled = True
        else:
            cancelled = False
        checked_out = reads.engine.sync_engine.pool.checkedout()
        return cancelled, checked_out, before, await asyncio.wait_for(reads.run(count), 5)

    cancelled, checked_out, before, after = _run(migrated, body)
    assert cancelled
    assert checked_out == 0
    assert after == before  # the next read answers, and the same
