"""Read-only sessions: what serves a GET never writes, and on SQLite never waits for a writer."""

from __future__ import annotations

import gc
import os
import resource
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

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


def _admin_connection(settings: Settings) -> psycopg.Connection:
    url = make_url(settings.resolved_database_url).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


def _wait_until_gone(admin: psycopg.Connection, backend: int) -> None:
    for _ in range(100):  # at most 5 s
        if not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone():
            return
        time.sleep(0.05)
    raise AssertionError(f"backend {backend} still runs 5 s after pg_terminate_backend")


@pytest.mark.parametrize("pool", ["read", "write"])
def test_a_pooled_connection_the_database_dropped_is_replaced_before_use(settings: Settings, pool: str) -> None:
    """What a PostgreSQL restart does to every pooled connection, done to one: the next
    checkout must not hand it out (the request would fail with a 503)."""
    if settings.resolved_database_url.startswith("sqlite"):
        pytest.skip("a server that drops connections")
    context = ServiceContext.build(settings)
    factory = context.read_session_factory if pool == "read" else context.session_factory
    try:
        with session_scope(factory) as session:
            backend = session.scalar(select(func.pg_backend_pid()))
        with _admin_connection(settings) as admin:  # dropped from outside, while idle in the pool
            admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
            _wait_until_gone(admin, backend)
        with session_scope(factory) as session:
            assert session.scalar(select(func.pg_backend_pid())) != backend
    finally:
        context.dispose()


@contextmanager
def _descriptors_above(lowest: int) -> Iterator[None]:
    """The process's next descriptors are above ``lowest`` (select() refuses those)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < lowest + 64:
        pytest.skip(f"the descriptor limit ({hard}) is below {lowest + 64}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, lowest + 64), hard))
    # An earlier test's unreachable socket, collected while the block runs, would free a low
    # descriptor for the next connection (CI saw fd 28): collect first, and not during the block.
    gc.collect()
    gc.disable()
    fillers = [os.open(os.devnull, os.O_RDONLY)]  # every free descriptor up to ``lowest`` taken
    try:
        while fillers[-1] < lowest:
            fillers.append(os.dup(fillers[0]))
        yield
    finally:
        gc.enable()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("descriptor", ["low", "above 1024"])
def test_a_quiet_pooled_connection_is_used_without_a_ping(settings: Settings, descriptor: str) -> None:
    """A connection with nothing to read is handed out as it is: no round trip before the
    request's own query (pool_pre_ping sent SELECT 1 at every checkout), also when its socket
    is a descriptor above 1024 (a busy process)."""
    if settings.resolved_database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's pool")
    with _descriptors_above(1100) if descriptor != "low" else nullcontext():
        _no_ping_at_checkout(settings, high=descriptor != "low")


def _no_ping_at_checkout(settings: Settings, *, high: bool) -> None:
    context = ServiceContext.build(settings)
    marker = f"SELECT 'marker-{uuid.uuid4().hex}'"
    try:
        with session_scope(context.read_session_factory) as session:
            backend = session.scalar(select(func.pg_backend_pid()))
            assert (session.connection().connection.dbapi_connection.fileno() > 1024) == high
            session.execute(text(marker))
        with session_scope(context.read_session_factory) as session, _admin_connection(settings) as admin:
            session.connection()  # checked out again: the same connection, the pool's only one
            last = admin.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone()
            assert last == (marker,), "the checkout sent a statement of its own"
            assert session.scalar(select(func.pg_backend_pid())) == backend
    finally:
        context.dispose()
