"""Read-only sessions: what serves a GET never writes, and on SQLite never waits for a writer."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid

import psycopg
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.context import ServiceContext
from app.database import WriteInReadOnlySession, session_scope
from app.orm.account import Account


def _account(context: ServiceContext) -> uuid.UUID:
    with session_scope(context.session_factory) as session:
        account = Account(
            subscription_id=f"s-{uuid.uuid4().hex[:8]}",
            resource_group="rg",
            name="a",
            location="eastus2",
            sku_name="S1",
            sku_capacity=1,
        )
        session.add(account)
        session.flush()
        return account.id


def test_a_read_only_session_refuses_orm_writes_before_the_database_sees_them(service_context: ServiceContext) -> None:
    account_id = _account(service_context)
    reads = service_context.read_session_factory
    with pytest.raises(WriteInReadOnlySession), session_scope(reads) as session:
        session.get(Account, account_id).location = "westus"
        session.flush()
    with pytest.raises(WriteInReadOnlySession), session_scope(reads) as session:
        session.execute(update(Account).where(Account.id == account_id).values(location="westus"))
    with session_scope(reads) as session:
        assert session.get(Account, account_id).location == "eastus2"


def test_the_database_refuses_a_write_that_bypasses_the_orm_in_a_read_only_session(settings: Settings) -> None:
    context = ServiceContext.build(settings)
    account_id = _account(context)
    reads = context.read_session_factory
    with (
        pytest.raises(DBAPIError, match="(?i)readonly|read-only|attempt to write"),
        session_scope(reads) as session,
    ):
        sqlite = context.engine.dialect.name == "sqlite"
        session.execute(
            text("UPDATE accounts SET location = 'westus' WHERE id = :id"),
            {"id": account_id.hex if sqlite else account_id},
        )
    # The same pooled connection writes again once a writing session takes it.
    with session_scope(context.session_factory) as session:
        session.execute(update(Account).where(Account.id == account_id).values(location="westus"))
    with session_scope(reads) as session:
        assert session.get(Account, account_id).location == "westus"
    context.dispose()


def test_on_sqlite_a_read_neither_waits_for_nor_blocks_the_writer(settings: Settings) -> None:
    if not settings.resolved_database_url.startswith("sqlite"):
        pytest.skip("SQLite's write lock")
    context = ServiceContext.build(settings)
    account_id = _account(context)
    # Another process's writer holds the write lock for 3 s.
    writer = sqlite3.connect(
        settings.resolved_database_url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False
    )
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE accounts SET location = 'westus' WHERE id = ?", (account_id.hex,))
    released = threading.Timer(3.0, lambda: writer.execute("COMMIT"))
    released.start()
    try:
        started = time.monotonic()
        with session_scope(context.read_session_factory) as session:
            location = session.scalar(select(Account.location).where(Account.id == account_id))
        waited = time.monotonic() - started
        assert location == "eastus2"  # the snapshot before the writer's commit
        assert waited < 1.0, f"the read waited {waited:.1f} s for the writer"
    finally:
        released.join()
        writer.close()
    with session_scope(context.read_session_factory) as session:
        assert session.scalar(select(Account.location).where(Account.id == account_id)) == "westus"
    context.dispose()


def test_a_pooled_read_connection_the_database_dropped_is_replaced_before_use(settings: Settings) -> None:
    if settings.resolved_database_url.startswith("sqlite"):
        pytest.skip("a server that drops connections")
    context = ServiceContext.build(settings)
    with context.engine.connect() as connection:
        backend = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    # Dropped from outside the pool, while it sits idle in it.
    with psycopg.connect(
        make_url(settings.resolved_database_url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    ) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (backend,))
    with session_scope(context.read_session_factory) as session:
        assert session.scalar(select(func.pg_backend_pid())) != backend
    context.dispose()
