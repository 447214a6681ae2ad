"""ImageStoreClient: the registry client's calls over the service's own image store."""

from __future__ import annotations

import hashlib
import json

import pytest

from app.image_store.oci_layout import OciLayout
from workers.oci.image_store_client import ImageStoreClient
from workers.oci.media import OCI, OCI_INDEX
from workers.oci.remote_registry import RemoteRegistryError


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _push_image(store: ImageStoreClient, repo: str, tag: str, layer: bytes) -> str:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    for blob in (layer, config):
        assert store.push_blob(repo, _digest(blob), len(blob), lambda b=blob: iter([b])) in (
            "uploaded",
            "mounted",
            "present",
        )
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI.manifest,
            "config": {"mediaType": OCI.config, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": OCI.layer, "digest": _digest(layer), "size": len(layer)}],
        }
    ).encode()
    return store.put_manifest(repo, tag, manifest, OCI.manifest)


@pytest.fixture()
def store(tmp_path) -> ImageStoreClient:
    return ImageStoreClient(OciLayout(tmp_path / "images"), "127.0.0.1:8000")


def test_push_then_read_back_and_a_second_push_is_present(store: ImageStoreClient, tmp_path) -> None:
    digest = _push_image(store, "acct/model", "1", b"layer-one")
    manifest = store.get_manifest("acct/model", "1")
    assert manifest.digest == digest == _digest(manifest.raw)
    layer = manifest.body["layers"][0]["digest"]
    assert store.get_blob("acct/model", layer) == b"layer-one"
    assert store.blob_size("acct/model", layer) == len(b"layer-one")
    assert store.push_blob("acct/model", layer, 9, lambda: iter([b"layer-one"])) == "present"
    with store.open_blob("acct/model", layer) as chunks:
        assert b"".join(chunks) == b"layer-one"
    assert store.download_blob("acct/model", layer, tmp_path / "copy") == 9
    assert store.find_manifest("acct/model", "2") is None


def test_a_blob_of_another_repository_is_not_readable_through_this_one(store: ImageStoreClient) -> None:
    _push_image(store, "tenant-a/secret", "1", b"a's weights")
    layer = _digest(b"a's weights")
    assert store.blob_size("tenant-b/probe", layer) is None
    with pytest.raises(RemoteRegistryError) as refused:
        store.get_blob("tenant-b/probe", layer)
    assert refused.value.status == 404
    # Naming the digest is no proof of having the content (a tenant's base image manifest can
    # list any digest): the bytes are read and checked, and only then linked.
    with pytest.raises(RemoteRegistryError, match="does not match"):
        store.push_blob("tenant-b/probe", layer, 11, lambda: iter([b"guessed only"]))
    assert store.push_blob("tenant-b/probe", layer, 11, lambda: iter([b"a's weights"])) == "uploaded"
    # A mount is the builder's choice of a repository that holds it, never a tenant's.
    assert (
        store.push_blob("tenant-c/base", layer, 11, lambda: iter([b"never read"]), mount_from="tenant-a/secret")
        == "mounted"
    )
    with pytest.raises(RemoteRegistryError, match="does not match"):
        store.push_blob(
            "tenant-c/other", layer, 11, lambda: iter([b"guessed only"]), mount_from="tenant-d/does-not-hold-it"
        )


def test_content_that_does_not_match_its_digest_is_refused_and_not_kept(store: ImageStoreClient) -> None:
    claimed = _digest(b"what was promised")
    with pytest.raises(RemoteRegistryError, match="does not match"):
        store.push_blob("acct/model", claimed, 17, lambda: iter([b"something else!!!"]))
    assert store.layout.has_blob(claimed) is None
    assert not list((store.layout.root / ".incoming").iterdir())


def test_an_index_resolves_to_the_linux_amd64_image(store: ImageStoreClient) -> None:
    child = _push_image(store, "mms/base", "amd64-only", b"rootfs")
    size = store.layout.has_blob(child)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI.manifest,
                    "digest": child,
                    "size": size,
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        }
    ).encode()
    store.put_manifest("mms/base", "multi", index, OCI_INDEX)
    assert store.get_manifest("mms/base", "multi").digest == child
    with pytest.raises(RemoteRegistryError, match="no image for linux/arm64"):
        store.get_manifest("mms/base", "multi", platform=("linux", "arm64"))
    with pytest.raises(RemoteRegistryError) as missing:
        store.get_manifest("mms/base", "nope")
    assert missing.value.status == 404
