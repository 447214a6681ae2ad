"""Webhooks as the API sees them: register, list, pause, choose event types, delete, and read
the delivery log.

Deliveries are queued with each event (``app.event_log``), for the webhooks that take its
type (``eventTypes``; none given: every type), and sent by the workers
(``workers.webhooks``), under the same SSRF rules as model downloads, signed the Standard
Webhooks way (https://www.standardwebhooks.com).

A secret is text, stored sealed as given. The service makes ``whsec_<base64 of 32 random
bytes>`` secrets, the form Standard Webhooks libraries take; whose key is the decoded bytes.
A secret in any other form (a tenant's own, or one from before) keys the HMAC with its UTF-8
bytes, so ``standardwebhooks.Webhook(secret.encode())`` verifies it. The deprecated
``X-MMS-Signature`` is keyed with the secret's text, as it always was.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import BadRequest
from app.event_log import EventType
from app.orm import DeliveryState, Webhook, WebhookDelivery
from app.orm.base import utcnow
from app.schemas.webhooks import WebhookCreate, WebhookUpdate
from app.sealing import Sealer
from app.services.accounts import AccountRef
from app.services.event_ids import EventIds
from app.services.lookup import get_in_account
from app.services.paging import decode_token, encode_token, invalid_skip_token, page_size

log = logging.getLogger("mms.webhooks")

MAX_WEBHOOKS_PER_ACCOUNT = 20
SECRET_PREFIX = "whsec_"  # Standard Webhooks' form: the prefix, then the key in base64
SECRET_KEY_BYTES = (24, 64)  # the spec's bounds on a key's length


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _standard_key(secret: str) -> bytes | None:
    """A ``whsec_`` secret's key, or None when the secret is not of that form."""
    if not secret.startswith(SECRET_PREFIX):
        return None
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        return None


def signing_key(secret: str) -> bytes:
    """The HMAC key of a secret: a ``whsec_`` secret's decoded bytes, any other's UTF-8 bytes
    (a secret from before this format that merely starts with ``whsec_`` included)."""
    key = _standard_key(secret)
    return secret.encode() if key is None else key


def _check_secret(secret: str) -> None:
    if not secret.startswith(SECRET_PREFIX):
        return
    key = _standard_key(secret)
    low, high = SECRET_KEY_BYTES
    if key is None or not low <= len(key) <= high:
        raise BadRequest(
            f"a whsec_ secret is {low} to {high} bytes in standard base64 after the prefix",
            code="InvalidWebhookSecret",
        )


def _event_types(given: list[str] | None) -> list[str] | None:
    """The event types a webhook takes, checked (None: every type); 400 naming an unknown one."""
    if given is None:
        return None
    known = set(EventType)
    for name in given:
        if name not in known:
            raise BadRequest(
                f"eventTypes: {name[:64]!r} is not an event type; the types are {', '.join(EventType)}",
                code="InvalidEventType",
            )
    if not given:
        raise BadRequest(
            "eventTypes: give at least one event type, or null (or nothing) for every type", code="InvalidEventType"
        )
    return list(dict.fromkeys(given))


def create_webhook(
    session: Session,
    account: AccountRef,
    body: WebhookCreate,
    *,
    sealer: Sealer,
    require_https: bool,
    created_by: str | None,
) -> tuple[Webhook, str]:
    """Register a URL for the account's events (of ``body.eventTypes``, or every type);
    returns it with its signing secret."""
    parts = urlsplit(body.url)
    if require_https and parts.scheme != "https":
        raise BadRequest("a webhook URL must be https:// on this service", code="InvalidWebhookUrl")
    if parts.username or parts.password:
        raise BadRequest(
            "a webhook URL must not carry credentials; verify the signature instead", code="InvalidWebhookUrl"
        )
    count = session.scalar(select(func.count()).select_from(Webhook).where(Webhook.account_id == account.id))
    if count >= MAX_WEBHOOKS_PER_ACCOUNT:
        raise BadRequest(
            f"an account has at most {MAX_WEBHOOKS_PER_ACCOUNT} webhooks; delete one first", code="TooManyWebhooks"
        )
    event_types = _event_types(body.eventTypes)
    if body.secret:
        _check_secret(body.secret)
    secret = body.secret or new_secret()
    webhook = Webhook(
        account_id=account.id,
        url=body.url,
        description=body.description,
        event_types=event_types,
        sealed_secret=sealer.seal(secret.encode()),
        created_by=created_by,
    )
    session.add(webhook)
    session.flush()
    return webhook, secret


def shown_url(url: str, *, full: bool) -> str:
    """The webhook URL as a caller may see it: whole, or with its query and fragment (where
    receivers' tokens usually are) replaced by ``redacted``."""
    if full:
        return url
    parts = urlsplit(url)
    return urlunsplit(
        parts._replace(query="redacted" if parts.query else "", fragment="redacted" if parts.fragment else "")
    )


def get_webhook(session: Session, account: AccountRef, *, webhook_id: str) -> Webhook:
    """One webhook of the account, or 404."""
    return get_in_account(session, Webhook, account, webhook_id, kind="webhook")


def list_webhooks(session: Session, account: AccountRef) -> list[Webhook]:
    """The account's webhooks, oldest first."""
    return list(
        session.scalars(
            select(Webhook).where(Webhook.account_id == account.id).order_by(Webhook.created_at, Webhook.id)
        )
    )


def update_webhook(session: Session, account: AccountRef, *, webhook_id: str, body: WebhookUpdate) -> Webhook:
    """Pause or resume a webhook, change its description or the event types it takes (an
    explicit null: every type)."""
    webhook = get_webhook(session, account, webhook_id=webhook_id)
    if "eventTypes" in body.model_fields_set:
        webhook.event_types = _event_types(body.eventTypes)
    if body.active is not None:
        webhook.active = body.active
    if body.description is not None:
        webhook.description = body.description
    session.flush()
    return webhook


def rotate_secret(
    session: Session, account: AccountRef, *, webhook_id: str, sealer: Sealer, overlap_seconds: int
) -> tuple[Webhook, str]:
    """Give the webhook a new secret and return it (shown only here); the one it replaces keeps
    signing deliveries beside it for ``overlap_seconds``. Rotating again within the overlap
    ends the older secret's overlap at once: only the secret just replaced stays."""
    webhook = get_webhook(session, account, webhook_id=webhook_id)
    secret = new_secret()
    if overlap_seconds > 0:
        webhook.sealed_previous_secret = webhook.sealed_secret
        webhook.previous_secret_expires_at = utcnow() + timedelta(seconds=overlap_seconds)
    else:
        webhook.sealed_previous_secret = webhook.previous_secret_expires_at = None
    webhook.sealed_secret = sealer.seal(secret.encode())
    session.flush()
    log.info(
        "webhook.secret_rotated",
        extra={"webhook": str(webhook.id), "overlapSeconds": overlap_seconds},
    )
    return webhook, secret


def delete_webhook(session: Session, account: AccountRef, *, webhook_id: str) -> None:
    """Forget a webhook and its delivery log; deliveries not yet sent are dropped."""
    session.delete(get_webhook(session, account, webhook_id=webhook_id))
    session.flush()


def list_deliveries(
    session: Session,
    account: AccountRef,
    *,
    webhook_id: str,
    state: str | None,
    count: int | None,
    skip_token: str | None,
    event_ids: EventIds,
) -> tuple[list[WebhookDelivery], str | None]:
    """A page of the webhook's delivery log, newest event first (its ``$skipToken`` names an
    event by its token, as clients see it, never by its id)."""
    webhook = get_webhook(session, account, webhook_id=webhook_id)
    limit = page_size(count)
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook.id)
    if state is not None:
        if state not in {s.value for s in DeliveryState}:
            raise BadRequest("state must be Pending, Delivered or Failed", code="InvalidState")
        query = query.where(WebhookDelivery.state == state)
    position = decode_token(skip_token, fields={"e": str})
    if position is not None:
        after = event_ids.event_id(position["e"])
        if after is None:
            raise invalid_skip_token()
        query = query.where(WebhookDelivery.event_id < after)
    rows = list(session.scalars(query.order_by(WebhookDelivery.event_id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], encode_token({"e": event_ids.token(rows[limit - 1].event_id)})
