"""Service principals, the analogue of `az ad sp create-for-rbac`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, status
from sqlalchemy.orm import Session

from app.api import examples
from app.api.deps import CallerDep, ClientId, ContextDep, ReadsDep, SessionDep
from app.api.links import next_link
from app.api.openapi import errors
from app.api.routing import ApiRoute
from app.orm import ServicePrincipal
from app.schemas.common import Page
from app.schemas.principals import (
    RoleAssignmentRead,
    ServicePrincipalCreate,
    ServicePrincipalCreated,
    ServicePrincipalRead,
)
from app.services import principals

router = APIRouter(prefix="/servicePrincipals", tags=["service principals"], route_class=ApiRoute)


def to_read(principal: ServicePrincipal) -> ServicePrincipalRead:
    return ServicePrincipalRead(
        clientId=principal.client_id,
        displayName=principal.display_name,
        roleAssignments=[RoleAssignmentRead(role=a.role, scope=a.scope) for a in principal.assignments],
        createdAt=principal.created_at,
    )


@router.post("", response_model=ServicePrincipalCreated, status_code=status.HTTP_201_CREATED, responses=errors(403))
def create_service_principal(
    body: Annotated[ServicePrincipalCreate, Body(openapi_examples=examples.SERVICE_PRINCIPAL)],
    caller: CallerDep,
    context: ContextDep,
    session: SessionDep,
) -> ServicePrincipalCreated:
    """Create a principal with a role on a scope the caller owns; the secret is shown only here."""
    principal, secret = principals.create_principal_as(
        session,
        caller,
        issuer=context.settings.issuer,
        display_name=body.displayName,
        role=body.role,
        scope=body.scope,
    )
    return ServicePrincipalCreated(
        **to_read(principal).model_dump(),
        clientSecret=secret,
        tokenUrl=f"{context.settings.resolved_public_url}/oauth2/token",
    )


@router.get("", response_model=Page[ServicePrincipalRead])
async def list_service_principals(
    request: Request,
    caller: CallerDep,
    reads: ReadsDep,
    count: int | None = None,
    skip_token: Annotated[str | None, Query(alias="$skipToken")] = None,
) -> Page[ServicePrincipalRead]:
    """The principals on scopes the caller owns, oldest first; page with ``$skipToken``."""

    def read(session: Session) -> Page[ServicePrincipalRead]:
        rows, token = principals.list_principals_as(session, caller, count=count, skip_token=skip_token)
        return Page(value=[to_read(p) for p in rows], nextLink=next_link(request, token))

    return await reads.run(read, many=True)


@router.get("/{clientId}", response_model=ServicePrincipalRead)
async def get_service_principal(client_id: ClientId, caller: CallerDep, reads: ReadsDep) -> ServicePrincipalRead:
    def read(session: Session) -> ServicePrincipalRead:
        return to_read(principals.get_principal_as(session, caller, client_id=client_id))

    return await reads.run(read)


@router.delete("/{clientId}", status_code=status.HTTP_204_NO_CONTENT)
def delete_service_principal(client_id: ClientId, caller: CallerDep, session: SessionDep) -> None:
    """Delete a principal; its tokens lose their roles within MMS_AUTH_CACHE_SECONDS, its event streams end."""
    principals.delete_principal_as(session, caller, client_id=client_id)
