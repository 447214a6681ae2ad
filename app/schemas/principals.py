"""Request and response bodies of service principals and the token endpoint."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, StringConstraints

from app.schemas.common import ApiModel, Text


class ServicePrincipalCreate(ApiModel):
    displayName: Annotated[Text, StringConstraints(min_length=1, max_length=128)]
    role: Annotated[Text, StringConstraints(min_length=1, max_length=32)] = Field(
        description="Reader, Contributor or Owner"
    )
    scope: Annotated[Text, StringConstraints(min_length=1, max_length=512)] = Field(
        description="/subscriptions/{id}[/resourceGroups/{name}[/accounts/{name}]]"
    )


class RoleAssignmentRead(ApiModel):
    role: str
    scope: str


class ServicePrincipalRead(ApiModel):
    clientId: str
    displayName: str
    roleAssignments: list[RoleAssignmentRead]
    createdAt: datetime


class ServicePrincipalCreated(ServicePrincipalRead):
    clientSecret: str = Field(description="shown only in this response")
    tokenUrl: str


class TokenResponse(ApiModel):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int
