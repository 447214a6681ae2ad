"""Model Management accounts, addressed as ARM resources."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response, status
from sqlalchemy.orm import Session

from app.api import examples
from app.api.deps import AccountPathDep, CallerDep, ContextDep, ReadsDep, ResourceGroup, SessionDep, SubscriptionId
from app.api.links import next_link
from app.api.openapi import errors
from app.api.routing import ApiRoute
from app.auth.roles import Permission, account_scope
from app.orm import Account
from app.queue import after_commit
from app.schemas.accounts import AccountCreate, AccountProperties, AccountRead, Sku
from app.schemas.common import Page
from app.services import accounts

router = APIRouter(
    prefix="/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts",
    tags=["accounts"],
    route_class=ApiRoute,
)


def to_read(account: Account) -> AccountRead:
    return AccountRead(
        id=account.scope,
        name=account.name,
        location=account.location,
        sku=Sku(name=account.sku_name, capacity=account.sku_capacity),
        properties=AccountProperties(
            accountId=str(account.id),
            subscriptionId=account.subscription_id,
            resourceGroup=account.resource_group,
            createdOn=account.created_at,
        ),
    )


@router.put(
    "/{accountName}",
    response_model=AccountRead,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": AccountRead, "description": "The account existed: its SKU is updated."}}
    | errors(403, 409, s409="The account is in another location, which cannot change."),
)
def put_account(
    path: AccountPathDep,
    body: Annotated[AccountCreate, Body(openapi_examples=examples.ACCOUNT)],
    caller: CallerDep,
    session: SessionDep,
    response: Response,
) -> AccountRead:
    """Create an account (201), or update its SKU (200); a Contributor of the scope may, as in Azure."""
    caller.require(Permission.WRITE, account_scope(path.subscription_id, path.resource_group, path.name))
    account, created = accounts.put_account(session, path, body)
    if not created:
        response.status_code = status.HTTP_200_OK
    return to_read(account)


@router.get("/{accountName}", response_model=AccountRead, responses=errors(403))
async def get_account(path: AccountPathDep, caller: CallerDep, reads: ReadsDep) -> AccountRead:
    caller.require(Permission.READ, account_scope(path.subscription_id, path.resource_group, path.name))
    return await reads.run(lambda session: to_read(accounts.get_account(session, path)))


@router.get("", response_model=Page[AccountRead], responses=errors(403))
async def list_accounts(
    request: Request,
    subscription_id: SubscriptionId,
    resource_group: ResourceGroup,
    caller: CallerDep,
    reads: ReadsDep,
    count: int | None = None,
    skip_token: Annotated[str | None, Query(alias="$skipToken")] = None,
) -> Page[AccountRead]:
    """The accounts of a resource group, by name."""
    caller.require(Permission.READ, account_scope(subscription_id, resource_group))

    def read(session: Session) -> Page[AccountRead]:
        rows, token = accounts.list_accounts(
            session,
            subscription_id=subscription_id,
            resource_group=resource_group,
            count=count,
            skip_token=skip_token,
        )
        return Page(value=[to_read(a) for a in rows], nextLink=next_link(request, token))

    return await reads.run(read, many=True)


@router.delete(
    "/{accountName}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(403, 409, s409="The account holds models, manifests or images (and force is not set)."),
)
def delete_account(
    path: AccountPathDep, caller: CallerDep, session: SessionDep, context: ContextDep, force: bool = False
) -> None:
    """Delete an account; refused with 409 while it holds models, unless ``force=true``."""
    caller.require(Permission.WRITE, account_scope(path.subscription_id, path.resource_group, path.name))
    accounts.delete_account(session, path, force=force)
    context.known_accounts.forget(path)
    # And once it commits: a request that looked it up meanwhile (before the commit) found it.
    after_commit(session, lambda: context.known_accounts.forget(path))


# Discovery: what a signed-in principal may use, without naming a resource group.
discovery = APIRouter(prefix="/accounts", tags=["accounts"], route_class=ApiRoute)


@discovery.get("", response_model=Page[AccountRead])
def list_readable_accounts(
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    count: int | None = None,
    skip_token: Annotated[str | None, Query(alias="$skipToken")] = None,
) -> Page[AccountRead]:
    """Every account the caller may read, across all its role scopes, by subscription, resource group and name."""
    scopes = {grant.scope for grant in caller.grants if Permission.READ in grant.role.permissions}
    rows, token = accounts.list_accounts_under(session, scopes=scopes, count=count, skip_token=skip_token)
    return Page(value=[to_read(a) for a in rows], nextLink=next_link(request, token))
