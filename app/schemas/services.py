"""Compute targets and web services (issue 16), camelCase as Azure's model-management API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from app.deployments.states import ServiceState
from app.schemas.common import ApiModel, Text
from app.schemas.manifests import InferenceConfigCreate
from app.schemas.models import ModelName

ComputeType = Literal["local", "swarm", "kubernetes"]
# Azure's rule for a service name: 3-32 lower-case letters, digits or '-', a letter first, no '-' last.
ServiceName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")]
ComputeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9-]{1,31}$")]
ResourceId = Annotated[str, StringConstraints(max_length=64)]
Pem = Annotated[str, StringConstraints(min_length=1, max_length=16384, pattern=r"-----BEGIN [A-Z0-9 ]+-----")]

# ---- compute targets


class TlsCredentials(ApiModel):
    """The client certificate and key a swarm manager's TLS port asks for, and its CA (PEM)."""

    ca: Pem
    cert: Pem
    key: Pem


class ComputeProperties(ApiModel):
    dockerHost: Annotated[str, StringConstraints(max_length=512)] | None = Field(
        default=None, description="swarm: the manager's engine, tcp://host:port (TLS only)"
    )
    tls: TlsCredentials | None = Field(default=None, description="swarm: sealed, never shown again")
    namespace: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")] | None = Field(
        default=None, description="kubernetes: where the service's objects go (default: default)"
    )
    kubeconfig: Annotated[str, StringConstraints(min_length=1, max_length=65536)] | None = Field(
        default=None, description="kubernetes: inline credentials only; sealed, never shown again"
    )


class ComputePut(ApiModel):
    type: ComputeType
    properties: ComputeProperties = ComputeProperties()


class ComputePropertiesRead(ApiModel):
    dockerHost: str | None = None
    namespace: str | None = None


class ComputeRead(ApiModel):
    name: str
    type: ComputeType
    properties: ComputePropertiesRead
    builtIn: bool = Field(description="local: the workers' own engine, in every account, never detached")
    hasCredentials: bool
    createdTime: datetime | None


# ---- services


class ContainerResourceRequirements(ApiModel):
    cpu: float = Field(default=0.1, gt=0, le=64, description="CPU cores of each replica")
    memoryInGB: float = Field(default=0.5, ge=0.125, le=1024, description="memory of each replica (GB)")


class AutoScaler(ApiModel):
    autoscaleEnabled: bool = False
    minReplicas: int = Field(default=1, ge=1, le=100)
    maxReplicas: int = Field(default=10, ge=1, le=100)
    targetUtilization: int = Field(default=70, ge=1, le=100, description="CPU %")
    refreshPeriodInSeconds: int = Field(default=1, ge=1, le=3600)


class DeploymentConfig(ApiModel):
    containerResourceRequirements: ContainerResourceRequirements = ContainerResourceRequirements()
    numReplicas: int | None = Field(default=None, ge=1, le=100, description="default 1 (not with autoscaleEnabled)")
    autoScaler: AutoScaler | None = None
    authEnabled: bool = Field(default=True, description="scoring requests need a key (POST .../keys)")
    scoringTimeoutMs: int = Field(default=60000, ge=100, le=300000)


class ServiceInferenceConfig(InferenceConfigCreate):
    """A manifest's inference configuration (entryScript, runtime, condaFile, assets, ...): the
    service builds its image from it first; the image and manifest take the service's name
    and its modelIds."""

    name: ModelName | None = Field(default=None, description="the image's and manifest's name; default: the service's")


class ServiceCreate(ApiModel):
    name: ServiceName = Field(description="3-32 lower-case letters, digits or '-', starting with a letter")
    description: Annotated[Text, StringConstraints(max_length=512)] | None = None
    imageId: ResourceId | None = Field(default=None, description="a Succeeded image of the account")
    modelIds: list[ResourceId] | None = Field(
        default=None, description="instead of imageId: the registered models the image is built with"
    )
    inferenceConfig: ServiceInferenceConfig | None = Field(
        default=None, description="instead of imageId: how the image is built (one operation builds, then deploys)"
    )
    computeType: ComputeType | None = Field(default=None, description="checked against the target's, when given")
    computeName: ComputeName = "local"
    deploymentConfig: DeploymentConfig = DeploymentConfig()


class ServiceUpdate(ApiModel):
    """Any of: swap the image (a rolling update), scale, resize, switch key auth."""

    imageId: ResourceId | None = None
    numReplicas: int | None = Field(default=None, ge=1, le=100)
    autoScaler: AutoScaler | None = None
    containerResourceRequirements: ContainerResourceRequirements | None = None
    authEnabled: bool | None = None
    scoringTimeoutMs: int | None = Field(default=None, ge=100, le=300000)


class ServiceErrorRead(ApiModel):
    code: str
    message: str


class DeploymentStatus(ApiModel):
    desiredReplicas: int
    readyReplicas: int


class ServiceRead(ApiModel):
    id: str
    name: str
    description: str | None
    computeName: str
    computeType: ComputeType
    state: ServiceState
    error: ServiceErrorRead | None
    imageId: str
    imageDigest: str | None
    imageLocation: str | None
    scoringUri: str | None = Field(
        description="null until a generation of the service takes requests; the scoring gateway's address, "
        "or on kubernetes the Service's cluster address as the cluster reports it (reachable from inside "
        "the cluster only)"
    )
    swaggerUri: str | None
    authEnabled: bool
    numReplicas: int | None
    autoScaler: AutoScaler | None
    containerResourceRequirements: ContainerResourceRequirements
    scoringTimeoutMs: int
    deploymentStatus: DeploymentStatus
    operationId: str | None
    createdTime: datetime
    updatedTime: datetime


class ServiceKeys(ApiModel):
    primaryKey: str
    secondaryKey: str


class RegenerateKeys(ApiModel):
    keyType: Literal["Primary", "Secondary"]
    keyValue: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{16,128}$")] | None = Field(
        default=None, description="the new key (16-128 letters, digits, '-' or '_'); default: a random one"
    )
