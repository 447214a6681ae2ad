"""What the gateway knows of a service: its key digests, timeout and ready replicas of its
traffic generation, read from the database and kept for MMS_GATEWAY_CACHE_SECONDS.

The cache is what makes a regenerated key stop working "within seconds" rather than at once:
every gateway process re-reads a service at most that long after it last did.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.orm import Service, ServiceReplica

__all__ = ["Route", "RouteTable", "read_route"]

MAX_ENTRIES = 10_000  # services (and unknown ids) remembered at once; the oldest go first


@dataclass(frozen=True)
class Route:
    service_id: uuid.UUID
    auth_enabled: bool
    key_digests: tuple[str, str]  # primary, secondary (app.sealing.Sealer.digest)
    timeout_seconds: float
    replicas: tuple[str, ...]  # host:port of each ready replica of the traffic generation


def read_route(session: Session, service_id: uuid.UUID) -> Route | None:
    """The service's route as the database has it now; None when there is no such service."""
    service = session.execute(
        select(
            Service.auth_enabled,
            Service.primary_key_digest,
            Service.secondary_key_digest,
            Service.scoring_timeout_ms,
            Service.traffic_generation,
        ).where(Service.id == service_id)
    ).one_or_none()
    if service is None:
        return None
    replicas: tuple[str, ...] = ()
    if service.traffic_generation is not None:
        replicas = tuple(
            session.scalars(
                select(ServiceReplica.address)
                .where(
                    ServiceReplica.service_id == service_id,
                    ServiceReplica.generation == service.traffic_generation,
                    ServiceReplica.ready.is_(True),
                )
                .order_by(ServiceReplica.replica_id)
            )
        )
    return Route(
        service_id=service_id,
        auth_enabled=service.auth_enabled,
        key_digests=(service.primary_key_digest, service.secondary_key_digest),
        timeout_seconds=service.scoring_timeout_ms / 1000,
        replicas=replicas,
    )


@dataclass
class _Entry:
    route: Route | None
    expires_at: float
    turns: itertools.count = field(default_factory=itertools.count)  # round robin over the replicas


class RouteTable:
    """Routes by service id, each read at most once per ``ttl`` seconds (one read at a time per
    service however many requests wait for it), in one event loop."""

    def __init__(self, session_factory: sessionmaker[Session], ttl: float) -> None:
        self._session_factory = session_factory
        self._ttl = ttl
        self._entries: OrderedDict[uuid.UUID, _Entry] = OrderedDict()
        self._reading: dict[uuid.UUID, asyncio.Future[Route | None]] = {}

    async def route(self, service_id: uuid.UUID) -> tuple[Route | None, int]:
        """The service's route (None: no such service) and this request's turn in its round robin."""
        entry = self._entries.get(service_id)
        if entry is None or time.monotonic() >= entry.expires_at:
            route = await self._read(service_id)
            turns = entry.turns if entry is not None else itertools.count()
            entry = _Entry(route, time.monotonic() + self._ttl, turns)
            self._entries[service_id] = entry
            self._entries.move_to_end(service_id)
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)
        return entry.route, next(entry.turns)

    async def _read(self, service_id: uuid.UUID) -> Route | None:
        pending = self._reading.get(service_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Route | None] = asyncio.get_running_loop().create_future()
        self._reading[service_id] = future
        try:
            route = await asyncio.to_thread(self._read_in_thread, service_id)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # marked retrieved: the waiters, if any, get it too
            raise
        else:
            future.set_result(route)
            return route
        finally:
            del self._reading[service_id]

    def _read_in_thread(self, service_id: uuid.UUID) -> Route | None:
        with self._session_factory() as session:
            return read_route(session, service_id)
