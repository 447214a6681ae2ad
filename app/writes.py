"""How a request writes: in a transaction of its own, committed when its work returns.

``run`` takes a plain function of a ``Session`` (the services' own), in the thread pool: a
write's several statements, its ORM work and the answer it builds would hold the event loop.

``alone`` runs one prebuilt write that is a request's whole work (a model's registration: its
version's claim, its row and tags in one statement), committed as it ends; ``transaction`` a
few prebuilt statements as one transaction (a registration with its Idempotency-Key's claim and
answer). On PostgreSQL both run on the event loop with the driver alone (``app.prebuilt``), on
an autocommit pool of their own: no trip to a thread and back, no session; a transaction in two
round trips (issue 20: a registration cost 1.9 ms, 4x an empty request, in the thread pool with
a session, 1.3 ms, 2.7x, this way; with a key 3.7 ms and 1.9 ms). Elsewhere on PostgreSQL
(tests' sessions joined to their transaction) they run in a session in the thread pool. SQLite
has no such statements (no data-modifying CTEs): a write there takes ``run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy import Insert, Result, Select, Update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import Executable
from starlette.concurrency import run_in_threadpool

from app import prebuilt
from app.database import session_scope

T = TypeVar("T")
Step = tuple[Executable, Mapping[str, object]]  # a prebuilt statement and its parameters
Rows = list[tuple[Any, ...]]
Then = Callable[[list[Rows]], tuple[Sequence[Step], bool]]  # the next statements; commit (or roll back)
_TRANSACTION_KINDS = (Insert, Update, Select)


class Writes(Protocol):
    dialect: str  # the database's ("postgresql", "sqlite"): a write may need a statement of its own on each

    async def run(self, write: Callable[[Session], T]) -> T:
        """``write``'s answer, given a session whose transaction commits when it returns (and
        rolls back if it raises)."""
        ...

    async def alone(self, statement: Insert, params: Mapping[str, object]) -> Sequence[Sequence[Any]]:
        """The rows one prebuilt INSERT ... RETURNING returns, run as a transaction of its own
        and committed as it ends: the request's whole work."""
        ...

    async def transaction(self, first: Sequence[Step], then: Then) -> list[Rows]:
        """One transaction of prebuilt statements (INSERT, UPDATE, SELECT): ``first``'s, then
        those ``then`` names given their rows, and the COMMIT or, as ``then`` says, the
        ROLLBACK. Every statement's rows, in order. On PostgreSQL two round trips on the event
        loop (``app.prebuilt.transaction``)."""
        ...

    async def close(self) -> None:
        """Close the connections this holds (at the server's shutdown, on its event loop)."""
        ...


class ThreadWrites:
    """Each write in the thread pool, with a session of ``factory``."""

    def __init__(self, factory: sessionmaker[Session], dialect: str) -> None:
        self.factory = factory
        self.dialect = dialect

    async def run(self, write: Callable[[Session], T]) -> T:
        def call() -> T:
            with session_scope(self.factory) as session:
                return write(session)

        return await run_in_threadpool(call)

    async def alone(self, statement: Insert, params: Mapping[str, object]) -> Sequence[Sequence[Any]]:
        if self.dialect != "postgresql":
            raise TypeError(f"a write alone is PostgreSQL's (use run() on {self.dialect})")
        return await self.run(lambda session: session.connection().execute(statement, dict(params)).all())

    async def transaction(self, first: Sequence[Step], then: Then) -> list[Rows]:
        def call() -> list[Rows]:
            with self.factory() as session:
                connection = session.connection()
                rows = [_rows(connection.execute(statement, dict(params))) for statement, params in first]
                more, commit = then(list(rows))
                rows += [_rows(connection.execute(statement, dict(params))) for statement, params in more]
                if commit:
                    session.commit()
                else:
                    session.rollback()
                return rows

        return await run_in_threadpool(call)

    async def close(self) -> None:
        return None


def _rows(result: Result[Any]) -> Rows:
    return [tuple(row) for row in result] if result.returns_rows else []


class LoopWrites:
    """PostgreSQL: ``alone`` and ``transaction`` on the event loop, on ``engine``'s autocommit
    pool (``app.database.make_async_write_engine``); ``run`` in the thread pool, with ``threads``."""

    dialect = "postgresql"

    def __init__(self, engine: AsyncEngine, threads: ThreadWrites) -> None:
        self.engine = engine
        self.threads = threads
        self._compiled = prebuilt.CompiledStatements(engine.dialect)

    async def run(self, write: Callable[[Session], T]) -> T:
        return await self.threads.run(write)

    async def alone(self, statement: Insert, params: Mapping[str, object]) -> Sequence[Sequence[Any]]:
        return await prebuilt.run(self.engine, self._compiled.get(statement, Insert), params)

    async def transaction(self, first: Sequence[Step], then: Then) -> list[Rows]:
        def compiled(steps: Sequence[Step]) -> list[prebuilt.Step]:
            return [(self._compiled.get(statement, _TRANSACTION_KINDS), params) for statement, params in steps]

        def compiled_then(rows: list[Rows]) -> tuple[list[prebuilt.Step], bool]:
            more, commit = then(rows)
            return compiled(more), commit

        return await prebuilt.transaction(self.engine, compiled(first), compiled_then)

    async def close(self) -> None:
        await self.engine.dispose()
