"""The ASGI application: health, swagger and score routes, JSON errors, request ids."""

from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from .runner import ScoringThread
from .user_script import UserScript

if TYPE_CHECKING:  # subscripted at run time they would fail on Python 3.8, which images may run
    from collections.abc import Awaitable, Callable

    Send = Callable[[dict[str, Any]], Awaitable[None]]
    Receive = Callable[[], Awaitable[dict[str, Any]]]

log = logging.getLogger("scoring_server")

JSON = b"application/json"
MAX_REQUEST_ID = 100  # longer incoming ids are replaced, as Azure caps them at 100 chars
HEALTHY = b'{"status":"Healthy"}'
MAX_ERROR_CHARS = 2000  # an exception message can embed a whole input; the log has it all


class ClientGone(Exception):
    """The client disconnected before sending the whole body."""


class ScoringApp:
    """ASGI callable serving ``/``, ``/swagger.json`` and ``/score`` for one ``UserScript``."""

    def __init__(self, script: UserScript, max_body_bytes: int, swagger: bytes) -> None:
        self.script = script
        self.max_body_bytes = max_body_bytes
        self.swagger = swagger
        # One thread: run() calls are serialised like Azure's single sync worker, and the
        # event loop stays free to answer health probes while run() is busy.
        self.thread = ScoringThread()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Handle one HTTP request (lifespan is disabled, websockets are not served)."""
        if scope["type"] != "http":
            return
        rid, length = _scan_headers(scope["headers"])
        path, method = scope["path"], scope["method"]
        if path == "/score":
            if method == "POST":
                await self._score(scope, receive, send, rid, length)
            else:
                await _error(send, 405, "use POST /score", rid, [(b"allow", b"POST")])
        elif path in ("/", "/swagger.json"):
            if method in ("GET", "HEAD"):
                body = HEALTHY if path == "/" else self.swagger
                await _respond(send, 200, body, rid)
            else:
                await _error(send, 405, f"use GET {path}", rid, [(b"allow", b"GET, HEAD")])
        else:
            await _error(send, 404, f"no route {path}", rid)

    async def _score(self, scope, receive: Receive, send: Send, rid: str, length: int) -> None:
        limit = self.max_body_bytes
        too_big = f"request body exceeds {limit} bytes"
        if length > limit:  # refuse before reading anything
            await _error(send, 413, too_big, rid, [(b"connection", b"close")])
            return
        try:
            body = await _read_body(receive, limit)
        except ClientGone:
            return
        if body is None:
            await _error(send, 413, too_big, rid, [(b"connection", b"close")])
            return
        try:
            raw = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await _error(send, 400, f"body is not UTF-8: {exc}", rid)
            return
        headers = _header_dict(scope["headers"]) if self.script.wants_headers else None
        try:
            result, content_type = await self.thread.submit(self._run, raw, headers)
        except _RunFailed as failed:
            exc = failed.__cause__
            log.error("request %s: %s", rid, failed, exc_info=exc)
            message = f"{failed}: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
            await _error(send, 500, message, rid, [(b"x-ms-run-function-failed", b"True")])
            return
        await _respond(send, 200, result, rid, content_type)

    def _run(self, raw: str, headers: dict[str, str] | None) -> tuple[bytes, bytes]:
        """Call run() and encode its result, both on the scoring thread."""
        try:
            output = self.script.invoke(raw, headers)
        except BaseException as exc:  # even sys.exit() in run() is one failed request
            raise _RunFailed("run() raised") from exc
        try:
            return encode_output(output)
        except Exception as exc:
            raise _RunFailed("run() returned a value that cannot be sent as JSON") from exc


class _RunFailed(Exception):
    """run() raised, or its output could not be encoded; the cause is chained."""


def encode_output(value: Any) -> tuple[bytes, bytes]:
    """Encode run() output as Azure did: JSON (a str becomes a JSON string, None ``{}``)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), b"application/octet-stream"
    if value is None:
        return b"{}", JSON
    return json.dumps(value, default=_to_builtin).encode(), JSON


def _to_builtin(obj: Any) -> Any:
    # Duck-typed numpy support (arrays .tolist(), scalars .item()) without importing numpy.
    for name in ("tolist", "item"):
        method = getattr(obj, name, None)
        if callable(method):
            return method()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _scan_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str, int]:
    """Return the request id to use and the declared Content-Length (0 if none)."""
    ms_id = plain_id = None
    length = 0
    for name, value in headers:
        if name == b"content-length":
            length = int(value) if value.isdigit() else 0  # servers reject bad values
        elif name == b"x-ms-request-id":
            ms_id = value
        elif name == b"x-request-id":
            plain_id = value
    for value in (ms_id, plain_id):
        if value and len(value) <= MAX_REQUEST_ID and value.isascii():
            text = value.decode("ascii")
            if text.isprintable():
                return text, length
    return str(uuid.uuid4()), length


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """Read the whole body, or return None as soon as it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if not chunks and not message.get("more_body"):
            return chunk if len(chunk) <= limit else None  # common case: a single chunk
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _header_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    # Repeated headers are joined with commas (RFC 9110 section 5.3).
    out: dict[str, str] = {}
    for name, value in headers:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        out[key] = f"{out[key]},{text}" if key in out else text
    return out


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    rid: str,
    content_type: bytes = JSON,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    rid_bytes = rid.encode("ascii")
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-ms-request-id", rid_bytes),
        (b"x-request-id", rid_bytes),
    ]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, message: str, rid: str, extra: list | None = None) -> None:
    body = json.dumps({"error": message, "requestId": rid}).encode()
    await _respond(send, status, body, rid, JSON, extra)


def default_swagger(title: str) -> dict[str, Any]:
    """A minimal Swagger 2.0 document describing the routes."""
    error = {"description": "Error", "schema": {"$ref": "#/definitions/Error"}}
    return {
        "swagger": "2.0",
        "info": {"title": title, "version": "1.0"},
        "schemes": ["http"],
        "consumes": ["application/json"],
        "produces": ["application/json"],
        "paths": {
            "/": {"get": {"summary": "Health probe", "responses": {"200": {"description": "OK"}}}},
            "/score": {
                "post": {
                    "operationId": "RunMLService",
                    "summary": "Run the model: the body is passed to run() as a string",
                    "parameters": [{"name": "body", "in": "body", "required": True, "schema": {}}],
                    "responses": {
                        "200": {"description": "JSON-encoded output of run()", "schema": {}},
                        "400": error,
                        "413": error,
                        "500": error,
                    },
                }
            },
        },
        "definitions": {
            "Error": {
                "type": "object",
                "properties": {"error": {"type": "string"}, "requestId": {"type": "string"}},
            }
        },
    }
