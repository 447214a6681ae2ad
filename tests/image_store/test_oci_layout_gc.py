"""Garbage collection of the embedded image store: what no tag reaches goes, what is shared or
young stays, and a build pushing meanwhile never ends with a tag pointing at nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.image_store.oci_layout import OCI_MANIFEST, OciLayout
from tests.image_store.test_oci_layout import CONFIG_TYPE, LAYER_TAR_GZIP, build_image
from workers.oci.image_store_client import ImageStoreClient

DAY = 86400


def _age(layout: OciLayout, seconds: float) -> None:
    """Make everything in the layout look ``seconds`` old."""
    then = time.time() - seconds
    for path in layout.root.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))


def _blobs(layout: OciLayout) -> set[str]:
    return {f"sha256:{p.name}" for p in (layout.root / "blobs" / "sha256").iterdir()}


def test_an_untagged_image_is_collected_and_what_another_tag_shares_stays(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "images")
    shared_files = {"model.pkl": b"the same weights"}
    gone = build_image(layout, "acct/gone", "1", shared_files)
    kept = build_image(layout, "acct/kept", "1", shared_files)  # the same layer and config
    only_gone = build_image(layout, "acct/gone", "2", {"other.bin": b"only in the deleted one"})
    assert gone.layer_digest == kept.layer_digest
    layout.delete_tag("acct/gone", "1")
    layout.delete_tag("acct/gone", "2")
    _age(layout, 2 * DAY)

    done = layout.collect_garbage(grace_seconds=DAY)

    blobs = _blobs(layout)
    assert {kept.manifest_digest, kept.config_digest, kept.layer_digest} <= blobs
    assert only_gone.layer_digest not in blobs and only_gone.manifest_digest not in blobs
    assert done.blobs == 3 and done.bytes > 0  # the second image's manifest, config, layer
    # The deleted repository can serve nothing any more, not even by digest.
    assert layout.resolve("acct/gone", gone.manifest_digest) is None
    assert not layout.is_linked("acct/gone", kept.layer_digest)
    assert layout.resolve("acct/kept", "1").digest == kept.manifest_digest
    assert layout.is_linked("acct/kept", kept.layer_digest)
    assert layout.collect_garbage(grace_seconds=DAY).blobs == 0  # nothing more to do


def test_young_blobs_stay_until_the_grace_period_ends(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "images")
    image = build_image(layout, "acct/model", "1")
    layout.delete_tag("acct/model", "1")
    pending = layout.put_blob_bytes(b"a layer a running build uploaded, no manifest yet")

    assert layout.collect_garbage(grace_seconds=DAY).blobs == 0
    assert {image.layer_digest, pending} <= _blobs(layout)
    _age(layout, 2 * DAY)
    assert layout.collect_garbage(grace_seconds=DAY).blobs == 4
    assert _blobs(layout) == set()


def test_a_build_that_finds_an_old_orphan_blob_keeps_it_for_its_manifest(tmp_path: Path) -> None:
    """A new build of the same files finds the deleted image's layer present: pushing marks
    it in use, so the collector running before the manifest goes in spares it."""
    layout = OciLayout(tmp_path / "images")
    old = build_image(layout, "acct/model", "1")
    layout.delete_tag("acct/model", "1")
    _age(layout, 2 * DAY)
    store = ImageStoreClient(layout, "127.0.0.1:8000")
    assert store.push_blob("acct/model", old.layer_digest, len(old.layer), lambda: iter([old.layer])) == "present"
    config = layout.blob_path(old.config_digest).read_bytes()
    assert store.push_blob("acct/model", old.config_digest, len(config), lambda: iter([config])) == "present"

    layout.collect_garbage(grace_seconds=DAY)

    digest = store.put_manifest("acct/model", "2", old.manifest, OCI_MANIFEST)
    assert digest == old.manifest_digest
    assert store.get_blob("acct/model", old.layer_digest) == old.layer


def test_a_manifest_whose_blob_was_collected_meanwhile_is_refused_not_tagged(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "images")
    layer = layout.put_blob_bytes(b"layer")
    config = layout.put_blob_bytes(b"{}")
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_TYPE, "digest": config, "size": 2},
            "layers": [{"mediaType": LAYER_TAR_GZIP, "digest": layer, "size": 5}],
        }
    ).encode()
    real_update = layout._update_index

    def collected_first(change):  # the collector takes the lock just before the tag goes in
        layout.blob_path(layer).unlink()
        return real_update(change)

    layout._update_index = collected_first  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="was removed while the manifest was stored"):
        layout.put_manifest("acct/model", "1", manifest, OCI_MANIFEST)
    assert layout.tags("acct/model") == []


def test_mms_images_gc_collects_the_embedded_store(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    layout = OciLayout(data_dir / "images")
    image = build_image(layout, "acct/model", "1")
    layout.delete_tag("acct/model", "1")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
    environment["MMS_DATA_DIR"] = str(data_dir)

    def gc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "images", "gc", *args],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
        )

    spared = gc()  # the default grace period: a day
    assert spared.returncode == 0, spared.stderr
    assert "removed 0 tag(s) of deleted images, 0 blob(s)" in spared.stderr and image.layer_digest in _blobs(layout)
    assert gc("--grace-seconds", "0").returncode == 2  # a build pushing now would lose its blobs
    old = time.time() - 7200
    for path in layout.root.rglob("*"):
        os.utime(path, (old, old))
    done = gc("--grace-seconds", "60")
    assert done.returncode == 0, done.stderr
    assert "0 tag(s) of deleted images, 3 blob(s)" in done.stderr and _blobs(layout) == set()
    registry = subprocess.run(
        [sys.executable, "-m", "app.cli", "images", "gc"],
        env={**environment, "MMS_REGISTRY": "registry.example.test"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert registry.returncode == 1 and "registry's own tool" in registry.stderr
