"""Web services: create (202 + Operation-Location), read, list, change, delete, and their keys.

A new service is Transitioning until the reconciler (a deploy worker) reports what the
orchestrator did; its scoringUri is null until a generation of it has taken requests.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse

from app.api import examples, idempotent
from app.api.deps import (
    CallerDep,
    ContextDep,
    EventHubDep,
    ReadableAccount,
    ReadableAccountNow,
    ReadsDep,
    ServiceId,
    SessionDep,
    WritableAccount,
)
from app.api.event_stream import LastEventIdHeader, LastEventIdQuery, stream_response
from app.api.links import operation_location
from app.api.openapi import errors, header
from app.api.routing import ApiRoute
from app.api.untrusted import NOT_A_PAGE
from app.config import Settings
from app.deployments.reconciler import KEPT_LOG_LINES
from app.deployments.states import scoring_base, service_error
from app.orm import SubjectKind
from app.schemas.common import Page
from app.schemas.services import (
    AutoScaler,
    ContainerResourceRequirements,
    DeploymentStatus,
    RegenerateKeys,
    ServiceCreate,
    ServiceErrorRead,
    ServiceKeys,
    ServiceRead,
    ServiceUpdate,
)
from app.services import services_deploy
from app.services.services_deploy import Limits, ServiceView

PREFIX = "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
router = APIRouter(prefix=PREFIX, tags=["services"], route_class=ApiRoute)

OPERATION_LOCATION = header("the URL of the service's operation, to poll until it ends", required=True)
ACCEPTED = {202: {"headers": {"Operation-Location": OPERATION_LOCATION}}}
BUSY = "A change is being applied (ServiceBusy), or the service is being deleted (ServiceDeleting)."


def _limits(settings: Settings) -> Limits:
    return Limits(
        local_enabled=settings.local_compute,
        swarm_enabled=settings.swarm_compute,
        max_replicas=settings.service_max_replicas,
        max_cpu=settings.service_max_cpu,
        max_memory_gb=settings.service_max_memory_gb,
        max_services=settings.services_per_account,
    )


def to_read(view: ServiceView, settings: Settings) -> ServiceRead:
    service, image = view.service, view.image
    base = scoring_base(
        settings.scoring_url,
        service.id,
        compute_type=service.compute_type,
        endpoint=service.endpoint,
        traffic_generation=service.traffic_generation,
    )
    shown = service_error(service.state, service.error)
    error = None if shown is None else ServiceErrorRead(code=shown[0], message=shown[1])
    return ServiceRead(
        id=str(service.id),
        name=service.name,
        description=service.description,
        computeName=service.compute_name,
        computeType=service.compute_type,  # type: ignore[arg-type]  # one of ComputeType, as stored
        state=service.state,
        error=error,
        imageId=str(image.id),
        imageDigest=image.digest,
        imageLocation=image.image_location,
        scoringUri=None if base is None else f"{base}/score",
        swaggerUri=None if base is None else f"{base}/swagger.json",
        authEnabled=service.auth_enabled,
        numReplicas=service.num_replicas,
        autoScaler=None if service.autoscaler is None else AutoScaler(**service.autoscaler),
        containerResourceRequirements=ContainerResourceRequirements(cpu=service.cpu, memoryInGB=service.memory_gb),
        scoringTimeoutMs=service.scoring_timeout_ms,
        deploymentStatus=DeploymentStatus(
            desiredReplicas=service.replicas_desired, readyReplicas=service.replicas_ready
        ),
        operationId=None if view.operation is None else str(view.operation.id),
        createdTime=service.created_at,
        updatedTime=service.updated_at,
    )


def _accepted(view: ServiceView, request: Request, response: Response, settings: Settings) -> ServiceRead:
    assert view.operation is not None
    response.headers["Operation-Location"] = operation_location(request, view.operation.id)
    return to_read(view, settings)


@router.post(
    "/services",
    response_model=ServiceRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=idempotent.responses(202, ACCEPTED[202]["headers"])
    | errors(409, s409="A service of that name exists (ServiceExists)."),
)
def create_service(
    request: Request,
    body: Annotated[ServiceCreate, Body(openapi_examples=examples.SERVICE)],
    account: WritableAccount,
    caller: CallerDep,
    context: ContextDep,
    session: SessionDep,
    idempotency_key: idempotent.IdempotencyKey = None,
) -> JSONResponse:
    """Deploy a Succeeded image as a web service, or build one from modelIds and an
    inferenceConfig first (one operation for both); poll the Operation-Location or the service."""

    def create() -> ServiceRead:
        view = services_deploy.create(
            session,
            account,
            body,
            sealer=context.sealer,
            limits=_limits(context.settings),
            created_by=caller.subject,
            build=services_deploy.image_builds(context, account, created_by=caller.subject),
        )
        return to_read(view, context.settings)

    return idempotent.answer_once(
        request,
        session,
        caller,
        context,
        key=idempotency_key,
        body=body,
        status_code=status.HTTP_202_ACCEPTED,
        make=create,
        headers=lambda service: {"Operation-Location": operation_location(request, service["operationId"])},
    )


@router.get("/services", response_model=Page[ServiceRead])
async def list_services(
    account: ReadableAccount,
    context: ContextDep,
    reads: ReadsDep,
    name: str | None = None,
    compute_name: Annotated[str | None, Query(alias="computeName")] = None,
    image_id: Annotated[str | None, Query(alias="imageId")] = None,
) -> Page[ServiceRead]:
    """The account's services by name; filter by name, computeName or imageId."""

    def read(session: Session) -> Page[ServiceRead]:
        views = services_deploy.list_services(session, account, name=name, compute_name=compute_name, image_id=image_id)
        return Page(value=[to_read(v, context.settings) for v in views])

    return await reads.run(read, many=True)


# Declared before /services/{serviceId}, which would otherwise take "events" for an id.
@router.get(
    "/services/events",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "`ready`, then one `service` event per change"}
    },
)
async def stream_service_events(
    account: ReadableAccountNow,
    caller: CallerDep,
    context: ContextDep,
    hub: EventHubDep,
    last_event_id_header: LastEventIdHeader = None,
    last_event_id_query: LastEventIdQuery = None,
) -> EventSourceResponse:
    """The account's web service state changes as Server-Sent Events; resume with
    Last-Event-ID (an id from any of the account's streams)."""
    return stream_response(
        account,
        caller=caller,
        context=context,
        hub=hub,
        kinds=frozenset({SubjectKind.SERVICE}),
        last_event_id_header=last_event_id_header,
        last_event_id_query=last_event_id_query,
    )


@router.get("/services/{serviceId}", response_model=ServiceRead)
async def get_service(
    service_id: ServiceId, account: ReadableAccount, context: ContextDep, reads: ReadsDep
) -> ServiceRead:
    def read(session: Session) -> ServiceRead:
        return to_read(services_deploy.get_service(session, account, service_id=service_id), context.settings)

    return await reads.run(read)


@router.patch(
    "/services/{serviceId}",
    response_model=ServiceRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=ACCEPTED | errors(409, s409=BUSY),
)
def update_service(
    service_id: ServiceId,
    request: Request,
    response: Response,
    body: Annotated[ServiceUpdate, Body(openapi_examples=examples.SERVICE_UPDATE)],
    account: WritableAccount,
    context: ContextDep,
    session: SessionDep,
) -> ServiceRead:
    """Swap the image (a rolling update), scale, resize or switch key auth."""
    view = services_deploy.update(
        session,
        account,
        service_id=service_id,
        body=body,
        limits=_limits(context.settings),
        scoring_url=context.settings.scoring_url,
    )
    return _accepted(view, request, response, context.settings)


FORCE = (
    "Forget the service now instead of waiting for its target: for a kubernetes cluster or a swarm the "
    "account attached that will never answer again (gone for good), where a delete stays Deleting. "
    "Allowed in any state. The service is gone when this answers (its Delete operation has Succeeded, "
    "its deleted event is sent, the scoring gateway stops routing to it within its cache period); what "
    "it still runs there is removed in the background when that target answers again (retried with "
    "backoff for about a day, then given up). Refused (409 ForceDeleteNotAllowed) on the built-in "
    "targets, `local` and the operator's swarm: their plain delete always completes; and (409 "
    "TooManyCleanups) while the account has MMS_CLEANUPS_PER_ACCOUNT (50) of those removals pending."
)
FORCE_REFUSED = "force=true on a service of a built-in target (ForceDeleteNotAllowed): delete it without force."


@router.delete(
    "/services/{serviceId}",
    response_model=ServiceRead,
    status_code=status.HTTP_202_ACCEPTED,
    responses=ACCEPTED | errors(409, s409=FORCE_REFUSED),
)
def delete_service(
    service_id: ServiceId,
    request: Request,
    response: Response,
    account: WritableAccount,
    context: ContextDep,
    session: SessionDep,
    force: Annotated[bool, Query(description=FORCE)] = False,
) -> ServiceRead:
    """Remove the service and everything it made: Deleting until the orchestrator holds nothing
    of it; with ``force=true`` (a target the account attached), gone at once (the service as it
    was, its operation Succeeded)."""
    view = services_deploy.delete(
        session,
        account,
        service_id=service_id,
        scoring_url=context.settings.scoring_url,
        force=force,
        max_cleanups=context.settings.cleanups_per_account,
    )
    return _accepted(view, request, response, context.settings)


@router.get(
    "/services/{serviceId}/logs",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def service_logs(
    service_id: ServiceId,
    account: ReadableAccount,
    reads: ReadsDep,
    tail: Annotated[int, Query(ge=1, le=KEPT_LOG_LINES, description="how many of the newest lines")] = 200,
) -> PlainTextResponse:
    """What the service's replicas printed lately (their init() and run() output, the scoring
    server's), prefixed with generation and replica; kept after a failed generation's replicas
    are gone. Copied from the orchestrator by the reconciler: up to its pass period late (10 s
    while Healthy)."""

    def read(session: Session) -> PlainTextResponse:
        text = services_deploy.read_logs(session, account, service_id=service_id, tail=tail)
        # Text the tenant's code printed: plain text, never a page of this origin.
        return PlainTextResponse(text, headers=NOT_A_PAGE)

    return await reads.run(read, many=True)


@router.post("/services/{serviceId}/keys", response_model=ServiceKeys)
def list_keys(service_id: ServiceId, account: WritableAccount, context: ContextDep, session: SessionDep) -> ServiceKeys:
    """The scoring keys (Contributors and Owners only: a Reader may see a service, not call it)."""
    primary, secondary = services_deploy.list_keys(session, account, service_id=service_id, sealer=context.sealer)
    return ServiceKeys(primaryKey=primary, secondaryKey=secondary)


@router.post(
    "/services/{serviceId}/regenerateKeys",
    response_model=ServiceKeys,
    responses=errors(409, s409="The service is being deleted (ServiceDeleting)."),
)
def regenerate_keys(
    service_id: ServiceId,
    body: Annotated[RegenerateKeys, Body(openapi_examples=examples.REGENERATE_KEYS)],
    account: WritableAccount,
    context: ContextDep,
    session: SessionDep,
) -> ServiceKeys:
    """Replace the primary or the secondary key; the old one stops working within seconds."""
    primary, secondary = services_deploy.regenerate_key(
        session, account, service_id=service_id, key_type=body.keyType, key=body.keyValue, sealer=context.sealer
    )
    return ServiceKeys(primaryKey=primary, secondaryKey=secondary)
