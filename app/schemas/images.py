"""Image bodies: the seed's request and its PascalCase response, and operations."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from app.builds.states import CreationState as BuildState
from app.builds.states import SmokeTestResult
from app.schemas.common import ApiModel, Text
from app.schemas.manifests import ManifestRead
from app.schemas.models import ModelName


class ImageCreate(ApiModel):
    name: ModelName = Field(description="1-32 letters, digits, '-', '.' or '_'")
    description: Annotated[Text, StringConstraints(max_length=512)] | None = None
    imageType: Literal["Docker"] = "Docker"
    manifestId: Annotated[str, StringConstraints(max_length=64)]
    computeResourceId: Annotated[Text, StringConstraints(max_length=1024)] | None = None
    builder: Literal["oci", "docker"] | None = Field(
        default=None, description="oci (daemonless) or docker (RUN steps, conda); default: MMS_BUILDER"
    )


class ImageError(ApiModel):
    code: str
    message: str


class SmokeTestRead(ApiModel):
    """Whether the image was started once (init() ran, GET / answered) before it was called good."""

    result: SmokeTestResult
    reason: str | None = None  # why it was skipped or failed


class ImageRead(ApiModel):
    Id: str
    Name: str
    Version: int
    Description: str | None
    CreatedTime: datetime
    CreationState: BuildState
    ImageBuildLogUri: str
    ImageLocation: str | None
    ImageType: str
    Manifest: ManifestRead
    WebserviceType: str
    ComputeResourceId: str | None
    Digest: str | None = None
    Builder: str
    Error: ImageError | None = None
    SmokeTest: SmokeTestRead | None = None  # None until the build ends, and on images built before it was recorded
    OperationId: str


class OperationRead(ApiModel):
    id: str
    operationType: Literal["Image", "Service"] = "Image"
    resourceLocation: str | None = Field(description="what the operation made or changed; null once it is deleted")
    createdTime: datetime
    endTime: datetime | None
    state: BuildState
    error: ImageError | None = None


class BaseImageRead(ApiModel):
    name: str
    reference: str | None  # None: listed but not built here
    pythonVersion: str
    variant: str
    publishedAt: datetime | None
    available: bool
