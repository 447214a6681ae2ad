"""The gateway's ASGI application: ``POST /api/v1/service/{id}/score`` and
``GET /api/v1/service/{id}/swagger.json``, forwarded to a ready replica of the service.

Order matters: the service is looked up, then the key is checked, and only then is the
request's body read and anything sent to a replica. ``Authorization`` is never forwarded
and never logged (nor is any other request header).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.database import make_engine, make_session_factory
from app.gateway.forwarder import BadReply, Forwarder, NoReplyInTime, ReplicaUnreachable, Reply, Unforwardable
from app.gateway.route_table import Route, RouteTable
from app.sealing import Sealer

__all__ = ["Gateway", "gateway_factory"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

log = logging.getLogger("app.gateway")

_PATH = re.compile(r"/api/v1/service/([^/]+)/(score|swagger\.json)")
_METHODS = {"score": "POST", "swagger.json": "GET"}
_TARGETS = {"score": b"/score", "swagger.json": b"/swagger.json"}
# A tenant's bytes, on an origin of their own: never sniffed, never run (SECURITY.md).
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'none'; sandbox"),
]
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
}
# The key stays here; the forwarder writes Host and Content-Length itself.
_NOT_FORWARDED = _HOP_BY_HOP | {b"authorization", b"host", b"content-length", b"expect"}
_NOT_RETURNED = _HOP_BY_HOP | {b"content-length", b"date", b"server"} | {name for name, _ in SECURITY_HEADERS}
_MAX_KEY_CHARS = 256  # keys are 43 characters; longer is not worth a digest
# A request tries at most this many of the service's ready replicas (the next when one does not
# take the connection), all within the service's scoring timeout: however many replicas the
# route lists, one request holds the gateway no longer than a replica that answers would.
MAX_REPLICA_TRIES = 4
_JSON = b"application/json"


class _Refusal(Exception):
    """What the gateway answers itself: ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or []


class _ClientGone(Exception):
    """The caller disconnected before sending its whole request."""


class Gateway:
    """The scoring gateway for one process: its route cache, its connection pool, its sealer."""

    def __init__(self, settings: Settings, *, session_factory: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self._sealer = Sealer(settings.resolved_secret_key())
        self._engine = None
        if session_factory is None:
            self._engine = make_engine(settings, read_only=True)
            session_factory = make_session_factory(self._engine, read_only=True)
        self._routes = RouteTable(session_factory, settings.gateway_cache_seconds)
        self._forwarder = Forwarder(max_response_bytes=settings.gateway_max_response_bytes)
        self._retry_after = str(max(1, round(settings.gateway_cache_seconds))).encode()

    async def aclose(self) -> None:
        """Close the pooled connections and the database's."""
        await self._forwarder.aclose()
        if self._engine is not None:
            self._engine.dispose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._serve(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        facts: dict[str, Any] = {"service": None, "replica": None}
        try:
            reply = await self._handle(scope, receive, facts)
        except _Refusal as refusal:
            reply = Reply(
                refusal.status,
                [(b"content-type", _JSON), *refusal.headers],
                json.dumps({"error": refusal.message}).encode(),
            )
        except _ClientGone:
            log.info("gateway.client_gone", extra={**facts, "durationMs": _since(started)})
            return
        except Exception:  # a bug of ours: still JSON with the safe headers, the details logged
            log.exception("gateway.failed", extra=facts)
            reply = Reply(500, [(b"content-type", _JSON)], b'{"error": "the gateway failed; see its log"}')
        headers = [(name, value) for name, value in reply.headers if name.lower() not in _NOT_RETURNED]
        headers += [(b"content-length", str(len(reply.body)).encode()), *SECURITY_HEADERS]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
        log.info("gateway.request", extra={**facts, "status": reply.status, "durationMs": _since(started)})

    async def _handle(self, scope: Scope, receive: Receive, facts: dict[str, Any]) -> Reply:
        if scope["path"] == "/health" and scope["method"] in ("GET", "HEAD"):  # for supervisors and load balancers
            return Reply(200, [(b"content-type", _JSON)], b'{"status": "ok"}')
        match = _PATH.fullmatch(scope["path"])
        if match is None:
            raise _Refusal(404, "no such route: scoring is at /api/v1/service/<id>/score")
        text, action = match.groups()
        if scope["method"] != _METHODS[action]:
            raise _Refusal(405, f"use {_METHODS[action]} {action}", [(b"allow", _METHODS[action].encode())])
        try:
            service_id = uuid.UUID(text)
        except ValueError:
            raise _Refusal(404, f"no service {text!r}") from None
        facts["service"] = str(service_id)
        try:
            route, turn = await self._routes.route(service_id)
        except Exception:
            log.exception("gateway.route_unreadable", extra=facts)
            raise _Refusal(503, "the gateway cannot read the service now", self._try_later()) from None
        if route is None:
            raise _Refusal(404, f"no service {service_id}")
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if route.auth_enabled:
            self._check_key(headers, route)
        body = await _read_body(receive, headers, self.settings.gateway_max_request_bytes) if action == "score" else b""
        if not route.replicas:
            raise _Refusal(503, f"service {service_id} has no ready replica", self._try_later())
        target = _TARGETS[action] + (b"?" + scope["query_string"] if scope.get("query_string") else b"")
        forwarded = _forwarded_headers(headers)
        deadline = time.monotonic() + route.timeout_seconds
        for address in self._candidates(route, turn)[:MAX_REPLICA_TRIES]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            facts["replica"] = address
            try:
                return await self._forwarder.forward(
                    address,
                    method=scope["method"].encode(),
                    target=target,
                    headers=forwarded,
                    body=body,
                    timeout=left,
                )
            except ReplicaUnreachable as exc:
                log.warning("gateway.replica_unreachable", extra={**facts, "reason": str(exc)})
            except BadReply as exc:
                log.warning("gateway.bad_reply", extra={**facts, "reason": str(exc), "detail": exc.detail})
                raise _Refusal(502, f"the service's reply was refused: {exc}") from None
            except NoReplyInTime:
                raise _Refusal(
                    504, f"the service did not reply within its scoring timeout ({route.timeout_seconds:g} s)"
                ) from None
            except Unforwardable as exc:
                raise _Refusal(400, f"the request cannot be forwarded: {exc}") from None
        facts["replica"] = None
        raise _Refusal(503, f"no replica of service {service_id} takes connections", self._try_later())

    def _check_key(self, headers: list[tuple[bytes, bytes]], route: Route) -> None:
        supplied = next((value for name, value in headers if name == b"authorization"), None)
        if supplied is None:
            raise _Refusal(401, "this service needs a key: Authorization: Bearer <key>", _CHALLENGE)
        scheme, _, key = supplied.strip().partition(b" ")
        key = key.strip()
        if scheme.lower() != b"bearer" or not key or len(key) > _MAX_KEY_CHARS:
            raise _Refusal(401, "send the key as Authorization: Bearer <key>", _CHALLENGE)
        digest = self._sealer.digest(key)
        # Both compared, always: how long a refusal takes says nothing of which key was close.
        primary = hmac.compare_digest(digest, route.key_digests[0])
        secondary = hmac.compare_digest(digest, route.key_digests[1])
        if not (primary | secondary):
            raise _Refusal(401, "the key is not one of this service's keys", _CHALLENGE)

    def _candidates(self, route: Route, turn: int) -> list[str]:
        """The ready replicas, starting at this request's turn; those that lately refused a
        connection last."""
        count = len(route.replicas)
        ordered = [route.replicas[(turn + offset) % count] for offset in range(count)]
        return sorted(ordered, key=self._forwarder.is_down)

    def _try_later(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", self._retry_after)]


_CHALLENGE = [(b"www-authenticate", b"Bearer")]


def _forwarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named = {token.strip().lower() for name, value in headers if name == b"connection" for token in value.split(b",")}
    return [(name, value) for name, value in headers if name not in _NOT_FORWARDED and name not in named]


async def _read_body(receive: Receive, headers: list[tuple[bytes, bytes]], limit: int) -> bytes:
    declared = next((value for name, value in headers if name == b"content-length"), b"0")
    if declared.isdigit() and int(declared) > limit:
        raise _Refusal(413, f"the request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Refusal(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)


def gateway_factory() -> Gateway:
    """The gateway of the process's settings (`mms gateway` serves it with uvicorn)."""
    return Gateway(get_settings())
