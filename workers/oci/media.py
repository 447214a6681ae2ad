"""Media types of the two manifest families: Docker v2 schema 2 and OCI."""

from __future__ import annotations

from dataclasses import dataclass

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

# How a base image's layer of each media type is compressed (None: a plain tar); a layer of
# any other type cannot be read, so a build on it fails naming the type.
LAYER_COMPRESSION: dict[str, str | None] = {
    OCI_LAYER: "gzip",
    DOCKER_LAYER: "gzip",
    OCI_LAYER_TAR: None,
    OCI_LAYER_ZSTD: "zstd",
}

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)


@dataclass(frozen=True)
class Family:
    """The media types a new image uses: the same family as its base image's manifest."""

    manifest: str
    config: str
    layer: str

    @classmethod
    def of(cls, manifest_media_type: str) -> Family:
        if manifest_media_type == DOCKER_MANIFEST:
            return DOCKER
        if manifest_media_type == OCI_MANIFEST:
            return OCI
        raise ValueError(f"unsupported manifest media type {manifest_media_type!r}")


DOCKER = Family(DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
OCI = Family(OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
