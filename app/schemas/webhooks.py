"""Request and response bodies of webhooks and their delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, StringConstraints

from app.event_log import EventType
from app.orm.webhook import DeliveryState
from app.schemas.common import ApiModel, HttpUrlText, Text

# Checked by the service (a 400 naming an unknown type); the enum is shown in the document.
EventTypeName = Annotated[str, StringConstraints(max_length=64), Field(json_schema_extra={"enum": list(EventType)})]
EVENT_TYPES_DESCRIPTION = (
    "the event types it receives: " + ", ".join(EventType) + "; omitted or null, every type (new ones too: "
    "a receiver must ignore types it does not know)"
)


class WebhookCreate(ApiModel):
    url: Annotated[HttpUrlText, StringConstraints(max_length=2048)] = Field(
        description="where each image and web service state change is POSTed (https outside development)"
    )
    description: Annotated[Text, StringConstraints(max_length=256)] | None = None
    secret: Annotated[Text, StringConstraints(min_length=16, max_length=256)] | None = Field(
        default=None,
        description="the key signing every delivery: whsec_<base64> (Standard Webhooks), or any text "
        "(its UTF-8 bytes are the key); a whsec_ one is made for you when omitted",
    )
    eventTypes: list[EventTypeName] | None = Field(default=None, max_length=16, description=EVENT_TYPES_DESCRIPTION)


class WebhookUpdate(ApiModel):
    active: bool | None = None
    description: Annotated[Text, StringConstraints(max_length=256)] | None = None
    eventTypes: list[EventTypeName] | None = Field(
        default=None,
        max_length=16,
        description="the event types it receives from now on: " + ", ".join(EventType) + "; null, every type; "
        "omitted, unchanged",
    )


class WebhookRead(ApiModel):
    id: str
    url: str = Field(description="whole for Contributors and Owners; a Reader's has its query redacted")
    description: str | None
    active: bool
    eventTypes: list[str] | None = Field(description="the event types it receives; null: every type")
    createdTime: datetime
    createdBy: str | None
    previousSecretExpiresTime: datetime | None = Field(
        default=None, description="after rotateSecret: until when deliveries are signed with the old secret too"
    )


class WebhookCreated(WebhookRead):
    secret: str = Field(
        description="shown only in this response: verify each delivery's webhook-signature with it "
        "(a Standard Webhooks library takes it as it is)"
    )


class DeliveryRead(ApiModel):
    id: str
    eventId: str = Field(description="the event's id, as its body and the event streams give it (opaque)")
    state: DeliveryState
    attempts: int
    responseStatus: int | None
    error: str | None
    durationMs: int | None
    createdTime: datetime
    lastAttemptTime: datetime | None
    nextAttemptTime: datetime | None
    deliveredTime: datetime | None
