"""How a request reads: a plain function of a read-only session, run where it costs least.

On PostgreSQL a read of one thing (a resource, the caller's roles, an account) runs on the
event loop itself: SQLAlchemy's asyncio extension runs it in a greenlet whose queries psycopg's
async driver awaits, so it takes no trip to a thread and back, and its session ends without one
(issue 20: the trip and the session's end were about a third of a GET's cost). A read of many
(``many=True``: a page of up to a thousand rows to load and render) still goes to the thread
pool: on the loop its CPU would run with no break, and every other request of the process,
streams' keep-alives included, would wait for it. The functions stay plain (``Session`` in,
answer out), the same the writes and the workers call; they must not set context variables
(on the loop, one set there would outlive the read). Elsewhere (SQLite, whose driver has no
async form; tests' sessions joined to their transaction) every read runs in the thread pool.

The hottest reads (a resource by id, what a GET polls) are one prebuilt statement each, and
``rows`` runs such a statement on PostgreSQL with the driver alone: compiled once by
SQLAlchemy (with its types' conversions, so the rows are what a session would give), executed
on a connection of the same pool. A session, a Core execution and its result objects cost
such a read more than its round trip did (issue 20: a GET of a model 2.2x an empty request,
1.8x without them). Every other read is a plain function for ``run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import psycopg
from sqlalchemy import Dialect, Select, exc
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import await_only, greenlet_spawn
from starlette.concurrency import run_in_threadpool

from app.database import refuse_writes

T = TypeVar("T")


class Reads(Protocol):
    async def run(self, read: Callable[[Session], T], *, many: bool = False) -> T:
        """``read``'s answer, given a read-only session that ends with it; ``many``: it loads a
        page of rows (or more), not one thing."""
        ...

    async def rows(self, statement: Select[Any], params: Mapping[str, object]) -> Sequence[Sequence[Any]]:
        """The rows of one prebuilt SELECT (a module's constant, with named parameters), each
        a tuple of its columns in order."""
        ...

    async def close(self) -> None:
        """Close the connections this holds (at the server's shutdown, on its event loop)."""
        ...


class ThreadReads:
    """Each read in the thread pool, with a session of ``factory``."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    async def run(self, read: Callable[[Session], T], *, many: bool = False) -> T:
        def call() -> T:
            with self.factory() as session:
                return read(session)

        return await run_in_threadpool(call)

    async def rows(self, statement: Select[Any], params: Mapping[str, object]) -> Sequence[Sequence[Any]]:
        return await self.run(lambda session: session.execute(statement, params).all())

    async def close(self) -> None:
        return None


class _ReadOnlySession(Session):
    """The sessions LoopReads hands its reads: they refuse writes, as read sessions do."""


refuse_writes(_ReadOnlySession)


class LoopReads:
    """A read of one thing on the event loop, with a session of ``engine``
    (``app.database.make_async_read_engine``); a read of many in the thread pool, with ``threads``.

    The read and its session's end run in one greenlet (``greenlet_spawn``, what an
    ``AsyncSession`` runs its work in): an ``AsyncSession`` around it spawned a second for the
    close and a task to shield it, about a tenth of a read's cost. A read the request's
    cancellation interrupts still ends its session (the greenlet finishes it); a connection
    whose reset fails on the way back is thrown away by the pool."""

    def __init__(self, engine: AsyncEngine, threads: ThreadReads) -> None:
        self.engine = engine
        self.threads = threads
        self._sessions = sessionmaker(engine.sync_engine, class_=_ReadOnlySession, expire_on_commit=False)
        self._compiled = _CompiledStatements(engine.dialect)

    async def run(self, read: Callable[[Session], T], *, many: bool = False) -> T:
        if many:
            return await self.threads.run(read)

        def call() -> T:
            with self._sessions() as session:
                return read(session)

        return await greenlet_spawn(call)

    async def rows(self, statement: Select[Any], params: Mapping[str, object]) -> Sequence[Sequence[Any]]:
        compiled = self._compiled.get(statement)
        sql, converted = compiled.sql, compiled.params(params)
        pool = self.engine.sync_engine

        def call() -> list[tuple[Any, ...]]:
            # A connection of the pool, checked as every checkout is (app.database), and given
            # back the same way: in autocommit, refusing writes, nothing to reset.
            try:
                connection = pool.raw_connection()
            except psycopg.Error as error:  # the database away: no connection to be had
                raise _as_sqlalchemy_raises(error, sql, pool.dialect) from error
            try:
                cursor = await_only(connection.driver_connection.execute(sql, converted))
                return compiled.rows(cursor, await_only(cursor.fetchall()), pool.dialect)
            except BaseException as error:
                # Cut off mid-query (the request cancelled, the server gone): the connection's
                # state is unknown, so it is closed, not pooled. A statement the server refused
                # leaves it idle and whole (autocommit).
                if not _idle(connection.driver_connection):
                    connection.invalidate()
                if isinstance(error, psycopg.Error):
                    raise _as_sqlalchemy_raises(error, sql, pool.dialect) from error
                raise
            finally:
                connection.close()

        return await greenlet_spawn(call)

    async def close(self) -> None:
        await self.engine.dispose()


def _as_sqlalchemy_raises(error: psycopg.Error, sql: str, dialect: Dialect) -> BaseException:
    """The driver's error as SQLAlchemy raises it (app.errors maps it: a database away is a
    503), with the statement but never its parameters (they hold the tenant's)."""
    return exc.DBAPIError.instance(sql, None, error, psycopg.Error, hide_parameters=True, dialect=dialect)


def _idle(connection: psycopg.AsyncConnection[Any]) -> bool:
    return not connection.closed and connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


class _Compiled:
    """A prebuilt statement compiled for one dialect, with the conversions SQLAlchemy applies to
    its parameters and columns (a type's processors, such as ``UtcDateTime``'s), so its rows
    are what a session's would be."""

    __slots__ = ("_binds", "_results", "compiled", "sql", "statement")

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        self.statement = statement  # kept: compiled statements are found by identity
        self.compiled = statement.compile(dialect=dialect)
        self.sql = str(self.compiled)
        # What a session's execution would still rewrite (an IN list's parameters, a name the
        # dialect escapes) is not run here: such a statement reads with run().
        if "__[POSTCOMPILE_" in self.sql or getattr(self.compiled, "escaped_bind_names", None):
            raise TypeError(f"rows() cannot run a statement its execution rewrites (use run()): {self.sql}")
        self._binds = tuple(
            (name, process)
            for name, bind in self.compiled.binds.items()
            if (process := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        )
        # A column's conversion may depend on the type the server sends (a numeric's, on
        # psycopg): known with the first answer.
        self._results: tuple[tuple[int, Callable[[Any], Any]], ...] | None = None

    def params(self, given: Mapping[str, object]) -> dict[str, Any]:
        """Every parameter's value, the statement's own (a literal, ``col == 5``) with ``given``;
        a missing one raises as a session's execution would."""
        values = self.compiled.construct_params(dict(given))
        for name, process in self._binds:
            values[name] = process(values[name])
        return values

    def rows(
        self, cursor: psycopg.AsyncCursor[Any], fetched: list[tuple[Any, ...]], dialect: Dialect
    ) -> list[tuple[Any, ...]]:
        if self._results is None:
            columns, described = list(self.statement.selected_columns), cursor.description or []
            if len(columns) != len(described):  # text() among the columns, say
                raise TypeError(f"rows() needs each column's type, and this statement's are not known: {self.sql}")
            self._results = tuple(
                (index, process)
                for index, (column, answered) in enumerate(zip(columns, described, strict=True))
                if (process := column.type.dialect_impl(dialect).result_processor(dialect, answered.type_code))
                is not None
            )
        if not self._results:
            return fetched
        converted = []
        for row in fetched:
            values = list(row)
            for index, process in self._results:
                values[index] = process(values[index])
            converted.append(tuple(values))
        return converted


class _CompiledStatements:
    """Each prebuilt statement compiled the first time it runs."""

    # Statements are modules' constants, a few dozen; a caller that built one per request would
    # recompile it each time (as a session would), never grow this past the bound.
    KEPT = 256

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._compiled: dict[int, _Compiled] = {}

    def get(self, statement: Select[Any]) -> _Compiled:
        kept = self._compiled.get(id(statement))
        if kept is not None and kept.statement is statement:
            return kept
        if not isinstance(statement, Select):
            raise TypeError(f"rows() runs a SELECT, not {type(statement).__name__}")
        kept = _Compiled(statement, self.dialect)
        if len(self._compiled) >= self.KEPT:
            self._compiled.pop(next(iter(self._compiled)))  # the oldest
        self._compiled[id(statement)] = kept
        return kept
