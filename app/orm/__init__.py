"""Every table of the service, imported here so Alembic and the app see one metadata."""

from app.orm.account import Account
from app.orm.asset import Asset
from app.orm.base import Base
from app.orm.base_image import BaseImage
from app.orm.build_duration import BuildDurationBucket
from app.orm.event import Event, SubjectKind
from app.orm.idempotency import IdempotencyRecord
from app.orm.image import BuildLogChunk, Image, ImageName
from app.orm.manifest import Manifest, ManifestAsset, ManifestModel, ManifestName
from app.orm.principal import RoleAssignment, ServicePrincipal
from app.orm.registered_model import ModelTag, ModelVersion, RegisteredModel
from app.orm.service import (
    ClusterCleanup,
    Compute,
    Installation,
    Service,
    ServiceLogLine,
    ServiceOperation,
    ServiceReplica,
)
from app.orm.signing_key import SigningKey
from app.orm.webhook import DeliveryState, Webhook, WebhookDelivery

__all__ = [
    "Account",
    "Asset",
    "Base",
    "BaseImage",
    "BuildDurationBucket",
    "BuildLogChunk",
    "ClusterCleanup",
    "Compute",
    "DeliveryState",
    "Event",
    "IdempotencyRecord",
    "Image",
    "ImageName",
    "Installation",
    "Manifest",
    "ManifestAsset",
    "ManifestModel",
    "ManifestName",
    "ModelTag",
    "ModelVersion",
    "RegisteredModel",
    "RoleAssignment",
    "Service",
    "ServiceLogLine",
    "ServiceOperation",
    "ServicePrincipal",
    "ServiceReplica",
    "SigningKey",
    "SubjectKind",
    "Webhook",
    "WebhookDelivery",
]
