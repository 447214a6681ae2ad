"""Web services as the API sees them: create, read, list, change, delete, and their keys.

Nothing here deploys: a service is recorded with its desired spec (and, deployed from models,
its image build) and stays Transitioning until the reconciler (a deploy worker) reports what
the orchestrator did.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.builds.states import CreationState
from app.context import ServiceContext
from app.deployments.keys import KeyType, key_columns, new_key, new_keys, read_keys
from app.deployments.lifecycle import (
    create_service,
    force_delete,
    latest_operations,
    request_delete,
    update_service,
)
from app.deployments.states import ServiceState
from app.errors import BadRequest, Conflict, NotFound
from app.orm import Image, Service, ServiceLogLine, ServiceOperation
from app.schemas.images import ImageCreate
from app.schemas.manifests import InferenceConfigCreate
from app.schemas.services import AutoScaler, ContainerResourceRequirements, ServiceCreate, ServiceUpdate
from app.sealing import Sealer
from app.services import images, manifests
from app.services.accounts import AccountRef
from app.services.computes import get_target, invalid, is_tenant_swarm
from app.services.lookup import get_in_account, parse_uuid

# Targets with no autoscaler in v1, whose replicas share a subnet slot (docs/design/web-services.md §1).
_FIXED_SCALE = frozenset({"local", "swarm"})
# Targets whose scoring traffic does not pass the gateway, which is what checks keys (design §2):
# key auth cannot be had there, and a service that asked for it must not be served without it.
_NO_GATEWAY = frozenset({"kubernetes"})


def _check_auth(auth_enabled: bool | None, *, compute_type: str, tenant_swarm: bool, field: str) -> None:
    if auth_enabled and compute_type in _NO_GATEWAY:
        raise invalid(
            field,
            f"a {compute_type} target cannot check scoring keys: its traffic does not pass the scoring "
            "gateway, which is what checks them; set authEnabled to false to deploy there without key "
            "auth (the service is then reached at its cluster address, from inside the cluster only)",
        )
    if auth_enabled and tenant_swarm:
        raise invalid(
            field,
            "a swarm you attached cannot check scoring keys: its tasks publish their port on your swarm's "
            "manager, reachable around the scoring gateway, which is what checks them; set authEnabled to "
            "false to deploy there without key auth (scoringUri still reaches it through the gateway)",
        )


@dataclass(frozen=True)
class Limits:
    """The operator's settings a service's spec is checked against."""

    local_enabled: bool
    max_replicas: int  # on local and swarm
    # What one replica may ask for on local and swarm, whose engines the operator shares among
    # every tenant (a kubernetes cluster is the tenant's own, and its quotas are its own).
    max_cpu: float = 2.0
    max_memory_gb: float = 4.0
    max_services: int = 20  # per account: each takes one of the engine's service subnets
    swarm_enabled: bool = False  # the operator's swarm is the built-in target `swarm`


@dataclass(frozen=True)
class ServiceView:
    """A service with what its answer shows besides its own columns."""

    service: Service
    image: Image
    operation: ServiceOperation | None


def _scale(
    num_replicas: int | None,
    autoscaler: AutoScaler | None,
    *,
    compute_type: str,
    limits: Limits,
    prefix: str,
    default_replicas: int = 1,
) -> dict[str, Any]:
    """The scale columns of a spec: a fixed count (``default_replicas`` when none is given), or
    an autoscaler's range; 400s name the field."""
    autoscaled = autoscaler is not None and autoscaler.autoscaleEnabled
    if autoscaled and num_replicas is not None:
        raise invalid(f"{prefix}numReplicas", "cannot be given with autoScaler.autoscaleEnabled: choose one")
    if autoscaled:
        assert autoscaler is not None
        if compute_type in _FIXED_SCALE:
            raise invalid(
                f"{prefix}autoScaler.autoscaleEnabled",
                f"a {compute_type} target has no autoscaler: give numReplicas instead",
            )
        if autoscaler.minReplicas > autoscaler.maxReplicas:
            raise invalid(f"{prefix}autoScaler.minReplicas", "must not be more than maxReplicas")
        return {"num_replicas": None, "autoscaler": autoscaler.model_dump(), "replicas_desired": autoscaler.minReplicas}
    replicas = num_replicas or default_replicas
    if compute_type in _FIXED_SCALE and replicas > limits.max_replicas:
        raise invalid(f"{prefix}numReplicas", f"must be at most {limits.max_replicas} on a {compute_type} target")
    return {"num_replicas": replicas, "autoscaler": None, "replicas_desired": replicas}


def _resources(
    resources: ContainerResourceRequirements, *, compute_type: str, limits: Limits, prefix: str
) -> dict[str, Any]:
    if compute_type in _FIXED_SCALE:
        field = f"{prefix}containerResourceRequirements"
        if resources.cpu > limits.max_cpu:
            raise invalid(f"{field}.cpu", f"must be at most {limits.max_cpu:g} on a {compute_type} target")
        if resources.memoryInGB > limits.max_memory_gb:
            raise invalid(f"{field}.memoryInGB", f"must be at most {limits.max_memory_gb:g} on a {compute_type} target")
    return {"cpu": resources.cpu, "memory_gb": resources.memoryInGB}


def _deployable_image(session: Session, account: AccountRef, image_id: str) -> Image:
    image = get_in_account(session, Image, account, image_id, kind="image")
    if image.state is not CreationState.SUCCEEDED:
        message = f"imageId: image '{image_id}' is {image.state}; only a Succeeded image can be deployed"
        raise BadRequest(
            f"Invalid request: {message}", code="ImageNotReady", details=[{"code": "ImageNotReady", "message": message}]
        )
    return image


def image_builds(
    context: ServiceContext, account: AccountRef, *, created_by: str | None
) -> Callable[[Session, InferenceConfigCreate], Image]:
    """How a service deployed from models gets its image: the inference configuration stored
    as a manifest, and a build of it queued, in the service's own transaction."""

    def build(session: Session, body: InferenceConfigCreate) -> Image:
        manifest = manifests.create_manifest(
            session,
            account,
            body,
            sealer=context.sealer,
            urls=context.url_policy,
            own_registry=context.settings.image_registry,
            conda_channels=context.settings.conda_channels,
            created_by=created_by,
        )
        return images.create_image(
            session,
            account,
            ImageCreate(name=body.name, description=body.description, manifestId=str(manifest.id)),
            queue=context.build_queue,
            default_builder=context.settings.builder,
            available_builders=context.settings.available_builders,
            created_by=created_by,
        )

    return build


def _taken(session: Session, account: AccountRef, name: str) -> bool:
    return session.scalar(select(Service.id).where(Service.account_id == account.id, Service.name == name)) is not None


def _exists(name: str) -> Conflict:
    return Conflict(f"a service named '{name}' already exists in this account", code="ServiceExists")


def create(
    session: Session,
    account: AccountRef,
    body: ServiceCreate,
    *,
    sealer: Sealer,
    limits: Limits,
    created_by: str | None,
    build: Callable[[Session, InferenceConfigCreate], Image] | None = None,
) -> ServiceView:
    """Record a service as Transitioning, with its Create operation and new keys; from
    modelIds and an inferenceConfig, its manifest and image build too (``build``: how an image
    is built from them in this transaction), which the reconciler waits for."""
    from_models = body.modelIds is not None or body.inferenceConfig is not None
    if body.imageId is not None and from_models:
        raise invalid("modelIds", "give either an imageId or modelIds with an inferenceConfig, not both")
    if body.imageId is None and body.inferenceConfig is None:
        if body.modelIds is not None:
            raise invalid("inferenceConfig", "is required with modelIds: how to build the image from them")
        raise invalid("imageId", "is required (or modelIds with an inferenceConfig, to build the image first)")
    if from_models and build is None:
        raise invalid("inferenceConfig", "this service cannot build images")
    target = get_target(
        session,
        account,
        name=body.computeName,
        local_enabled=limits.local_enabled,
        swarm_enabled=limits.swarm_enabled,
        for_service=True,
    )
    if body.computeType is not None and body.computeType != target.compute_type:
        raise invalid(
            "computeType", f"compute '{target.name}' is a {target.compute_type} target, not {body.computeType}"
        )
    config = body.deploymentConfig
    _check_auth(
        config.authEnabled,
        compute_type=target.compute_type,
        tenant_swarm=is_tenant_swarm(target.compute_type, attached=not target.built_in),
        field="deploymentConfig.authEnabled",
    )
    scale = _scale(
        config.numReplicas,
        config.autoScaler,
        compute_type=target.compute_type,
        limits=limits,
        prefix="deploymentConfig.",
    )
    resources = _resources(
        config.containerResourceRequirements,
        compute_type=target.compute_type,
        limits=limits,
        prefix="deploymentConfig.",
    )
    if _taken(session, account, body.name):
        raise _exists(body.name)
    held = session.scalar(select(func.count()).select_from(Service).where(Service.account_id == account.id))
    if held >= limits.max_services:
        raise Conflict(
            f"this account holds {held} services, the most the service allows (MMS_SERVICES_PER_ACCOUNT); "
            "delete one first",
            code="TooManyServices",
        )
    if body.imageId is not None:
        image = _deployable_image(session, account, body.imageId)
    else:
        assert body.inferenceConfig is not None and build is not None
        inference = body.inferenceConfig
        manifest = InferenceConfigCreate.model_validate(
            inference.model_dump(exclude_unset=True)
            | {"name": inference.name or body.name, "modelIds": body.modelIds or []}
        )
        image = build(session, manifest)
    fields = dict(
        account_id=account.id,
        name=body.name,
        description=body.description,
        compute_name=target.name,  # a built-in one's canonical name
        compute_type=target.compute_type,
        compute_attached=not target.built_in,
        image_id=image.id,
        **scale,
        **resources,
        auth_enabled=config.authEnabled,
        scoring_timeout_ms=config.scoringTimeoutMs,
        **new_keys(sealer),
        created_by=created_by,
    )
    try:
        with session.begin_nested():
            service, operation = create_service(session, **fields)
    except IntegrityError:
        # A concurrent request took the name, or deleted the image: say which.
        if _taken(session, account, body.name):
            raise _exists(body.name) from None
        raise NotFound(f"image '{body.imageId}' was not found in this account", code="ImageNotFound") from None
    return ServiceView(service, image, operation)


def _get(session: Session, account: AccountRef, service_id: str) -> Service:
    return get_in_account(session, Service, account, service_id, kind="service")


def get_service(session: Session, account: AccountRef, *, service_id: str) -> ServiceView:
    """One service of the account, or 404."""
    return _views(session, [_get(session, account, service_id)])[0]


def _views(session: Session, services: list[Service]) -> list[ServiceView]:
    ids = [s.id for s in services]
    operations = latest_operations(session, ids)
    images = {i.id: i for i in session.scalars(select(Image).where(Image.id.in_({s.image_id for s in services})))}
    return [ServiceView(s, images[s.image_id], operations.get(s.id)) for s in services]


def list_services(
    session: Session, account: AccountRef, *, name: str | None, compute_name: str | None, image_id: str | None
) -> list[ServiceView]:
    """The account's services by name; filter by name, compute target or image."""
    query = select(Service).where(Service.account_id == account.id)
    if name is not None:
        query = query.where(Service.name == name)
    if compute_name is not None:
        query = query.where(Service.compute_name == compute_name)
    if image_id is not None:
        query = query.where(Service.image_id == parse_uuid(image_id))
    return _views(session, list(session.scalars(query.order_by(Service.name))))


def update(
    session: Session, account: AccountRef, *, service_id: str, body: ServiceUpdate, limits: Limits, scoring_url: str
) -> ServiceView:
    """Swap the image (a new generation), scale, resize or switch key auth: the service goes
    back to Transitioning with an Update operation; 409 while a change is being applied.
    (``scoring_url``: the gateway's address, for the scoringUri its event shows.)"""
    service = _get(session, account, service_id)
    if all(value is None for _, value in body):
        raise BadRequest(
            "give at least one of imageId, numReplicas, autoScaler, containerResourceRequirements, "
            "authEnabled, scoringTimeoutMs",
            code="EmptyUpdate",
        )
    values: dict[str, Any] = {}
    if body.numReplicas is not None or body.autoScaler is not None:
        # Turning an autoscaler off without a count keeps as many replicas as it last asked for.
        values |= _scale(
            body.numReplicas,
            body.autoScaler,
            compute_type=service.compute_type,
            limits=limits,
            prefix="",
            default_replicas=service.num_replicas or service.replicas_desired,
        )
    if body.containerResourceRequirements is not None:
        values |= _resources(
            body.containerResourceRequirements, compute_type=service.compute_type, limits=limits, prefix=""
        )
    if body.authEnabled is not None:
        tenant_swarm = is_tenant_swarm(service.compute_type, attached=service.compute_attached)
        _check_auth(body.authEnabled, compute_type=service.compute_type, tenant_swarm=tenant_swarm, field="authEnabled")
        values["auth_enabled"] = body.authEnabled
    if body.scoringTimeoutMs is not None:
        values["scoring_timeout_ms"] = body.scoringTimeoutMs
    new_generation = False
    if body.containerResourceRequirements is not None:
        # A replica's CPU and memory are fixed when it starts: new ones, rolled out like an image.
        new_generation = (values["cpu"], values["memory_gb"]) != (service.cpu, service.memory_gb)
    if body.imageId is not None:
        image = _deployable_image(session, account, body.imageId)
        if image.id != service.image_id:
            values["image_id"] = image.id
            new_generation = True
    values["error"] = None
    operation = update_service(session, service, scoring_url=scoring_url, new_generation=new_generation, **values)
    return ServiceView(service, session.get_one(Image, service.image_id), operation)


def delete(
    session: Session,
    account: AccountRef,
    *,
    service_id: str,
    scoring_url: str,
    force: bool = False,
    max_cleanups: int,
) -> ServiceView:
    """Ask for the service to be removed: it is Deleting until the orchestrator holds nothing of
    it. With ``force`` (a target the account attached; 409 on a built-in one), it is forgotten
    at once (whether Deleting or not), and what its target still runs is removed in the
    background (app.deployments.lifecycle.force_delete; refused while the account has
    ``max_cleanups`` of those pending); the view shows it as it was.
    (``scoring_url``: the gateway's address, for the scoringUri its event shows.)"""
    service = _get(session, account, service_id)
    image = session.get_one(Image, service.image_id)
    if force:
        operation = force_delete(session, service, max_cleanups=max_cleanups)
    else:
        operation = request_delete(session, service, scoring_url=scoring_url)
    return ServiceView(service, image, operation)


def list_keys(session: Session, account: AccountRef, *, service_id: str, sealer: Sealer) -> tuple[str, str]:
    """The service's primary and secondary scoring keys."""
    return read_keys(sealer, _get(session, account, service_id))


def regenerate_key(
    session: Session, account: AccountRef, *, service_id: str, key_type: KeyType, key: str | None, sealer: Sealer
) -> tuple[str, str]:
    """Replace one key (with ``key``, or a random one); the gateway refuses the old one within seconds."""
    service = _get(session, account, service_id)
    if service.state is ServiceState.DELETING:
        raise Conflict(f"service '{service.name}' is being deleted", code="ServiceDeleting")
    for column, value in key_columns(sealer, key_type, key or new_key()).items():
        setattr(service, column, value)
    service.keys_version = Service.keys_version + 1  # in the UPDATE: concurrent regenerations both count
    session.flush()
    session.refresh(service)
    return read_keys(sealer, service)


def read_logs(session: Session, account: AccountRef, *, service_id: str, tail: int) -> str:
    """The last ``tail`` lines the service's replicas printed, oldest first, each prefixed with
    its generation and replica (``g2 3f2a9c1d0b7e``): what the reconciler last copied."""
    service = _get(session, account, service_id)
    newest = list(
        session.execute(
            select(ServiceLogLine.generation, ServiceLogLine.replica_id, ServiceLogLine.text)
            .where(ServiceLogLine.service_id == service.id)
            .order_by(ServiceLogLine.id.desc())
            .limit(tail)
        )
    )
    return "".join(f"g{line.generation} {line.replica_id[:12]} {line.text}\n" for line in reversed(newest))


def get_operation(session: Session, account: AccountRef, *, operation_id: uuid.UUID) -> ServiceOperation | None:
    """The service operation with this id in the account, or None."""
    operation = session.get(ServiceOperation, operation_id)
    return operation if operation is not None and operation.account_id == account.id else None
