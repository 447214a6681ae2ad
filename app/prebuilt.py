"""A prebuilt statement (a module's constant, with named parameters) run on the event loop with
psycopg's async driver alone, past SQLAlchemy's execution: compiled once by SQLAlchemy, with its
types' conversions, so its rows are what a session's would be. A session, a Core execution and
its result objects cost a one-statement request more than its round trip to the database did
(issue 20). ``app.reads`` runs SELECTs this way, ``app.writes`` a write that is a request's
whole work; both on connections of an autocommit pool of their own."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
from sqlalchemy import Dialect, exc
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.expression import Executable
from sqlalchemy.util import await_only, greenlet_spawn


async def run(engine: AsyncEngine, compiled: Compiled, params: Mapping[str, object]) -> list[tuple[Any, ...]]:
    """``compiled``'s rows for ``params``, run on a connection of ``engine``'s pool (autocommit)."""
    sql, converted = compiled.sql, compiled.params(params)
    pool = engine.sync_engine

    def call() -> list[tuple[Any, ...]]:
        # A connection of the pool, checked as every checkout is (app.database), and given
        # back the same way: in autocommit, nothing to reset.
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


Step = tuple["Compiled", Mapping[str, object]]
Rows = list[tuple[Any, ...]]


async def transaction(
    engine: AsyncEngine, first: Sequence[Step], then: Callable[[list[Rows]], tuple[Sequence[Step], bool]]
) -> list[Rows]:
    """One transaction in two round trips, on a connection of ``engine``'s pool (autocommit):
    BEGIN and ``first``'s statements are sent together (psycopg's pipeline); ``then``, given
    their rows, names the statements to send next and whether they end with the COMMIT (or a
    ROLLBACK). The rows of every statement, in order. A session's transaction took a round trip
    for the BEGIN, each statement and the COMMIT (issue 20)."""
    pool = engine.sync_engine
    running = [compiled.sql for compiled, _ in first]  # the statements in flight: what an error names

    async def trip(
        driver: psycopg.AsyncConnection[Any], pipeline: psycopg.AsyncPipeline, steps: Sequence[Step], last: str | None
    ) -> list[Rows]:
        """Send ``steps`` (and ``last``: COMMIT, say) in one round trip; their rows."""
        running[:] = [compiled.sql for compiled, _ in steps] or [last or ""]
        cursors = [
            (compiled, await driver.execute(compiled.sql, compiled.params(params))) for compiled, params in steps
        ]
        if last is not None:
            await driver.execute(last)
        await pipeline.sync()
        return [
            compiled.rows(cursor, await cursor.fetchall() if cursor.description is not None else [], pool.dialect)
            for compiled, cursor in cursors
        ]

    async def work(driver: psycopg.AsyncConnection[Any]) -> list[Rows]:
        async with driver.pipeline() as pipeline:
            await driver.execute("BEGIN")
            rows = await trip(driver, pipeline, first, None)
            try:
                more, commit = then(list(rows))
            except BaseException:  # the answer failed to build: nothing of it stays, no lock held on
                await trip(driver, pipeline, [], "ROLLBACK")
                raise
            return rows + await trip(driver, pipeline, more, "COMMIT" if commit else "ROLLBACK")

    def call() -> list[Rows]:
        try:
            connection = pool.raw_connection()
        except psycopg.Error as error:
            raise _as_sqlalchemy_raises(error, "; ".join(running), pool.dialect) from error
        try:
            return await_only(work(connection.driver_connection))
        except BaseException as error:
            # A refused statement leaves the transaction aborted, a cut-off one in an unknown
            # state: either way the connection is closed, not pooled (rare: a race, a restart).
            if not _idle(connection.driver_connection):
                connection.invalidate()
            if isinstance(error, psycopg.Error):
                raise _as_sqlalchemy_raises(error, "; ".join(running), pool.dialect) from error
            raise
        finally:
            connection.close()

    return await greenlet_spawn(call)


def _as_sqlalchemy_raises(error: psycopg.Error, sql: str, dialect: Dialect) -> BaseException:
    """The driver's error as SQLAlchemy raises it (app.errors maps it: a database away is a
    503), with the statement but never its parameters (they hold the tenant's)."""
    return exc.DBAPIError.instance(sql, None, error, psycopg.Error, hide_parameters=True, dialect=dialect)


def _idle(connection: psycopg.AsyncConnection[Any]) -> bool:
    return not connection.closed and connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


class Compiled:
    """A prebuilt statement compiled for one dialect, with the conversions SQLAlchemy applies to
    its parameters and columns (a type's processors, such as ``UtcDateTime``'s), so its rows
    are what a session's would be."""

    __slots__ = ("_binds", "_results", "compiled", "sql", "statement")

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        self.statement = statement  # kept: compiled statements are found by identity
        self.compiled = statement.compile(dialect=dialect)
        self.sql = str(self.compiled)
        # What a session's execution would still rewrite (an IN list's parameters, a name the
        # dialect escapes) is not run here: such a statement reads with run().
        if "__[POSTCOMPILE_" in self.sql or getattr(self.compiled, "escaped_bind_names", None):
            raise TypeError(f"a prebuilt statement cannot be one its execution rewrites (use a session): {self.sql}")
        # Nor one that leaves a column to a Python-side default (an id, a time): a session's
        # execution computes those, and here the column would be NULL.
        if getattr(self.compiled, "insert_prefetch", None) or getattr(self.compiled, "update_prefetch", None):
            raise TypeError(f"a prebuilt write must give every column a Python default would fill: {self.sql}")
        # By the names construct_params gives: an anonymous parameter's (a literal's) is made
        # at compile time; once each, however many places it is used in.
        self._binds = tuple(
            {
                self.compiled.bind_names[bind]: process
                for bind in self.compiled.binds.values()
                if (process := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
            }.items()
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
            # A SELECT's columns, or what a write returns (RETURNING).
            columns, described = list(self.statement.exported_columns), cursor.description or []
            if len(columns) != len(described):  # text() among the columns, say
                raise TypeError(f"a prebuilt statement needs each column's type, and these are not known: {self.sql}")
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


class CompiledStatements:
    """Each prebuilt statement compiled the first time it runs."""

    # Statements are modules' constants, a few dozen; a caller that built one per request would
    # recompile it each time (as a session would), never grow this past the bound.
    KEPT = 256

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._compiled: dict[int, Compiled] = {}

    def get(self, statement: Executable, kind: type[Executable] | tuple[type[Executable], ...]) -> Compiled:
        """``statement`` compiled, refused unless it is of ``kind`` (a ``Select``, say)."""
        if not isinstance(statement, kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            named = " or ".join(k.__name__ for k in kinds)
            raise TypeError(f"this runs a {named}, not {type(statement).__name__}")
        kept = self._compiled.get(id(statement))
        if kept is not None and kept.statement is statement:
            return kept
        kept = Compiled(statement, self.dialect)
        if len(self._compiled) >= self.KEPT:
            self._compiled.pop(next(iter(self._compiled)))  # the oldest
        self._compiled[id(statement)] = kept
        return kept
