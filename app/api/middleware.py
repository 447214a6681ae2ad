"""A request id on every request and response, one access-log line per request, and ETags
with 304s for the API's GETs."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.log_config import request_id_var
from app.metrics import observe_request

log = logging.getLogger("mms.access")
_MAX_INCOMING_ID = 128


class RequestIdMiddleware:
    """Takes ``x-ms-request-id``/``x-request-id`` from the client or makes one, and echoes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-ms-request-id") or headers.get(b"x-request-id") or b""
        request_id = incoming.decode("latin-1") if 0 < len(incoming) <= _MAX_INCOMING_ID else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-ms-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            # The path only: query strings can carry SAS signatures and skip tokens.
            log.info(
                "http.request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "durationMs": round(seconds * 1000, 2),
                },
            )
            observe_request(scope["method"], route_template(scope), status, seconds)
            request_id_var.reset(token)


class DatabaseRequestLimit:
    """At most ``limit`` API requests at a time past this point; the rest wait their turn.

    A request holds its database connection from its first query to its end, across the
    thread hops of its dependencies, so without a bound a burst takes every connection and
    the requests still in the pool's queue time out. The event stream is exempt (it holds no
    connection while it waits), and so is what never queries the database.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/api/") or path.endswith("/images/events"):
            await self.app(scope, receive, send)
            return
        if self._slots is None:  # made on the server's event loop
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            await self.app(scope, receive, send)


def route_template(scope: Scope) -> str:
    """The matched route's template with its router's prefix, e.g. ``/api/.../images/{imageId}``:
    one metrics series per endpoint, however many ids there are."""
    template = getattr(scope.get("route"), "path", None)
    if not template:
        return "<unmatched>"
    # The route knows its path below the router that holds it; the prefix is what precedes it.
    concrete = scope["path"].strip("/").split("/")
    prefix = concrete[: max(len(concrete) - len(template.strip("/").split("/")), 0)]
    return "/" + "/".join(prefix) + template if prefix else template


class ConditionalGetMiddleware:
    """ETag on every JSON ``GET`` under ``/api/``, and 304 Not Modified for ``If-None-Match``.

    The tag is a digest of the exact body, so it changes exactly when the answer does, in any
    API process; a dashboard polling an unchanged build gets a 304 with no body to parse.
    """

    MAX_BODY = 4 * 1024 * 1024  # larger answers pass through untagged rather than buffered

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        wanted = dict(scope["headers"]).get(b"if-none-match", b"").decode("latin-1")
        start: Message | None = None
        chunks: list[bytes] = []
        size = 0
        passing = False

        async def buffered(message: Message) -> None:
            nonlocal start, size, passing
            if passing:
                await send(message)
                return
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                json_body = headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] != 200 or not json_body or b"etag" in headers:
                    passing = True
                    await send(message)
                    return
                start = message
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.MAX_BODY:
                passing = True
                await send(start)  # type: ignore[arg-type]
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
                chunks.clear()
                if not message.get("more_body"):
                    await send({"type": "http.response.body", "body": b""})
                return
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]  # type: ignore[index]
            headers += [(b"etag", etag.encode()), (b"cache-control", b"no-cache")]
            if etag_matches(wanted, etag):
                kept = [(k, v) for k, v in headers if k != b"content-type"]
                await send({"type": "http.response.start", "status": 304, "headers": kept})
                await send({"type": "http.response.body", "body": b""})
                return
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})  # type: ignore[dict-item]
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, buffered)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison: ``*``, or any listed tag equal to ours with or without W/."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))
