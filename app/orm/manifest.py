"""Manifests: a driver program, assets, registered models and an environment, versioned by name."""

from __future__ import annotations

import uuid

from sqlalchemy import Boolean, ForeignKey, Integer, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.orm.base import Base, CreatedAt, UuidPrimaryKey, VersionCounter


class ManifestName(VersionCounter, Base):
    """A manifest name in an account, with its version counter."""

    __tablename__ = "manifest_names"


class Manifest(UuidPrimaryKey, CreatedAt, Base):
    __tablename__ = "manifests"
    __table_args__ = (UniqueConstraint("account_id", "name", "version"),)

    account_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(512))
    driver_program: Mapped[str] = mapped_column(String(64))  # an asset id of this manifest
    model_type: Mapped[str] = mapped_column(String(32))
    runtime_type: Mapped[str] = mapped_column(String(32))  # Python | SparkPython
    conda_env_url: Mapped[str | None] = mapped_column(Text)
    pip_requirements_url: Mapped[str | None] = mapped_column(Text)
    webservice_type: Mapped[str] = mapped_column(String(32))
    base_image: Mapped[str | None] = mapped_column(String(512))
    registry_address: Mapped[str | None] = mapped_column(String(255))
    registry_username: Mapped[str | None] = mapped_column(String(255))
    sealed_registry_password: Mapped[str | None] = mapped_column(Text)  # see app.sealing
    extra_dockerfile_steps: Mapped[str | None] = mapped_column(Text)
    enable_gpu: Mapped[bool] = mapped_column(Boolean, default=False)
    source_directory: Mapped[str | None] = mapped_column(String(512))
    created_by: Mapped[str | None] = mapped_column(String(255))

    assets: Mapped[list[ManifestAsset]] = relationship(
        order_by="ManifestAsset.position", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )
    models: Mapped[list[ManifestModel]] = relationship(
        order_by="ManifestModel.position", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )


class ManifestAsset(Base):
    __tablename__ = "manifest_assets"

    manifest_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("manifests.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    asset_id: Mapped[str] = mapped_column(String(64))  # the id the manifest gives it
    url: Mapped[str] = mapped_column(Text)
    mime_type: Mapped[str] = mapped_column(String(255))
    unpack: Mapped[bool] = mapped_column(Boolean, default=False)


class ManifestModel(Base):
    """A registered model a manifest bundles; a model in use cannot be deleted."""

    __tablename__ = "manifest_models"

    manifest_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("manifests.id", ondelete="CASCADE"), primary_key=True
    )
    # CASCADE so that deleting a whole account (which cascades to both sides) succeeds;
    # deleting one model still in use is refused by the service with a 409.
    model_version_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    position: Mapped[int] = mapped_column(Integer)
