"""Cheap polling of one image: its ETag is its newest event's id, and a poll that already has
it is answered 304 before any route, dependency, thread or database is involved.

An image's representation changes only when an event records it (state changes, and its
deletion), so ``"v<event id's token>-<base URL digest>"`` names the representation exactly
(the token, not the id: an ETag must not move with other accounts' events). The
first GET reads the version from the table; this process's event poller keeps it current
from then on. The shortcut answers only when everything it needs is at hand: the poller is
current, the caller's token verifies, its roles are cached and allow reading the account,
and the tag matches. Anything else goes the normal way, which gives the full answer, or the
401, 403 or 404. A change made through another API process is seen here within one poll
interval (``MMS_EVENTS_POLL_SECONDS``).
"""

from __future__ import annotations

import hashlib
import re
import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.event_stream import EventHub
from app.api.middleware import etag_matches
from app.auth.caller import caller_for
from app.auth.roles import Permission, account_scope
from app.builds.states import DELETED_STATE, is_unfinished
from app.errors import ServiceError
from app.services.event_ids import EventIds

_IMAGE_PATH = re.compile(
    r"/api/subscriptions/([^/]+)/resourceGroups/([^/]+)/accounts/([^/]+)/images/([0-9a-fA-F-]{36})"
)
_PLAIN_QUERIES = (b"", b"api-version=2017-09-01-preview")
RETRY_AFTER_SECONDS = 2  # how long a poller of an unfinished build is asked to wait


def image_etag(event_ids: EventIds, version: int, base_url: str) -> str:
    """The image's ETag: its version (its newest event's token), and the base URL its links
    were made with."""
    return f'"v{event_ids.token(version)}-{hashlib.sha256(base_url.encode()).hexdigest()[:12]}"'


def not_modified_headers(etag: str, state: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"etag", etag.encode()), (b"cache-control", b"no-cache")]
    if is_unfinished(state):
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    return headers


class ImagePollShortcut:
    """Answers ``GET .../images/{id}`` with ``If-None-Match`` from memory when it safely can."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["query_string"] in _PLAIN_QUERIES:
            match = _IMAGE_PATH.fullmatch(scope["path"])
            headers = None if match is None else self._shortcut(scope, match)
            if headers is not None:
                await send({"type": "http.response.start", "status": 304, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)

    def _shortcut(self, scope: Scope, match: re.Match[str]) -> list[tuple[bytes, bytes]] | None:
        """The 304's headers, or None to let the route answer."""
        request = Request(scope)
        if_none_match = request.headers.get("if-none-match")
        authorization = request.headers.get("authorization", "")
        hub: EventHub = scope["app"].state.event_hub
        if not if_none_match or not authorization.startswith("Bearer ") or not hub.is_current:
            return None
        subscription, group, account, image_id = match.groups()
        known = hub.versions.get(uuid.UUID(image_id))
        if (
            known is None
            or known.state == DELETED_STATE
            or hub.versions.account((subscription, group, account)) != known.account_id
        ):
            return None
        context = scope["app"].state.context
        etag = image_etag(context.event_ids, known.version, str(request.base_url))
        if not etag_matches(if_none_match, etag):
            return None
        try:
            token = context.verifier.verify(authorization.removeprefix("Bearer ").strip(), keys_at_hand=True)
        except ServiceError:
            return None
        grants = context.grants_cache.get(token.issuer, token.subject)
        if grants is None or not caller_for(token, grants).can(
            Permission.READ, account_scope(subscription, group, account)
        ):
            return None
        return not_modified_headers(etag, known.state)
