"""Request and response bodies of Model Management accounts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, StringConstraints

from app.schemas.common import ApiModel, Text

ACCOUNT_TYPE = "Microsoft.MachineLearningModelManagement/accounts"


class Sku(ApiModel):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,16}$")] = Field(
        description="the pricing tier, e.g. S1"
    )
    capacity: int = Field(default=1, ge=1, le=100, description="number of instances")


class AccountCreate(ApiModel):
    location: Annotated[Text, StringConstraints(min_length=1, max_length=64)]
    sku: Sku


class AccountProperties(ApiModel):
    accountId: str
    subscriptionId: str
    resourceGroup: str
    createdOn: datetime


class AccountRead(ApiModel):
    id: str
    name: str
    type: str = ACCOUNT_TYPE
    location: str
    sku: Sku
    properties: AccountProperties
