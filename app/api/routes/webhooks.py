"""Webhooks: URLs that receive the account's image and web service state changes (all, or the
event types chosen), signed, with a delivery log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, status
from sqlalchemy.orm import Session

from app.api import examples
from app.api.deps import CallerDep, ContextDep, ReadableAccount, ReadsDep, SessionDep, WebhookId, WritableAccount
from app.api.links import next_link
from app.api.routing import ApiRoute
from app.auth.caller import Caller
from app.auth.roles import Permission, account_scope
from app.orm import DeliveryState, Webhook, WebhookDelivery
from app.schemas.common import Page
from app.schemas.webhooks import DeliveryRead, WebhookCreate, WebhookCreated, WebhookRead, WebhookUpdate
from app.services import webhooks
from app.services.accounts import AccountRef
from app.services.event_ids import EventIds

PREFIX = "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
router = APIRouter(prefix=PREFIX, tags=["webhooks"], route_class=ApiRoute)


def to_read(webhook: Webhook, *, full_url: bool = True) -> WebhookRead:
    return WebhookRead(
        id=str(webhook.id),
        url=webhooks.shown_url(webhook.url, full=full_url),
        description=webhook.description,
        active=webhook.active,
        eventTypes=webhook.event_types,
        createdTime=webhook.created_at,
        createdBy=webhook.created_by,
        previousSecretExpiresTime=webhook.previous_secret_expires_at,
    )


def _sees_full_urls(caller: Caller, account: AccountRef) -> bool:
    # A URL's query often holds the receiver's token: whole only for those who may change webhooks.
    return caller.can(Permission.WRITE, account_scope(account.subscription_id, account.resource_group, account.name))


def to_delivery(delivery: WebhookDelivery, event_ids: EventIds) -> DeliveryRead:
    pending = delivery.state == DeliveryState.PENDING.value
    return DeliveryRead(
        id=str(delivery.id),
        eventId=event_ids.token(delivery.event_id),  # the id its event has in streams and bodies
        state=delivery.state,
        attempts=delivery.attempts,
        responseStatus=delivery.last_status,
        error=delivery.last_error,
        durationMs=delivery.last_duration_ms,
        createdTime=delivery.created_at,
        lastAttemptTime=delivery.last_attempt_at,
        nextAttemptTime=delivery.next_attempt_at if pending else None,
        deliveredTime=delivery.delivered_at,
    )


@router.post("/webhooks", response_model=WebhookCreated, status_code=status.HTTP_201_CREATED)
def create_webhook(
    body: Annotated[WebhookCreate, Body(openapi_examples=examples.WEBHOOK)],
    account: WritableAccount,
    caller: CallerDep,
    context: ContextDep,
    session: SessionDep,
) -> WebhookCreated:
    """Register a URL for every image and web service state change (or those of eventTypes);
    the signing secret is shown only here."""
    webhook, secret = webhooks.create_webhook(
        session,
        account,
        body,
        sealer=context.sealer,
        require_https=context.settings.requires_https_urls,
        created_by=caller.subject,
    )
    return WebhookCreated(**to_read(webhook).model_dump(), secret=secret)


@router.get("/webhooks", response_model=Page[WebhookRead])
async def list_webhooks(account: ReadableAccount, caller: CallerDep, reads: ReadsDep) -> Page[WebhookRead]:
    """The account's webhooks; a Reader sees each URL with its query redacted."""

    def read(session: Session) -> Page[WebhookRead]:
        full = _sees_full_urls(caller, account)
        return Page(value=[to_read(w, full_url=full) for w in webhooks.list_webhooks(session, account)])

    return await reads.run(read, many=True)


@router.get("/webhooks/{webhookId}", response_model=WebhookRead)
async def get_webhook(
    webhook_id: WebhookId, account: ReadableAccount, caller: CallerDep, reads: ReadsDep
) -> WebhookRead:
    """One webhook; a Reader sees its URL with the query redacted."""

    def read(session: Session) -> WebhookRead:
        return to_read(
            webhooks.get_webhook(session, account, webhook_id=webhook_id), full_url=_sees_full_urls(caller, account)
        )

    return await reads.run(read)


@router.patch("/webhooks/{webhookId}", response_model=WebhookRead)
def update_webhook(
    webhook_id: WebhookId,
    body: Annotated[WebhookUpdate, Body(openapi_examples=examples.WEBHOOK_UPDATE)],
    account: WritableAccount,
    session: SessionDep,
) -> WebhookRead:
    """Pause (``active: false``) or resume a webhook (a paused one is sent nothing new), or
    change its description or eventTypes (from the next event on)."""
    return to_read(webhooks.update_webhook(session, account, webhook_id=webhook_id, body=body))


@router.post("/webhooks/{webhookId}/rotateSecret", response_model=WebhookCreated)
def rotate_webhook_secret(
    webhook_id: WebhookId, account: WritableAccount, context: ContextDep, session: SessionDep
) -> WebhookCreated:
    """A new signing secret, shown only here; deliveries carry a signature with the old one too
    for MMS_WEBHOOK_SECRET_OVERLAP_SECONDS (a day by default), so receivers can switch."""
    webhook, secret = webhooks.rotate_secret(
        session,
        account,
        webhook_id=webhook_id,
        sealer=context.sealer,
        overlap_seconds=context.settings.webhook_secret_overlap_seconds,
    )
    return WebhookCreated(**to_read(webhook).model_dump(), secret=secret)


@router.delete("/webhooks/{webhookId}", status_code=status.HTTP_204_NO_CONTENT)
def delete_webhook(webhook_id: WebhookId, account: WritableAccount, session: SessionDep) -> None:
    webhooks.delete_webhook(session, account, webhook_id=webhook_id)


@router.get("/webhooks/{webhookId}/deliveries", response_model=Page[DeliveryRead])
async def list_deliveries(
    webhook_id: WebhookId,
    request: Request,
    account: ReadableAccount,
    reads: ReadsDep,
    context: ContextDep,
    state: Annotated[str | None, Query(json_schema_extra={"enum": [s.value for s in DeliveryState]})] = None,
    count: int | None = None,
    skip_token: Annotated[str | None, Query(alias="$skipToken")] = None,
) -> Page[DeliveryRead]:
    """The delivery log, newest event first: each delivery's state, attempts and last answer."""

    def read(session: Session) -> Page[DeliveryRead]:
        rows, token = webhooks.list_deliveries(
            session,
            account,
            webhook_id=webhook_id,
            state=state,
            count=count,
            skip_token=skip_token,
            event_ids=context.event_ids,
        )
        return Page(value=[to_delivery(d, context.event_ids) for d in rows], nextLink=next_link(request, token))

    return await reads.run(read, many=True)
