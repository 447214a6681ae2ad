"""Compute targets: `local` (built in) and the swarm and kubernetes targets a tenant attaches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Response, status
from sqlalchemy.orm import Session

from app.api import examples
from app.api.deps import CallerDep, ComputeName, ContextDep, ReadableAccount, ReadsDep, SessionDep, WritableAccount
from app.api.openapi import errors
from app.api.routing import ApiRoute
from app.config import compute_path
from app.schemas.common import Page
from app.schemas.services import ComputePropertiesRead, ComputePut, ComputeRead
from app.services import computes
from app.services.computes import Target

PREFIX = "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
router = APIRouter(prefix=PREFIX, tags=["computes"], route_class=ApiRoute)

BUILT_IN = "'local' is built in (BuiltInCompute), or the target runs services (ComputeInUse)."


def to_read(target: Target) -> ComputeRead:
    return ComputeRead(
        name=target.name,
        type=target.compute_type,  # type: ignore[arg-type]  # one of ComputeType, as stored
        properties=ComputePropertiesRead(**target.properties),
        builtIn=target.built_in,
        hasCredentials=target.has_credentials,
        createdTime=target.created_at,
    )


@router.put(
    "/computes/{computeName}",
    response_model=ComputeRead,
    responses={201: {"model": ComputeRead, "description": "Attached."}, **errors(409, s409=BUILT_IN)},
)
def put_compute(
    name: ComputeName,
    body: Annotated[ComputePut, Body(openapi_examples=examples.COMPUTE)],
    response: Response,
    account: WritableAccount,
    caller: CallerDep,
    context: ContextDep,
    session: SessionDep,
) -> ComputeRead:
    """Attach a swarm or kubernetes target (201), or replace its settings (200); credentials are sealed."""
    target, created = computes.put_target(
        session,
        account,
        name=name,
        body=body,
        sealer=context.sealer,
        created_by=caller.subject,
        allow_insecure_tls=context.settings.kubernetes_allow_insecure_tls,
        swarm_enabled=context.settings.swarm_compute,
        # The installation's private hosts and those the operator allows for this compute alone.
        allow_hosts=context.settings.effective_fetch_allow_hosts
        | context.settings.compute_allow_hosts_for(
            compute_path(account.subscription_id, account.resource_group, account.name, name)
        ),
        service_pool=context.settings.service_subnet_pool,
    )
    if created:
        response.status_code = status.HTTP_201_CREATED
    return to_read(target)


@router.get("/computes", response_model=Page[ComputeRead])
async def list_computes(account: ReadableAccount, context: ContextDep, reads: ReadsDep) -> Page[ComputeRead]:
    """The built-in targets (`local` when the workers have an engine, `swarm` when the operator set
    one), then the attached targets; never their credentials."""

    def read(session: Session) -> Page[ComputeRead]:
        targets = computes.list_targets(
            session,
            account,
            local_enabled=context.settings.local_compute,
            swarm_enabled=context.settings.swarm_compute,
        )
        return Page(value=[to_read(t) for t in targets])

    return await reads.run(read, many=True)


@router.get("/computes/{computeName}", response_model=ComputeRead)
async def get_compute(name: ComputeName, account: ReadableAccount, context: ContextDep, reads: ReadsDep) -> ComputeRead:
    def read(session: Session) -> ComputeRead:
        target = computes.get_target(
            session,
            account,
            name=name,
            local_enabled=context.settings.local_compute,
            swarm_enabled=context.settings.swarm_compute,
        )
        return to_read(target)

    return await reads.run(read)


@router.delete("/computes/{computeName}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(409, s409=BUILT_IN))
def delete_compute(name: ComputeName, account: WritableAccount, context: ContextDep, session: SessionDep) -> None:
    """Detach a target no service runs on; its sealed credentials go with it."""
    computes.delete_target(session, account, name=name, swarm_enabled=context.settings.swarm_compute)
