"""The account event streams (images, web services, or both): one database poller per API
process fanning new events out to that process's subscribers, and the Server-Sent Events each
subscriber receives (``event: image`` or ``event: service``).

Events are rows (``app.services.events``), so any API process serves any subscriber and a
client that reconnects with ``Last-Event-ID`` gets what it missed from the table. Every kind
shares one id sequence, so an id from any stream of the account resumes any other. However
many dashboards are connected, a process asks the database one cheap question per interval.

The ids are one sequence for every account, so they stay inside: a client sees each id as its
token (``app.services.event_ids``), and a stream starts at its own account's newest event, so
nothing it sends moves with another account's activity.

A stream lasts only as long as its caller may read the account: the hub re-reads the roles
of its subscribers (one query for all of them) every ``recheck_seconds``, and again after
reading new events and before handing them out, so a principal deleted (or a role removed)
in any process gets no event committed after that, and its stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated

import anyio
from anyio import CapacityLimiter, to_thread
from fastapi import Header, Query
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.auth.caller import Caller, grants_of, with_grants
from app.auth.roles import Permission, account_scope
from app.context import ServiceContext
from app.database import session_scope
from app.errors import BadRequest
from app.orm import SubjectKind
from app.services.accounts import AccountRef
from app.services.event_ids import EventIds
from app.services.events import StreamEvent, events_after, latest_event_id, render, stream_start

log = logging.getLogger("mms.events")

_RESUME = (
    "the `id` of the last event received, as it came (an opaque token: from any of the account's "
    "streams); the stream sends what came after it. Leave it out to start from now."
)
LastEventIdHeader = Annotated[str | None, Header(alias="Last-Event-ID", description=_RESUME)]
LastEventIdQuery = Annotated[
    str | None, Query(alias="lastEventId", description=f"{_RESUME} For clients that cannot set Last-Event-ID.")
]

BATCH = 500
RETRY_MS = 2000  # how soon a browser's EventSource reconnects
STOP_SECONDS = 10.0  # how long stopping waits for a poll in flight
# How long a stream may take to end once the server stops (a replay's database read in
# flight) before it is cancelled; well under uvicorn's graceful shutdown timeout.
STREAM_SHUTDOWN_GRACE_SECONDS = 3.0


def _read(session_factory: Callable[[], Session], query):  # type: ignore[no-untyped-def]
    """``query(session)`` in a transaction of its own (called on a worker thread)."""
    with session_scope(session_factory) as session:
        return query(session)


def may_read(session: Session, caller: Caller, scope: str) -> bool:
    """Whether the roles stored now (not the cached ones) still let ``caller`` read ``scope``."""
    return with_grants(caller, grants_of(session, [caller])).can(Permission.READ, scope)


class Subscription:
    """One connected client's queue; ``overflowed`` when it fell too far behind to keep up."""

    MAX_QUEUED = 1000

    def __init__(
        self,
        account_id: uuid.UUID,
        caller: Caller,
        scope: str,
        *,
        offers_after: int,
        kinds: frozenset[str] = frozenset(SubjectKind),
    ) -> None:
        self.account_id = account_id
        self.kinds = kinds  # the kinds of event its stream sends
        self.caller = caller
        self.scope = scope  # the account's, which the caller must keep the right to read
        # The hub's cursor when it subscribed: every event it offers this queue has a higher
        # id (though not every such event: it may have offered some before).
        self.offers_after = offers_after
        self.queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue(self.MAX_QUEUED)
        self.overflowed = False
        self.revoked = False
        self.ended = False  # the server is stopping

    def end(self) -> None:
        """End the stream (the server is stopping); it returns at its next step."""
        self.ended = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)  # wakes it; a full queue's stream sees ``ended`` first

    def offer(self, event: StreamEvent | None) -> None:
        if event is not None and event.kind not in self.kinds:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # It resumes from the table with Last-Event-ID; nobody else waits for it.
            self.overflowed = True


@dataclass
class ImageVersion:
    account_id: uuid.UUID
    version: int  # the id of the image's newest event
    state: str


class ImageVersions:
    """What this process knows of each image's newest event, fed by the hub's poller and by
    the image GETs that read it from the table; bounded, least recently changed out first."""

    MAX_IMAGES = 200_000

    def __init__(self) -> None:
        self._images: OrderedDict[uuid.UUID, ImageVersion] = OrderedDict()
        self._accounts: dict[tuple[str, str, str], uuid.UUID] = {}  # lower-cased path → id
        self._lock = threading.Lock()

    def note(self, image_id: uuid.UUID, account_id: uuid.UUID, version: int, state: str) -> None:
        """An event (or a read of the table) says the image is at ``version``; never goes back."""
        with self._lock:
            known = self._images.get(image_id)
            if known is not None and known.version >= version:
                return
            self._images[image_id] = ImageVersion(account_id, version, state)
            self._images.move_to_end(image_id)
            if len(self._images) > self.MAX_IMAGES:
                self._images.popitem(last=False)

    def note_account(self, path: tuple[str, str, str], account_id: uuid.UUID) -> None:
        with self._lock:
            if len(self._accounts) >= self.MAX_IMAGES:
                self._accounts.clear()
            self._accounts[tuple(part.lower() for part in path)] = account_id  # type: ignore[assignment]

    def get(self, image_id: uuid.UUID) -> ImageVersion | None:
        return self._images.get(image_id)

    def account(self, path: tuple[str, str, str]) -> uuid.UUID | None:
        return self._accounts.get(tuple(part.lower() for part in path))  # type: ignore[arg-type]


class EventHub:
    """Polls the event table and hands each new event to the subscribers of its account.

    Ids are handed out when rows are inserted but become visible when their transactions
    commit, which on PostgreSQL need not be in id order. So the hub keeps the highest id
    below which it has seen everything (``cursor``), remembers what it saw above it, and
    waits ``gap_seconds`` for a missing id before deciding it was rolled back.
    """

    def __init__(
        self,
        session_factory: Callable[[], Session],
        *,
        interval: float,
        gap_seconds: float = 10.0,
        recheck_seconds: float = 5.0,
    ) -> None:
        self._session_factory = session_factory
        self._interval = interval
        self._recheck_seconds = recheck_seconds
        self._rechecked_at = time.monotonic()
        self._gap_seconds = gap_seconds
        self._subscribers: dict[uuid.UUID, set[Subscription]] = defaultdict(set)
        self._cursor: int | None = None
        self._seen: set[int] = set()
        self._gap_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.versions = ImageVersions()
        # Its own thread, so a burst of requests holding the shared pool never delays a poll.
        self._thread = CapacityLimiter(1)
        self._polled_at = float("-inf")  # monotonic time of the last poll that succeeded

    @property
    def is_current(self) -> bool:
        """Whether the poller has read the table lately (so ``versions`` can be trusted)."""
        return time.monotonic() - self._polled_at < max(5.0, 10 * self._interval)

    def _read(self, query):  # type: ignore[no-untyped-def]
        return _read(self._session_factory, query)

    async def start(self) -> None:
        if self._task is None:
            self._stopping = asyncio.Event()
            self._task = asyncio.create_task(self._run(self._stopping), name="mms-event-hub")

    async def stop(self) -> None:
        """Stop polling and end every stream (their clients reconnect elsewhere)."""
        if self._task is not None:
            # Asked, not cancelled: Task.cancel() abandons a poll's thread mid-query, and the
            # thread then hands its connection back to a pool the engine has disposed of.
            self._stopping.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_SECONDS)
            except TimeoutError:  # a database that does not answer: give up on the poll
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        for subs in list(self._subscribers.values()):
            for sub in list(subs):
                sub.end()

    async def subscribe(
        self, account_id: uuid.UUID, caller: Caller, scope: str, *, kinds: frozenset[str] = frozenset(SubjectKind)
    ) -> Subscription:
        await self.start()  # started by the app's lifespan; lazily where there is none
        # Its first poll reads where the table ends: a subscription needs that cursor.
        while self._cursor is None and not self._stopping.is_set():
            await asyncio.sleep(min(self._interval, 0.05))
        # No await from reading the cursor to joining: what the hub offers from here is above it.
        sub = Subscription(account_id, caller, scope, offers_after=self._cursor or 0, kinds=kinds)
        self._subscribers[account_id].add(sub)
        if self._cursor is None:  # the server stopped before the hub ever read the table
            sub.end()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.account_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.account_id]

    async def _recheck(self, subs: set[Subscription]) -> None:
        """End the streams whose callers may no longer read their account; raises if it cannot tell."""
        subs = {sub for sub in subs if not sub.revoked}
        if not subs:
            return
        grants = await to_thread.run_sync(
            self._read, lambda s: grants_of(s, [sub.caller for sub in subs]), limiter=self._thread
        )
        for sub in subs:
            if not with_grants(sub.caller, grants).can(Permission.READ, sub.scope):
                log.info("events.stream_revoked", extra={"subject": sub.caller.subject})
                sub.revoked = True
                self.unsubscribe(sub)
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.put_nowait(None)  # wakes it; a full queue's stream sees ``revoked`` first

    async def _run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database blip: the next poll catches up from the cursor
                log.warning("events.poll_failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self._interval)

    async def _poll(self) -> None:
        started = time.monotonic()
        if started - self._rechecked_at >= self._recheck_seconds:
            await self._recheck({sub for subs in self._subscribers.values() for sub in subs})
            self._rechecked_at = started
        if self._cursor is None:
            self._cursor = await to_thread.run_sync(self._read, latest_event_id, limiter=self._thread)
            self._polled_at = started
            return
        while True:
            batch = await to_thread.run_sync(
                self._read, lambda s: events_after(s, after_id=self._cursor, limit=BATCH), limiter=self._thread
            )
            fresh = [event for event in batch if event.id not in self._seen]
            # Roles read after the events: a principal deleted before one of them was committed
            # shows up here, and its stream ends before that event reaches it. A failed read
            # raises before anything is marked seen, so the next poll tries these events again.
            await self._recheck({sub for event in fresh for sub in self._subscribers.get(event.account_id, ())})
            for event in fresh:
                self._seen.add(event.id)
                if event.kind == SubjectKind.IMAGE:
                    self.versions.note(event.subject_id, event.account_id, event.id, event.state)
                for sub in tuple(self._subscribers.get(event.account_id, ())):
                    sub.offer(event)
            self._advance(stuck=len(batch) == BATCH and not fresh)
            if len(batch) < BATCH:
                self._polled_at = started
                return

    def _advance(self, *, stuck: bool) -> None:
        assert self._cursor is not None
        while self._cursor + 1 in self._seen:
            self._cursor += 1
            self._seen.discard(self._cursor)
        if not self._seen:
            self._gap_since = None
            return
        now = time.monotonic()
        if self._gap_since is None:
            self._gap_since = now
        if stuck or now - self._gap_since > self._gap_seconds:
            # The missing ids were rolled back (or pruned): stop waiting for them.
            self._cursor = min(self._seen) - 1
            self._gap_since = None
            self._advance(stuck=False)


async def account_events(
    hub: EventHub,
    session_factory: Callable[[], Session],
    account_id: uuid.UUID,
    *,
    caller: Caller,
    scope: str,
    event_ids: EventIds,
    last_event_id: int | None,
    kinds: frozenset[str] = frozenset(SubjectKind),
    shutdown: anyio.Event | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """An account's events of ``kinds``: what came after ``last_event_id`` (or a ``ready``
    mark at the account's newest event), then live. Each is sent as ``event: <its kind>``
    (image, service), under its id's token (``event_ids``).

    The stream ends when the caller's token expires (the client reconnects with a fresh one),
    within the hub's recheck period once the caller may no longer read ``scope``, and at once
    when ``shutdown`` is set (the server is stopping: the client reconnects elsewhere).
    """
    ends_at = caller.expires_at

    def read(query):  # type: ignore[no-untyped-def]
        return _read(session_factory, query)

    # Before reading the table: nothing falls between.
    sub = await hub.subscribe(account_id, caller, scope, kinds=kinds)
    # Ended, not cancelled: the response then finishes its body, and uvicorn's graceful
    # shutdown need not wait for the stream or cut it off mid-frame.
    watcher = asyncio.create_task(_end_on(shutdown, sub)) if shutdown is not None else None
    try:
        # The stream starts at this snapshot, read after subscribing. The hub may yet offer
        # events the snapshot holds (committed before it, not yet polled or handed out): they
        # are ``shown``, which the client has (up to ``start`` or its Last-Event-ID) or gets
        # from the replay below, so the queue skips them. Anything else the hub offers was
        # committed after the start, even with an id below ``start`` (ids are taken before
        # the commit), and is sent.
        # Roles read afresh (the route's may be cached) after subscribing: events the hub read
        # before then, while it rechecked others, reach this stream only if it may still read.
        start, shown, allowed = await to_thread.run_sync(
            read,
            lambda s: (*stream_start(s, account_id=account_id, after_id=sub.offers_after), may_read(s, caller, scope)),
        )
        if not allowed:
            return
        if last_event_id is None:
            # The account's own newest event: resuming after it misses nothing of the account.
            token = event_ids.token(start)
            yield ServerSentEvent(id=token, event="ready", data=json.dumps({"lastEventId": token}), retry=RETRY_MS)
        else:
            yield ServerSentEvent(comment="resuming", retry=RETRY_MS)
            after = last_event_id
            while True:
                batch = await to_thread.run_sync(
                    read, partial(events_after, after_id=after, account_id=account_id, kinds=kinds, limit=BATCH)
                )
                # Roles read afresh after the events (the route's may be cached), as the hub does.
                if not await to_thread.run_sync(read, lambda s: may_read(s, caller, scope)):
                    return
                for event in batch:
                    shown.add(event.id)  # read after the start snapshot: it may be in the queue too
                    yield _frame(event_ids, event)
                if len(batch) < BATCH or sub.ended:
                    break
                after = batch[-1].id
        while True:
            timeout = None if ends_at is None else ends_at - time.time()
            if timeout is not None and timeout <= 0:
                return
            try:
                event = await asyncio.wait_for(sub.queue.get(), timeout)
            except TimeoutError:
                return
            if event is None or sub.overflowed or sub.revoked or sub.ended:
                return
            if event.id in shown:
                shown.discard(event.id)
                continue
            yield _frame(event_ids, event)
    finally:
        if watcher is not None:
            watcher.cancel()
        hub.unsubscribe(sub)


def _frame(event_ids: EventIds, event: StreamEvent) -> ServerSentEvent:
    token = event_ids.token(event.id)
    return ServerSentEvent(id=token, event=event.kind, data=render(token, event.payload))


async def _end_on(shutdown: anyio.Event, sub: Subscription) -> None:
    await shutdown.wait()
    sub.end()


def _last_event_id(header: str | None, query: str | None, event_ids: EventIds) -> int | None:
    """The resume point a client sent (the header an EventSource sends, or ``?lastEventId=``):
    the id of an event this service sent, as it came; 400 for anything else."""
    field = "Last-Event-ID" if header is not None else "lastEventId"
    raw = (header if header is not None else query or "").strip()
    if not raw:
        return None
    event_id = event_ids.event_id(raw)
    if event_id is None:  # a number from before ids were tokens, garbage, or a forged token
        raise BadRequest(
            f"{field} must be the id of an event this service sent, as it came (or leave it out to "
            f"start from now), not {raw[:40]!r}",
            code="InvalidLastEventId",
        )
    return event_id


def stream_response(
    account: AccountRef,
    *,
    caller: Caller,
    context: ServiceContext,
    hub: EventHub,
    kinds: frozenset[str],
    last_event_id_header: str | None,
    last_event_id_query: str | None,
) -> EventSourceResponse:
    """The response of an event stream route: the account's events of ``kinds``, resumed after
    the Last-Event-ID the client sent (400 when it is no event id)."""
    last_event_id = _last_event_id(last_event_id_header, last_event_id_query, context.event_ids)
    scope = account_scope(account.subscription_id, account.resource_group, account.name)
    # Set by sse-starlette when the server starts to stop: the stream then ends cleanly
    # (a finished body) within the grace period, rather than holding the shutdown up.
    shutdown = anyio.Event()
    events = account_events(
        hub,
        context.read_session_factory,
        account.id,
        caller=caller,
        scope=scope,
        event_ids=context.event_ids,
        last_event_id=last_event_id,
        kinds=kinds,
        shutdown=shutdown,
    )
    # X-Accel-Buffering: a proxy in front must pass events on as they come.
    return EventSourceResponse(
        events,
        ping=15,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        shutdown_event=shutdown,
        shutdown_grace_period=STREAM_SHUTDOWN_GRACE_SECONDS,
    )
