"""A request id on every request and response, one access-log line per request, ETags
with 304s for the API's GETs, and the limits on request bodies."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge, ServiceError, error_response
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


class RequestSlots:
    """How many API requests of this process may be past the database gate at a time.

    A request holds its database connection from its first query to its end, across the
    thread hops of its dependencies, so without a bound a burst takes every connection and
    the requests still in the pool's queue time out. And the bound is small (MMS_API_CONCURRENCY):
    every request in flight is a thread competing for the one interpreter lock, and with 16 of
    them a request waits its turn at each hop (bench/api_bench.py, 32 connections on 2
    processes: p99 ~1 s with 19 slots, ~0.1 s with 4, and more requests served).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: asyncio.Semaphore | None = None

    def slot(self) -> asyncio.Semaphore:
        if self._slots is None:  # made on the server's event loop
            self._slots = asyncio.Semaphore(self.limit)
        return self._slots


def _takes_its_own_slot(method: str, path: str) -> bool:
    """An event stream holds no connection while it waits; an upload takes a slot only for its
    database work, after its body arrived (app.api.routes.assets): a slow client must not hold one."""
    return path.endswith("/images/events") or (method == "POST" and path.endswith("/assets"))


class DatabaseRequestLimit:
    """At most ``slots.limit`` API requests at a time past this point; the rest wait their turn
    (FIFO) on the event loop. What never queries the database passes freely."""

    def __init__(self, app: ASGIApp, slots: RequestSlots) -> None:
        self.app = app
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not path.startswith("/api/")
            or _takes_its_own_slot(scope.get("method", ""), path)
        ):
            await self.app(scope, receive, send)
            return
        async with self.slots.slot():
            await self.app(scope, receive, send)


UNMATCHED = "<unmatched>"  # every path no route knows (404s): one series, not one per path
# The OCI distribution endpoints that the /v2/ catch-all route serves, named as the spec names them.
_REGISTRY_ENDPOINTS = (
    (re.compile(r"/v2/.+/manifests/[^/]+"), "/v2/{name}/manifests/{reference}"),
    (re.compile(r"/v2/.+/blobs/[^/]+"), "/v2/{name}/blobs/{digest}"),
    (re.compile(r"/v2/.+/tags/list"), "/v2/{name}/tags/list"),
)
_PATH_PARAMETER = re.compile(r"\{(\w+):path\}")


def route_template(scope: Scope) -> str:
    """The matched route's template with its router's prefix, e.g. ``/api/.../images/{imageId}``:
    one metrics series per endpoint, however many ids and repositories there are."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not template:
        return UNMATCHED
    path = scope["path"]
    # The route knows its path below the routers that hold it (``/api`` …): the prefix is what
    # precedes the part its pattern matches.
    pattern = getattr(route, "path_regex", None)
    if pattern is not None and not pattern.match(path):
        starts = (i for i, char in enumerate(path) if char == "/" and i > 0)
        template = next((path[:i] + template for i in starts if pattern.match(path[i:])), template)
    if not _PATH_PARAMETER.search(template):
        return template
    # A {name:path} parameter spans any number of segments: name the endpoint, never the path.
    for endpoint, name in _REGISTRY_ENDPOINTS:
        if template == "/v2/{path:path}" and endpoint.fullmatch(path):
            return name
    return _PATH_PARAMETER.sub(r"{\1}", template)


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


# Asset uploads stream to a file under their own limit (MMS_ASSET_MAX_BYTES, app.api.uploads).
_UPLOAD = re.compile(r"/api/subscriptions/[^/]+/resourceGroups/[^/]+/accounts/[^/]+/assets/?")


class BodyTooLarge(HTTPException):
    """Raised by ``receive`` past the limit; FastAPI passes HTTPExceptions from a body read on
    to the error handlers, which answer 413 in the service's error shape."""


class RequestBodyGate:
    """Decides on a request body before anything reads it.

    Under /api/ a body is read only for a caller whose token verifies (else the route's 401,
    at once); and a body other than an asset upload may hold at most ``max_bytes``: 413 up
    front for a larger Content-Length, and from the read that passes the limit for a
    chunked body, so neither a stranger nor a caller can make the process hold a huge body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, verify: Callable[[Scope, str | None], Awaitable[object]]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # The request's Authorization header → its verified token (kept for the route), or Unauthorized.
        self.verify = verify

    def too_large(self) -> str:
        return f"the request body is larger than the limit of {self.max_bytes} bytes (MMS_MAX_JSON_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if headers is None or headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        path = scope["path"]
        try:
            if path.startswith("/api/"):
                await self.verify(scope, headers.get("authorization"))
            if scope["method"] == "POST" and _UPLOAD.fullmatch(path):
                await self.app(scope, receive, send)
                return
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise PayloadTooLarge(self.too_large())
        except ServiceError as error:
            await error_response(error)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(413, self.too_large())
            return message

        await self.app(scope, limited, send)
