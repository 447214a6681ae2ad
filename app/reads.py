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
``rows`` runs such a statement on PostgreSQL with the driver alone (``app.prebuilt``): compiled
once by SQLAlchemy (with its types' conversions, so the rows are what a session would give),
executed on a connection of the same pool. A session, a Core execution and its result objects cost
such a read more than its round trip did (issue 20: a GET of a model 2.2x an empty request,
1.8x without them). Every other read is a plain function for ``run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import greenlet_spawn
from starlette.concurrency import run_in_threadpool

from app import prebuilt
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
        self._compiled = prebuilt.CompiledStatements(engine.dialect)

    async def run(self, read: Callable[[Session], T], *, many: bool = False) -> T:
        if many:
            return await self.threads.run(read)

        def call() -> T:
            with self._sessions() as session:
                return read(session)

        return await greenlet_spawn(call)

    async def rows(self, statement: Select[Any], params: Mapping[str, object]) -> Sequence[Sequence[Any]]:
        return await prebuilt.run(self.engine, self._compiled.get(statement, Select), params)

    async def close(self) -> None:
        await self.engine.dispose()
