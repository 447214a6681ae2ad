"""Manifests in the seed's shape, and in the inference-configuration shape of the custom-image doc."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, model_validator

from app.dockerfile_steps import StepError, parse_steps
from app.schemas.common import ApiModel, HttpUrlText, SeedBool, Text, not_a_dot_segment
from app.schemas.models import MimeType, ModelName

MAX_ASSETS = 100
MAX_MODELS = 50

_RUNTIMES = {"python": "Python", "sparkpython": "SparkPython", "spark-py": "SparkPython"}
# [registry[:port]/]repository[:tag][@digest], as `docker pull` takes it.
_IMAGE_REFERENCE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)
_REGISTRY_ADDRESS = re.compile(r"^[a-zA-Z0-9.-]+(?::\d{1,5})?$")


def _runtime(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() in _RUNTIMES:
        return _RUNTIMES[value.strip().lower()]
    return value


def _image_reference(value: str) -> str:
    if not _IMAGE_REFERENCE.fullmatch(value) or len(value) > 512:
        raise ValueError("must be an image reference such as myregistry.azurecr.io/myimage:v1")
    return value


def dockerfile_steps(value: str) -> str:
    """Extra Dockerfile steps that the builders' grammar accepts (app.dockerfile_steps)."""
    try:
        parse_steps(value)
    except StepError as exc:
        raise ValueError(str(exc)) from None
    return value


RuntimeType = Annotated[Literal["Python", "SparkPython"], BeforeValidator(_runtime)]
ImageReference = Annotated[str, AfterValidator(_image_reference)]
AssetId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$"), AfterValidator(not_a_dot_segment)]
Description = Annotated[Text, StringConstraints(max_length=512)]
ModelIds = Annotated[list[Annotated[str, StringConstraints(max_length=64)]], Field(max_length=MAX_MODELS)]
DockerfileSteps = Annotated[str, StringConstraints(max_length=16384), AfterValidator(dockerfile_steps)]


class ManifestAssetBody(ApiModel):
    id: AssetId
    url: HttpUrlText
    mimeType: MimeType = "application/octet-stream"
    unPack: SeedBool = False


class RuntimeProperties(ApiModel):
    condaEnvFile: HttpUrlText | None = None
    pipRequirements: HttpUrlText | None = None


class TargetRuntime(ApiModel):
    runtimeType: RuntimeType
    properties: RuntimeProperties = Field(default_factory=RuntimeProperties)


class RegistryCredentials(ApiModel):
    address: Annotated[str, AfterValidator(lambda v: _check(_REGISTRY_ADDRESS, v, "a registry host[:port]"))]
    username: Annotated[Text, StringConstraints(max_length=255)] | None = None
    password: Annotated[str, StringConstraints(max_length=4096)] | None = None


def _check(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"must be {what}")
    return value


def _registry(value: object) -> object:
    # The custom-image document also shows "baseImageRegistry": "mcr.microsoft.com".
    return {"address": value} if isinstance(value, str) else value


class _ManifestCommon(ApiModel):
    name: ModelName = Field(description="1-32 letters, digits, '-', '.' or '_'")
    description: Description | None = None
    modelIds: ModelIds = Field(default_factory=list)
    assets: list[ManifestAssetBody] = Field(default_factory=list, max_length=MAX_ASSETS)
    webserviceType: Literal["Realtime"] = "Realtime"

    @model_validator(mode="after")
    def _unique_asset_ids(self) -> _ManifestCommon:
        ids = [asset.id for asset in self.assets]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"assets: ids must be unique; repeated: {', '.join(duplicates)}")
        return self

    def asset_ids(self) -> set[str]:
        return {asset.id for asset in self.assets}


class ManifestCreate(_ManifestCommon):
    """The seed's body: a driver program among the assets and a target runtime."""

    driverProgram: AssetId
    modelType: Literal["Registered"] = "Registered"
    targetRuntime: TargetRuntime


class InferenceConfigCreate(_ManifestCommon):
    """The custom-image document's inference configuration, plus name, models and assets."""

    # An asset id; with a sourceDirectory, a path inside it (checked by the service).
    entryScript: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    runtime: RuntimeType = "Python"
    condaFile: AssetId | None = None
    extraDockerfileSteps: DockerfileSteps | None = None
    # The id of the asset (an archive with unPack) holding the whole source directory.
    sourceDirectory: Annotated[Text, StringConstraints(max_length=512)] | None = None
    enableGpu: bool = False
    baseImage: ImageReference | None = None
    baseImageRegistry: Annotated[RegistryCredentials | None, BeforeValidator(_registry)] = None


def manifest_shape(body: Any) -> str:
    """Which of the two shapes a request body uses."""
    return "inference-config" if isinstance(body, dict) and "entryScript" in body else "seed"


class RegistryRead(ApiModel):
    address: str
    username: str | None = None


class ManifestRead(ApiModel):
    id: str
    version: int
    name: str
    description: str | None
    driverProgram: str
    modelType: str
    CreatedTime: datetime
    modelIds: list[str]
    assets: list[ManifestAssetBody]
    targetRuntime: TargetRuntime
    webserviceType: str
    baseImage: str | None = None
    baseImageRegistry: RegistryRead | None = None
    extraDockerfileSteps: str | None = None
    enableGpu: bool = False
    sourceDirectory: str | None = None
