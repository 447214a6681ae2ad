"""Webhooks as the API sees them: register, list, pause, delete, and read the delivery log.

Deliveries are queued with each event (``app.services.events``) and sent by the workers
(``workers.webhooks``), under the same SSRF rules as model downloads.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import BadRequest
from app.orm import Account, DeliveryState, Webhook, WebhookDelivery
from app.schemas.webhooks import WebhookCreate, WebhookUpdate
from app.sealing import Sealer
from app.services.lookup import get_in_account
from app.services.paging import decode_token, encode_token, page_size

MAX_WEBHOOKS_PER_ACCOUNT = 20


def create_webhook(
    session: Session,
    account: Account,
    body: WebhookCreate,
    *,
    sealer: Sealer,
    require_https: bool,
    created_by: str | None,
) -> tuple[Webhook, str]:
    """Register a URL for the account's image events; returns it with its signing secret."""
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
    secret = body.secret or secrets.token_urlsafe(32)
    webhook = Webhook(
        account_id=account.id,
        url=body.url,
        description=body.description,
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


def get_webhook(session: Session, account: Account, *, webhook_id: str) -> Webhook:
    """One webhook of the account, or 404."""
    return get_in_account(session, Webhook, account, webhook_id, kind="webhook")


def list_webhooks(session: Session, account: Account) -> list[Webhook]:
    """The account's webhooks, oldest first."""
    return list(
        session.scalars(
            select(Webhook).where(Webhook.account_id == account.id).order_by(Webhook.created_at, Webhook.id)
        )
    )


def update_webhook(session: Session, account: Account, *, webhook_id: str, body: WebhookUpdate) -> Webhook:
    """Pause or resume a webhook, or change its description."""
    webhook = get_webhook(session, account, webhook_id=webhook_id)
    if body.active is not None:
        webhook.active = body.active
    if body.description is not None:
        webhook.description = body.description
    session.flush()
    return webhook


def delete_webhook(session: Session, account: Account, *, webhook_id: str) -> None:
    """Forget a webhook and its delivery log; deliveries not yet sent are dropped."""
    session.delete(get_webhook(session, account, webhook_id=webhook_id))
    session.flush()


def list_deliveries(
    session: Session, account: Account, *, webhook_id: str, state: str | None, count: int | None, skip_token: str | None
) -> tuple[list[WebhookDelivery], str | None]:
    """A page of the webhook's delivery log, newest event first."""
    webhook = get_webhook(session, account, webhook_id=webhook_id)
    limit = page_size(count)
    query = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook.id)
    if state is not None:
        if state not in {s.value for s in DeliveryState}:
            raise BadRequest("state must be Pending, Delivered or Failed", code="InvalidState")
        query = query.where(WebhookDelivery.state == state)
    position = decode_token(skip_token, fields={"e": int})
    if position is not None:
        query = query.where(WebhookDelivery.event_id < position["e"])
    rows = list(session.scalars(query.order_by(WebhookDelivery.event_id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], encode_token({"e": rows[limit - 1].event_id})
