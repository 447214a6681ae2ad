"""Engine and session factory, and the check that the schema is migrated.

Three places own a transaction: the request dependency (``app.api.deps``), a coroutine
route's writes (``app.writes``: a session's, or prebuilt statements on the event loop), and a
task's or command's own scope (``session_scope``). Services only flush.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.private_files import prepare_data_dir

F = TypeVar("F", sessionmaker[Session], type[Session])

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class DatabaseNotMigrated(RuntimeError):
    """The database's schema is behind the code's migrations."""


def make_engine(settings: Settings, *, read_only: bool = False) -> Engine:
    """An engine for the configured database, tuned for its dialect.

    ``read_only`` (PostgreSQL): a pool of its own for read-only sessions, whose connections run
    in autocommit (no BEGIN and COMMIT round trips around a read; under READ COMMITTED each
    statement saw the latest commits anyway) and refuse every write
    (``default_transaction_read_only``, set once per connection). SQLite's read sessions share
    the one engine: ``make_session_factory(read_only=True)`` makes them read-only there.
    """
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        prepare_data_dir(settings)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            hide_parameters=True,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout_seconds,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = create_engine(url, **_postgres_pool(settings, read_only=read_only))
    event.listen(engine, "checkout", _check_idle_connection)
    return engine


def _postgres_pool(settings: Settings, *, read_only: bool) -> dict[str, Any]:
    """A PostgreSQL engine's pool settings; a read-only one's connections in autocommit, refusing writes."""
    options: dict[str, Any] = {
        # A failed statement's error (logged with a 5xx) never shows its values: they hold the
        # tenants' (a model's SAS URL, a stored answer).
        "hide_parameters": True,
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout_seconds,
    }
    if read_only:
        options |= {"isolation_level": "AUTOCOMMIT", "connect_args": {"options": "-c default_transaction_read_only=on"}}
    return options


def make_async_read_engine(settings: Settings) -> AsyncEngine:
    """PostgreSQL's read-only engine (``make_engine(read_only=True)``) for the event loop:
    psycopg's async connections, in autocommit and refusing every write, checked as they are
    taken the same way. A pool of its own, bound to the loop that first uses it."""
    engine = create_async_engine(settings.resolved_database_url, **_postgres_pool(settings, read_only=True))
    event.listen(engine.sync_engine, "checkout", _check_idle_connection)
    return engine


def make_async_write_engine(settings: Settings) -> AsyncEngine:
    """PostgreSQL's engine for the writes that run on the event loop (``app.writes``: prebuilt
    statements, alone or in a pipelined transaction): psycopg's async connections in autocommit,
    checked as they are taken. A pool of its own, bound to the loop that first uses it."""
    engine = create_async_engine(
        settings.resolved_database_url, isolation_level="AUTOCOMMIT", **_postgres_pool(settings, read_only=False)
    )
    event.listen(engine.sync_engine, "checkout", _check_idle_connection)
    return engine


def _check_idle_connection(dbapi_connection, _record, proxy) -> None:  # type: ignore[no-untyped-def]
    """A pooled connection is checked as it is taken, without a round trip when it is quiet.

    An idle connection has nothing to read: when PostgreSQL restarts, closes it or a proxy
    drops it, what it sends (an error, then the end of the stream) makes its socket readable.
    So a socket with nothing to read is used as it is, and only one with something waiting
    (or one psycopg already knows is broken) is pinged; a failed ping makes the pool throw the
    connection away and take another (SQLAlchemy's DisconnectionError). After a restart no
    request or build fails on a connection the restart closed (the faults suite restarts
    PostgreSQL); a ping on every checkout cost a round trip per request for the same.
    """
    # The driver's own connection (psycopg's, sync or async): SQLAlchemy's asyncio adapter has no fileno().
    driver_connection = proxy.driver_connection
    try:
        quiet = not driver_connection.closed and not _readable(driver_connection.fileno())
    except (psycopg.Error, OSError, ValueError):  # a connection psycopg knows is closed
        quiet = False
    if quiet:
        return
    try:
        autocommit = dbapi_connection.autocommit
        if not autocommit:
            dbapi_connection.autocommit = True
        try:
            cursor = dbapi_connection.cursor()  # the asyncio adapter's awaits in the checkout's greenlet
            cursor.execute("SELECT 1")
            cursor.close()
        finally:
            if not autocommit:
                dbapi_connection.autocommit = False
    except (psycopg.Error, OSError) as error:
        raise exc.DisconnectionError(f"a pooled connection failed its ping: {error}") from error


def _readable(fd: int) -> bool:
    """Has the socket something to read (or has it hung up)? poll(), not select(): a process
    with more than 1024 descriptors open has sockets select() refuses."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # pysqlite's own transaction handling breaks SAVEPOINT; SQLAlchemy's recipe is to turn it
    # off and emit BEGIN ourselves (_sqlite_begin).
    dbapi_connection.isolation_level = None
    # WAL lets readers run beside the one writer; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


_READ_ONLY = "mms_read_only"


def _sqlite_begin(connection) -> None:  # type: ignore[no-untyped-def]
    read_only = bool(connection.get_execution_options().get(_READ_ONLY))
    # query_only makes a write in a read session fail loudly instead of taking the lock;
    # set only when it changes, as the pooled connection keeps it.
    info = connection.connection.info
    if info.get(_READ_ONLY) != read_only:
        connection.exec_driver_sql(f"PRAGMA query_only={int(read_only)}")
        info[_READ_ONLY] = read_only
    # A read runs on a WAL snapshot and takes no lock. A writer takes the write lock up front
    # (IMMEDIATE): a deferred transaction that reads and then writes fails at once with
    # SQLITE_BUSY when another writer got in between, where IMMEDIATE waits its turn.
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def make_session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions on ``engine``; ``read_only`` ones refuse writes (the ORM before the database,
    which refuses them too) and, on SQLite, never wait for or hold the write lock (reads see
    the snapshot their transaction started on). On PostgreSQL give a ``read_only`` engine."""
    if not read_only:
        return sessionmaker(bind=engine, expire_on_commit=False)
    return refuse_writes(sessionmaker(bind=engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False))


class WriteInReadOnlySession(RuntimeError):
    """Code that serves a read (a GET) tried to write: a bug, caught before the database sees it."""


def refuse_writes(factory: F) -> F:
    """Make ``factory``'s sessions (a sessionmaker's, or a Session class's) raise on any ORM
    write (the database refuses them too)."""

    def no_flush(session: Session, _context, _instances) -> None:  # type: ignore[no-untyped-def]
        changed = [*session.new, *session.deleted, *(o for o in session.dirty if session.is_modified(o))]
        if changed:
            raise WriteInReadOnlySession(f"a read-only session would write {changed[:3]}")

    def no_dml(state) -> None:  # type: ignore[no-untyped-def]
        if state.is_insert or state.is_update or state.is_delete:
            raise WriteInReadOnlySession(f"a read-only session would run {state.statement}")

    event.listen(factory, "before_flush", no_flush)
    event.listen(factory, "do_orm_execute", no_dml)
    return factory


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction commits when the block succeeds and rolls back otherwise."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(database_url: str) -> AlembicConfig:
    """Alembic's configuration pointed at our migrations and the given database."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema up to the newest migration."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as connection:
        # Batch mode rebuilds a SQLite table by copy, drop and rename; with foreign keys on,
        # the drop would cascade to the rows that reference it (a build's log, say). The
        # pragma only takes effect outside a transaction, so it is set before BEGIN.
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if sqlite and (broken := connection.exec_driver_sql("PRAGMA foreign_key_check").all()):
                    raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
        finally:
            if sqlite:
                connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")


def ensure_migrated(engine: Engine) -> None:
    """Refuse to run against a schema older than the code."""
    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    if current != set(script.get_heads()):
        raise DatabaseNotMigrated(
            f"The database at {engine.url.render_as_string(hide_password=True)} is not migrated "
            f"(at {sorted(current) or 'an empty schema'}, the code needs {script.get_heads()}). "
            "Run `mms db upgrade` with the same MMS_DATABASE_URL, then start again."
        )
