"""Manifests: create (in the seed's shape or as an inference configuration), get, list, delete."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, status
from fastapi.responses import JSONResponse
from pydantic import Discriminator, Tag
from sqlalchemy.orm import Session

from app.api import examples, idempotent
from app.api.deps import CallerDep, ContextDep, ManifestId, ReadableAccount, ReadsDep, SessionDep, WritableAccount
from app.api.links import next_link
from app.api.openapi import errors
from app.api.routing import ApiRoute
from app.orm import Image, Manifest
from app.schemas.common import Page
from app.schemas.manifests import (
    InferenceConfigCreate,
    ManifestAssetBody,
    ManifestCreate,
    ManifestRead,
    RegistryRead,
    RuntimeProperties,
    TargetRuntime,
    manifest_shape,
)
from app.services import manifests

router = APIRouter(
    prefix="/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}/manifests",
    tags=["manifests"],
    route_class=ApiRoute,
)

AnyManifestBody = Annotated[
    Annotated[ManifestCreate, Tag("seed")] | Annotated[InferenceConfigCreate, Tag("inference-config")],
    Discriminator(manifest_shape),
]


def to_read(manifest: Manifest) -> ManifestRead:
    registry = (
        RegistryRead(address=manifest.registry_address, username=manifest.registry_username)
        if manifest.registry_address
        else None
    )
    return ManifestRead(
        id=str(manifest.id),
        version=manifest.version,
        name=manifest.name,
        description=manifest.description,
        driverProgram=manifest.driver_program,
        modelType=manifest.model_type,
        CreatedTime=manifest.created_at,
        modelIds=[str(m.model_version_id) for m in manifest.models],
        assets=[
            ManifestAssetBody(id=a.asset_id, url=a.url, mimeType=a.mime_type, unPack=a.unpack) for a in manifest.assets
        ],
        targetRuntime=TargetRuntime(
            runtimeType=manifest.runtime_type,
            properties=RuntimeProperties(
                condaEnvFile=manifest.conda_env_url, pipRequirements=manifest.pip_requirements_url
            ),
        ),
        webserviceType=manifest.webservice_type,
        baseImage=manifest.base_image,
        baseImageRegistry=registry,
        extraDockerfileSteps=manifest.extra_dockerfile_steps,
        enableGpu=manifest.enable_gpu,
        sourceDirectory=manifest.source_directory,
    )


# A manifest never changes once made: the one an image embeds is rendered once per process
# (the most recent RENDERED_MANIFESTS), not loaded with its assets and models on every GET.
RENDERED_MANIFESTS = 2048
_rendered: OrderedDict[uuid.UUID, ManifestRead] = OrderedDict()
_rendered_lock = threading.Lock()


def rendered_manifest(image: Image) -> ManifestRead:
    """The manifest ``image`` was built from, as ManifestRead."""
    with _rendered_lock:
        found = _rendered.get(image.manifest_id)
        if found is not None:
            _rendered.move_to_end(image.manifest_id)
            return found
    found = to_read(image.manifest)  # its row, assets and models: loaded only now
    with _rendered_lock:
        _rendered[image.manifest_id] = found
        while len(_rendered) > RENDERED_MANIFESTS:
            _rendered.popitem(last=False)
    return found


# The seed: "Http Status Code 200 means Successfully Registered".
@router.post("", response_model=ManifestRead, status_code=status.HTTP_200_OK, responses=idempotent.responses(200))
def create_manifest(
    request: Request,
    body: Annotated[AnyManifestBody, Body(openapi_examples=examples.MANIFEST)],
    account: WritableAccount,
    caller: CallerDep,
    context: ContextDep,
    session: SessionDep,
    idempotency_key: idempotent.IdempotencyKey = None,
) -> JSONResponse:
    """Create a manifest; each one under a name gets that name's next version.

    Send either the seed's shape (driverProgram, targetRuntime) or an inference configuration
    (entryScript, runtime, condaFile, baseImage, baseImageRegistry …) with name, modelIds and assets.
    """
    return idempotent.answer_once(
        request,
        session,
        caller,
        context,
        key=idempotency_key,
        body=body,
        status_code=status.HTTP_200_OK,
        make=lambda: to_read(
            manifests.create_manifest(
                session,
                account,
                body,
                sealer=context.sealer,
                urls=context.url_policy,
                own_registry=context.settings.image_registry,
                conda_channels=context.settings.conda_channels,
                created_by=caller.subject,
            )
        ),
    )


@router.get("/{manifestId}", response_model=ManifestRead)
async def get_manifest(manifest_id: ManifestId, account: ReadableAccount, reads: ReadsDep) -> ManifestRead:
    def read(session: Session) -> ManifestRead:
        return to_read(manifests.get_manifest(session, account, manifest_id=manifest_id))

    return await reads.run(read)


@router.get("", response_model=Page[ManifestRead])
async def list_manifests(
    request: Request,
    account: ReadableAccount,
    reads: ReadsDep,
    model_id: Annotated[str | None, Query(alias="modelId")] = None,
    manifest_name: Annotated[str | None, Query(alias="manifestName")] = None,
    count: int | None = None,
    skip_token: Annotated[str | None, Query(alias="$skipToken")] = None,
) -> Page[ManifestRead]:
    """Manifests by name, newest version first; filter by a bundled model or by name."""

    def read(session: Session) -> Page[ManifestRead]:
        rows, token = manifests.list_manifests(
            session, account, model_id=model_id, name=manifest_name, count=count, skip_token=skip_token
        )
        return Page(value=[to_read(m) for m in rows], nextLink=next_link(request, token))

    return await reads.run(read, many=True)


@router.delete(
    "/{manifestId}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(409, s409="An image uses the manifest."),
)
def delete_manifest(manifest_id: ManifestId, account: WritableAccount, session: SessionDep) -> None:
    manifests.delete_manifest(session, account, manifest_id=manifest_id)
