"""Sending webhook deliveries: due ones are claimed, signed, POSTed under the fetcher's
address rules, and retried with exponential backoff until they succeed or run out of tries.

Each delivery is signed the Standard Webhooks way (``webhook-id``, ``webhook-timestamp``,
``webhook-signature: v1,<base64>``), with the webhook's previous secret as well while a
rotation's overlap lasts; the ``X-MMS-*`` headers of before still come along (deprecated).

Every worker runs a ``WebhookDispatcher`` thread beside its builds, so a long build never
holds deliveries back. Workers share the outbox table: a delivery is claimed by moving its
``next_attempt_at`` past the send timeout with a conditional UPDATE, so exactly one worker
sends it, and one that dies mid-send leaves it to be retried.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook as StandardWebhook

from app.context import ServiceContext
from app.database import session_scope
from app.orm import DeliveryState, Event, Webhook, WebhookDelivery
from app.orm.base import utcnow
from app.services.events import render
from app.services.webhooks import signing_key
from workers.fetch_policy import fetch_policy
from workers.fetcher import FetchError, FetchPolicy, post

log = logging.getLogger("mms.webhooks")

PENDING = DeliveryState.PENDING.value
# The receiver's fault or ours, not the network's: retrying cannot help.
PERMANENT = frozenset({"blocked_address", "bad_url", "bad_scheme", "tls_config"})
MAX_BACKOFF_SECONDS = 3600.0


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 over ``<timestamp>.<body>`` (what X-MMS-Signature holds)."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def standard_signature(secrets: list[str], message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>`` for each secret, space-separated: HMAC-SHA256 over ``<id>.<timestamp>.<body>``
    (what webhook-signature holds)."""
    sent_at = datetime.fromtimestamp(timestamp, UTC)
    return " ".join(StandardWebhook(signing_key(secret)).sign(message_id, sent_at, body.decode()) for secret in secrets)


def backoff_seconds(attempts: int, base: float) -> float:
    """The wait after the ``attempts``-th failure: base, 2×base, 4×base … at most an hour, ±10 %."""
    return min(base * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS) * random.uniform(0.9, 1.1)


def _claim(session: Session, delivery_id: uuid.UUID, seen: datetime, until: datetime) -> int | None:
    """Take one due delivery for this worker; its attempt number, or None if another took it."""
    return session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.state == PENDING, WebhookDelivery.next_attempt_at == seen
        )
        .values(next_attempt_at=until, attempts=WebhookDelivery.attempts + 1, last_attempt_at=utcnow())
        .returning(WebhookDelivery.attempts)
    ).scalar()


def deliver_due(context: ServiceContext, *, limit: int = 20) -> int:
    """Send up to ``limit`` deliveries that are due; returns how many were attempted."""
    settings = context.settings
    policy = fetch_policy(settings)
    policy = FetchPolicy(
        max_bytes=policy.max_bytes,
        connect_timeout=settings.webhook_timeout_seconds,
        read_timeout=settings.webhook_timeout_seconds,
        deadline=settings.webhook_timeout_seconds,
        allow_hosts=policy.allow_hosts,
        ca_bundle=policy.ca_bundle,
    )
    now = utcnow()
    with session_scope(context.session_factory) as session:
        due = session.execute(
            select(WebhookDelivery.id, WebhookDelivery.next_attempt_at)
            .where(WebhookDelivery.state == PENDING, WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).all()
    attempted = 0
    for delivery_id, seen in due:
        # Held for longer than a send can take, so nobody else sends it meanwhile.
        until = utcnow() + timedelta(seconds=settings.webhook_timeout_seconds * 3 + 30)
        with session_scope(context.session_factory) as session:
            attempt = _claim(session, delivery_id, seen, until)
            if attempt is None:
                continue
            row = session.execute(
                select(
                    Webhook.url,
                    Webhook.sealed_secret,
                    Webhook.sealed_previous_secret,
                    Webhook.previous_secret_expires_at,
                    Webhook.active,
                    Event.id,
                    Event.payload,
                )
                .select_from(WebhookDelivery)
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .join(Event, Event.id == WebhookDelivery.event_id)
                .where(WebhookDelivery.id == delivery_id)
            ).one()
        attempted += 1
        _send(context, delivery_id, attempt, row, policy)
    return attempted


def _send(context: ServiceContext, delivery_id: uuid.UUID, attempt: int, row, policy: FetchPolicy) -> None:  # type: ignore[no-untyped-def]
    settings = context.settings
    event_id = context.event_ids.token(row.id)  # what the streams call this event
    body = render(event_id, row.payload).encode()
    sent_at = int(time.time())
    secrets = [context.sealer.unseal(row.sealed_secret).decode()]
    if row.sealed_previous_secret and row.previous_secret_expires_at and row.previous_secret_expires_at > utcnow():
        secrets.append(context.sealer.unseal(row.sealed_previous_secret).decode())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "mms-webhooks/1",
        # One id per event and webhook, the same on every retry: receivers drop repeats by it.
        "webhook-id": str(delivery_id),
        "webhook-timestamp": str(sent_at),
        "webhook-signature": standard_signature(secrets, str(delivery_id), sent_at, body),
        # Deprecated: the service's own headers of before, kept for one release.
        "X-MMS-Event": json.loads(row.payload)["type"],  # ImageStateChanged, ServiceDeleted...
        "X-MMS-Event-Id": event_id,
        "X-MMS-Delivery": str(delivery_id),
        "X-MMS-Timestamp": str(sent_at),
        "X-MMS-Signature": signature(secrets[0].encode(), str(sent_at), body),
    }
    started = time.monotonic()
    status, error, permanent = None, None, False
    if not row.active:
        error, permanent = "the webhook was paused", True
    else:
        try:
            status = post(row.url, body, headers, policy=policy)
            if not 200 <= status < 300:
                error = f"the receiver answered HTTP {status}"
        except FetchError as exc:
            error, permanent = str(exc), exc.reason in PERMANENT
    duration_ms = round((time.monotonic() - started) * 1000)
    now = utcnow()
    values: dict[str, object] = {
        "last_status": status,
        "last_error": error and error[:512],
        "last_duration_ms": duration_ms,
    }
    if error is None:
        values |= {"state": DeliveryState.DELIVERED.value, "delivered_at": now}
    elif permanent or attempt >= settings.webhook_max_attempts:
        values |= {"state": DeliveryState.FAILED.value}
    else:
        values |= {
            "next_attempt_at": now + timedelta(seconds=backoff_seconds(attempt, settings.webhook_retry_base_seconds))
        }
    with session_scope(context.session_factory) as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempt)
            .values(**values)
        )
    log.info(
        "webhook.attempt",
        extra={
            "delivery": str(delivery_id),
            "eventId": event_id,
            "attempt": attempt,
            "status": status,
            "outcome": values.get("state", "Retry"),
            "durationMs": duration_ms,
            "error": error,
        },
    )


class WebhookDispatcher(threading.Thread):
    """Sends due deliveries every ``interval`` seconds until stopped."""

    def __init__(self, context: ServiceContext, interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="webhook-dispatcher")
        self._context, self._interval = context, interval
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                busy = deliver_due(self._context) > 0
            except Exception:  # a database blip: try again at the next tick
                log.warning("webhook.dispatch_failed", exc_info=True)
                busy = False
            if not busy:
                self._stopped.wait(self._interval)

    def stop(self, timeout: float = 15.0) -> None:
        self._stopped.set()
        self.join(timeout)
