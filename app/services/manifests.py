"""Manifests: what an image is built from, versioned per name like models."""

from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import Conflict, ValidationFailed
from app.orm import Image, Manifest, ManifestAsset, ManifestModel, ManifestName, ModelVersion
from app.package_sources import (
    PackageSourceRefused,
    check_conda_channels,
    check_requirements,
    conda_pip_entries,
)
from app.schemas.manifests import InferenceConfigCreate, ManifestAssetBody, ManifestCreate
from app.sealing import Sealer
from app.services.accounts import AccountRef
from app.services.base_images import NO_GPU_BASE, default_base_image, foreign_base_image
from app.services.lookup import get_in_account, parse_uuid
from app.services.paging import page_by_name_and_version
from app.services.source_urls import SourceUrlPolicy
from app.services.versioning import claim_next_version
from app.storage.base import AssetStore, StorageError


def _invalid(field: str, message: str, code: str = "InvalidField") -> ValidationFailed:
    text = f"{field}: {message}"
    return ValidationFailed(f"Invalid request: {text}", details=[{"code": code, "message": text}])


# Manifest.driver_program's width: an entry script's path inside a sourceDirectory fits in it.
_MAX_ENTRY_SCRIPT = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_source_directory(body: InferenceConfigCreate, assets: dict[str, ManifestAssetBody]) -> None:
    """A sourceDirectory names an archive asset unpacked at the app root; the entryScript is a
    plain relative path inside it (the worker fails the build if the archive lacks it)."""
    directory = assets.get(body.sourceDirectory or "")
    if directory is None:
        raise _invalid(
            "sourceDirectory",
            f"'{body.sourceDirectory}' is not the id of one of the assets: upload the directory as a zip, tar or "
            "tar.gz asset with unPack: true and give its id",
        )
    if not directory.unPack:
        raise _invalid("sourceDirectory", f"asset '{directory.id}' must be an archive with unPack: true")
    path = body.entryScript
    if path.startswith("/") or "\\" in path or re.match(r"^[A-Za-z]:", path):
        raise _invalid("entryScript", f"'{path}' must be a path relative to the sourceDirectory, not an absolute one")
    if any(part in ("", ".", "..") for part in path.split("/")) or _CONTROL.search(path):
        raise _invalid("entryScript", f"{path!r} must be a plain path inside the sourceDirectory (no '..' or '.' part)")
    if not path.endswith(".py") or len(path) > _MAX_ENTRY_SCRIPT:
        raise _invalid("entryScript", f"'{path}' must be a .py file of at most {_MAX_ENTRY_SCRIPT} characters")


def _check_gpu_base(session: Session, runtime: str) -> None:
    """enableGpu without a baseImage builds on the newest published gpu base: there must be one."""
    if runtime == "SparkPython":
        raise _invalid("enableGpu", "no GPU base image carries Spark's Java: name a GPU baseImage with Java 17")
    if default_base_image(session, variant="gpu") is None:
        raise _invalid("enableGpu", NO_GPU_BASE, code="NoGpuBaseImage")


def _resolve_models(session: Session, account: AccountRef, model_ids: list[str]) -> list[ModelVersion]:
    """The account's models with these ids, in order; a 400 naming every id that is not one."""
    parsed = {model_id: parse_uuid(model_id) for model_id in model_ids}
    wanted = [p for p in parsed.values() if p is not None]
    found = (
        {
            m.id: m
            for m in session.scalars(
                select(ModelVersion).where(ModelVersion.id.in_(wanted), ModelVersion.account_id == account.id)
            )
        }
        if wanted
        else {}
    )
    missing = [i for i, p in parsed.items() if p not in found]
    if missing:
        raise ValidationFailed(
            f"Invalid request: modelIds: no model with id {', '.join(missing)} in this account",
            details=[{"code": "ModelNotFound", "message": f"modelIds: model '{i}' was not found"} for i in missing],
        )
    return [found[parsed[i]] for i in dict.fromkeys(model_ids)]  # type: ignore[index]


_MAX_REQUIREMENTS_BYTES = 1 << 20


def _check_package_sources(
    store: AssetStore, account: AccountRef, url: str, field: str, *, conda: bool = False, channels: list[str] = ()
) -> None:
    """A 400 naming the line when requirements held in the account's own store choose their
    package source. Files elsewhere (or too large to read here) are checked by the worker."""

    def own(candidate: str) -> bool:
        key = store.key_of(candidate)
        return key is not None and key.split("/", 1)[0] == str(account.id)

    key = store.key_of(url)
    if key is None or key.split("/", 1)[0] != str(account.id):
        return
    try:
        data = store.read_small(key, max_bytes=_MAX_REQUIREMENTS_BYTES)
    except StorageError:
        return
    if data is None:
        return
    text = data.decode("utf-8", errors="replace")
    try:
        if conda:
            check_conda_channels(text, list(channels))
            check_requirements("\n".join(conda_pip_entries(text)), "conda file pip:", own_url=own)
        else:
            check_requirements(text, "pip requirements", own_url=own)
    except PackageSourceRefused as exc:
        raise _invalid(field, str(exc), code="PackageSourceRefused") from None


def create_manifest(
    session: Session,
    account: AccountRef,
    body: ManifestCreate | InferenceConfigCreate,
    *,
    sealer: Sealer,
    urls: SourceUrlPolicy,
    own_registry: str,
    conda_channels: list[str],
    created_by: str | None,
) -> Manifest:
    """Validate a manifest in either shape against the account and store it as its name's next version."""
    assets = {asset.id: asset for asset in body.assets}
    for index, asset in enumerate(body.assets):
        urls.check(asset.url, field=f"assets[{index}].url")
    registry_password = registry = None
    if isinstance(body, ManifestCreate):
        driver, driver_field = body.driverProgram, "driverProgram"
        runtime, model_type = body.targetRuntime.runtimeType, body.modelType
        conda_url = body.targetRuntime.properties.condaEnvFile
        pip_url = body.targetRuntime.properties.pipRequirements
        for field, url in (("condaEnvFile", conda_url), ("pipRequirements", pip_url)):
            if url:
                urls.check(url, field=f"targetRuntime.properties.{field}")
        extra_steps, enable_gpu, source_directory, base_image = None, False, None, None
    else:
        driver, driver_field = body.entryScript, "entryScript"
        runtime, model_type, pip_url = body.runtime, "Registered", None
        if body.condaFile is not None and body.condaFile not in assets:
            raise _invalid("condaFile", f"'{body.condaFile}' is not the id of one of the assets")
        conda_url = assets[body.condaFile].url if body.condaFile else None
        extra_steps, enable_gpu = body.extraDockerfileSteps, body.enableGpu
        source_directory, base_image = body.sourceDirectory, body.baseImage
        foreign = base_image and foreign_base_image(base_image, registry=own_registry, account_id=account.id)
        if foreign:
            raise _invalid("baseImage", foreign, code="ForeignBaseImage")
        registry = body.baseImageRegistry
        if registry is not None and registry.password:
            registry_password = sealer.seal(registry.password.encode())
        if source_directory is not None:
            _check_source_directory(body, assets)
        if enable_gpu and not base_image:
            _check_gpu_base(session, runtime)
    if source_directory is None and driver not in assets:
        raise _invalid(driver_field, f"'{driver}' is not the id of one of the assets")
    if pip_url:
        _check_package_sources(urls.store, account, pip_url, "targetRuntime.properties.pipRequirements")
    if conda_url:
        field = "condaFile" if isinstance(body, InferenceConfigCreate) else "targetRuntime.properties.condaEnvFile"
        _check_package_sources(urls.store, account, conda_url, field, conda=True, channels=conda_channels)
    models = _resolve_models(session, account, body.modelIds)

    _, version = claim_next_version(session, ManifestName, account_id=account.id, name=body.name)
    manifest = Manifest(
        account_id=account.id,
        name=body.name,
        version=version,
        description=body.description,
        driver_program=driver,
        model_type=model_type,
        runtime_type=runtime,
        conda_env_url=conda_url,
        pip_requirements_url=pip_url,
        webservice_type=body.webserviceType,
        base_image=base_image,
        registry_address=registry.address if registry else None,
        registry_username=registry.username if registry else None,
        sealed_registry_password=registry_password,
        extra_dockerfile_steps=extra_steps,
        enable_gpu=enable_gpu,
        source_directory=source_directory,
        created_by=created_by,
        assets=[
            ManifestAsset(position=i, asset_id=a.id, url=a.url, mime_type=a.mimeType, unpack=a.unPack)
            for i, a in enumerate(body.assets)
        ],
        models=[ManifestModel(position=i, model_version_id=m.id) for i, m in enumerate(models)],
    )
    session.add(manifest)
    session.flush()
    return manifest


def get_manifest(session: Session, account: AccountRef, *, manifest_id: str) -> Manifest:
    """One manifest of the account, or 404."""
    return get_in_account(session, Manifest, account, manifest_id, kind="manifest")


def list_manifests(
    session: Session,
    account: AccountRef,
    *,
    model_id: str | None,
    name: str | None,
    count: int | None,
    skip_token: str | None,
) -> tuple[list[Manifest], str | None]:
    """A page of manifests by name, newest version first; filter by a model they bundle or by name."""
    query = select(Manifest).where(Manifest.account_id == account.id)
    if name is not None:
        query = query.where(Manifest.name == name)
    if model_id is not None:
        model_uuid = parse_uuid(model_id)
        if model_uuid is None:
            return [], None
        query = query.where(
            Manifest.id.in_(select(ManifestModel.manifest_id).where(ManifestModel.model_version_id == model_uuid))
        )
    return page_by_name_and_version(session, query, Manifest, count=count, skip_token=skip_token)


def delete_manifest(session: Session, account: AccountRef, *, manifest_id: str) -> None:
    """Delete one manifest version; refused while an image was built from it."""
    manifest = get_manifest(session, account, manifest_id=manifest_id)
    images = session.scalar(select(func.count()).select_from(Image).where(Image.manifest_id == manifest.id))
    if images:
        raise Conflict(
            f"manifest '{manifest_id}' is used by {images} image(s); delete those images first",
            code="ManifestInUse",
        )
    session.delete(manifest)
    session.flush()
