"""The OCI image layout: spec-valid on disk, content-checked, repository-scoped, safe to share.

``build_image`` writes a small real image (a gzip tar layer, an OCI config, an OCI
manifest); the registry API tests use it too.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.image_store.oci_layout import OCI_INDEX, OCI_MANIFEST, REF_NAME_ANNOTATION, OciLayout

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "infra"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"


@dataclass(frozen=True)
class BuiltImage:
    repository: str
    tag: str
    manifest: bytes
    manifest_digest: str
    config_digest: str
    layer: bytes  # gzip tar
    layer_digest: str
    files: dict[str, bytes]


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _architecture() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def layer_bytes(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """A tar of ``files`` and its gzip (deterministic: fixed times and owners)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    return raw, gzip.compress(raw, mtime=0)


def build_image(
    layout: OciLayout, repository: str, tag: str = "1", files: dict[str, bytes] | None = None
) -> BuiltImage:
    """Write a one-layer image for this platform into ``layout`` as ``repository:tag``."""
    files = files or {"hello.txt": f"hello from {repository}:{tag}\n".encode()}
    raw, layer = layer_bytes(files)
    layer_digest = layout.put_blob_bytes(layer)
    config = json.dumps(
        {
            "architecture": _architecture(),
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [_sha256(raw)]},
            "history": [{"created_by": "tests/image_store/test_oci_layout.py"}],
        },
        sort_keys=True,
    ).encode()
    config_digest = layout.put_blob_bytes(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": LAYER_TAR_GZIP, "digest": layer_digest, "size": len(layer)}],
        },
        sort_keys=True,
    ).encode()
    digest = layout.put_manifest(repository, tag, manifest, OCI_MANIFEST)
    return BuiltImage(repository, tag, manifest, digest, config_digest, layer, layer_digest, files)


def new_repository() -> str:
    return f"{uuid.uuid4()}/housing"


@pytest.fixture()
def layout(tmp_path: Path) -> OciLayout:
    return OciLayout(tmp_path / "images")


def test_nothing_is_written_until_the_first_write(tmp_path: Path) -> None:
    layout = OciLayout(tmp_path / "images")
    assert layout.repositories() == [] and layout.tags("a/b") == [] and layout.resolve("a/b", "1") is None
    assert layout.has_blob(_sha256(b"x")) is None
    assert not (tmp_path / "images").exists()


def test_round_trip_is_a_spec_valid_layout(layout: OciLayout) -> None:
    repository = new_repository()
    image = build_image(layout, repository)

    assert json.loads((layout.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout.root / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    assert index["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest_digest,
            "size": len(image.manifest),
            "annotations": {REF_NAME_ANNOTATION: f"{repository}:1"},
        }
    ]
    for digest in (image.manifest_digest, image.config_digest, image.layer_digest):
        path = layout.blob_path(digest)
        assert path == layout.root / "blobs" / "sha256" / digest.removeprefix("sha256:")
        assert _sha256(path.read_bytes()) == digest
    assert layout.has_blob(image.layer_digest) == len(image.layer)
    with layout.open_blob(image.layer_digest) as handle:
        assert handle.read() == image.layer

    by_tag = layout.resolve(repository, "1")
    by_digest = layout.resolve(repository, image.manifest_digest)
    assert by_tag is not None and by_digest is not None
    assert by_tag.digest == image.manifest_digest and by_tag.size == len(image.manifest)
    assert by_tag.media_type == OCI_MANIFEST
    assert by_digest == by_tag
    assert layout.is_linked(repository, image.layer_digest) and layout.is_linked(repository, image.config_digest)
    assert layout.tags(repository) == ["1"] and layout.repositories() == [repository]
    assert list((layout.root / ".incoming").iterdir()) == []


def test_tags_sort_replace_and_delete(layout: OciLayout) -> None:
    repository = new_repository()
    for tag in ("2", "10", "1"):
        build_image(layout, repository, tag)
    newer = build_image(layout, repository, "1", files={"hello.txt": b"rebuilt\n"})
    assert layout.tags(repository) == ["1", "10", "2"]
    resolved = layout.resolve(repository, "1")
    assert resolved is not None and resolved.digest == newer.manifest_digest
    index = json.loads((layout.root / "index.json").read_text())
    names = [m["annotations"][REF_NAME_ANNOTATION] for m in index["manifests"]]
    assert sorted(names) == [f"{repository}:1", f"{repository}:10", f"{repository}:2"]

    assert layout.delete_tag(repository, "10") is True
    assert layout.delete_tag(repository, "10") is False
    assert layout.tags(repository) == ["1", "2"]
    assert layout.resolve(repository, newer.manifest_digest) is not None  # blobs and links stay


def test_put_blob_file_copies_or_links_and_verifies(
    layout: OciLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "layer.tar.gz"
    source.write_bytes(b"layer bytes")
    digest = _sha256(b"layer bytes")
    layout.put_blob_file(source, digest)  # same file system: a hard link
    assert layout.blob_path(digest).read_bytes() == b"layer bytes"
    assert layout.blob_path(digest).stat().st_ino == source.stat().st_ino
    layout.put_blob_file(tmp_path / "gone", digest)  # present already: nothing to do

    other = tmp_path / "other.bin"
    other.write_bytes(b"copied across file systems")

    def no_link(*_: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    layout.put_blob_file(other, _sha256(b"copied across file systems"))
    copied = layout.blob_path(_sha256(b"copied across file systems"))
    assert copied.read_bytes() == b"copied across file systems"
    assert copied.stat().st_ino != other.stat().st_ino


@pytest.mark.parametrize("hard_link", [True, False])
def test_a_digest_mismatch_is_refused_and_leaves_nothing(
    layout: OciLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_link: bool
) -> None:
    if not hard_link:
        monkeypatch.setattr(os, "link", lambda *_: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))
    source = tmp_path / "layer.tar.gz"
    source.write_bytes(b"what the builder wrote")
    claimed = _sha256(b"something else")
    with pytest.raises(ValueError, match=f"not {claimed}"):
        layout.put_blob_file(source, claimed)
    assert layout.has_blob(claimed) is None
    assert list((layout.root / "blobs" / "sha256").iterdir()) == []
    assert list((layout.root / ".incoming").iterdir()) == []


def test_a_manifest_with_a_missing_blob_is_refused(layout: OciLayout) -> None:
    repository = new_repository()
    config = layout.put_blob_bytes(b"{}")
    missing = _sha256(b"a layer nobody stored")
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_TYPE, "digest": config, "size": 2},
            "layers": [{"mediaType": LAYER_TAR_GZIP, "digest": missing, "size": 21}],
        }
    ).encode()
    with pytest.raises(ValueError, match=missing):
        layout.put_manifest(repository, "1", manifest, OCI_MANIFEST)
    assert layout.tags(repository) == [] and not layout.is_linked(repository, config)


@pytest.mark.parametrize(
    ("manifest", "media_type", "message"),
    [
        (b"not json", OCI_MANIFEST, "not valid JSON"),
        (b'{"schemaVersion": 1}', OCI_MANIFEST, "schemaVersion 2"),
        (
            b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}',
            OCI_MANIFEST,
            "says mediaType",
        ),
        (b'{"schemaVersion": 2, "layers": []}', OCI_MANIFEST, "config"),
        (b'{"schemaVersion": 2}', "text/plain", "unsupported manifest media type"),
    ],
)
def test_malformed_manifests_are_refused(layout: OciLayout, manifest: bytes, media_type: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layout.put_manifest(new_repository(), "1", manifest, media_type)


def test_a_size_that_does_not_match_the_blob_is_refused(layout: OciLayout) -> None:
    config = layout.put_blob_bytes(b"{}")
    manifest = json.dumps(
        {"schemaVersion": 2, "config": {"mediaType": CONFIG_TYPE, "digest": config, "size": 3}, "layers": []}
    ).encode()
    with pytest.raises(ValueError, match="2 bytes, the manifest says 3"):
        layout.put_manifest(new_repository(), "1", manifest, OCI_MANIFEST)


def test_blobs_and_manifests_do_not_cross_repositories(layout: OciLayout) -> None:
    mine, theirs = new_repository(), new_repository()
    image = build_image(layout, theirs)
    build_image(layout, mine, files={"other.txt": b"mine\n"})
    assert layout.resolve(mine, image.manifest_digest) is None
    assert not layout.is_linked(mine, image.layer_digest)
    assert layout.resolve(mine, "1") != layout.resolve(theirs, "1")
    assert sorted(layout.repositories()) == sorted([mine, theirs])


def test_an_index_links_its_child_manifests_and_their_blobs(layout: OciLayout) -> None:
    staging, repository = new_repository(), new_repository()
    child = build_image(layout, staging)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": child.manifest_digest,
                    "size": len(child.manifest),
                    "platform": {"architecture": _architecture(), "os": "linux"},
                }
            ],
        }
    ).encode()
    digest = layout.put_manifest(repository, "multi", index, OCI_INDEX)
    resolved = layout.resolve(repository, "multi")
    assert resolved is not None and (resolved.digest, resolved.media_type) == (digest, OCI_INDEX)
    child_descriptor = layout.resolve(repository, child.manifest_digest)
    assert child_descriptor is not None and child_descriptor.media_type == OCI_MANIFEST
    assert layout.is_linked(repository, child.layer_digest)


@pytest.mark.parametrize(
    "repository",
    [
        "../../etc",
        "a/../../b",
        "/abs",
        "Upper/case",
        "a//b",
        "a/",
        "",
        "-a",
        "a_",
        "a/.hidden",
        "a" * 256,
        "a\nb",
    ],
)
def test_bad_repository_names_are_refused(layout: OciLayout, repository: str) -> None:
    digest = layout.put_blob_bytes(b"{}")
    for call in (
        lambda: layout.resolve(repository, "1"),
        lambda: layout.tags(repository),
        lambda: layout.link_blob(repository, digest),
        lambda: layout.is_linked(repository, digest),
        lambda: layout.put_manifest(repository, "1", b"{}", OCI_MANIFEST),
    ):
        with pytest.raises(ValueError, match="invalid repository name"):
            call()
    assert not (layout.root / "repositories").exists()


@pytest.mark.parametrize("tag", ["", ".hidden", "-x", "a/b", "a:b", "a" * 129, "../x"])
def test_bad_tags_are_refused(layout: OciLayout, tag: str) -> None:
    with pytest.raises(ValueError, match="invalid (tag|digest)"):  # a reference with ':' is a digest
        layout.resolve("a/b", tag)
    with pytest.raises(ValueError, match="invalid tag"):
        layout.delete_tag("a/b", tag)


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:abc",
        "sha512:" + "a" * 128,
        "sha256:" + "A" * 64,
        "sha256:../../../../etc/passwd",
        "sha256:" + "0" * 63,
    ],
)
def test_bad_digests_are_refused(layout: OciLayout, digest: str) -> None:
    for call in (
        lambda: layout.blob_path(digest),
        lambda: layout.has_blob(digest),
        lambda: layout.resolve("a/b", digest),
        lambda: layout.put_blob_file(Path("/etc/hostname"), digest),
    ):
        with pytest.raises(ValueError, match="invalid digest"):
            call()


def _write_tags(root: str, worker: int, count: int) -> None:
    layout = OciLayout(Path(root))
    shared = layout.put_blob_bytes(b"a base layer every writer stores at once")
    assert shared
    for tag in range(count):
        build_image(layout, f"repo-{worker % 2}/image", f"w{worker}-{tag}")


def test_concurrent_writers_keep_every_tag(layout: OciLayout) -> None:
    writers, per_writer = 4, 6
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    processes = [
        context.Process(target=_write_tags, args=(str(layout.root), w, per_writer), daemon=True) for w in range(writers)
    ]
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + 120
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    assert [p.exitcode for p in processes] == [0] * writers

    index = json.loads((layout.root / "index.json").read_text())
    assert len(index["manifests"]) == writers * per_writer
    assert layout.repositories() == ["repo-0/image", "repo-1/image"]
    for worker in range(writers):
        repository = f"repo-{worker % 2}/image"
        for tag in range(per_writer):
            descriptor = layout.resolve(repository, f"w{worker}-{tag}")
            assert descriptor is not None and layout.has_blob(descriptor.digest) == descriptor.size
    assert list((layout.root / ".incoming").iterdir()) == []


# -- a real OCI tool reads the layout -----------------------------------------------------


def install_skopeo() -> str:
    """skopeo's path, installed by scripts/infra/skopeo.sh when missing; skips without root."""
    if shutil.which("skopeo") is None and os.geteuid() != 0:
        pytest.skip("skopeo is not installed and installing it needs root (scripts/infra/skopeo.sh)")
    proc = subprocess.run([str(SCRIPTS / "skopeo.sh")], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(f"scripts/infra/skopeo.sh failed: {proc.stderr[-2000:]}")
    return proc.stdout.strip().rpartition("=")[2]


@pytest.fixture(scope="session")
def skopeo() -> str:
    return install_skopeo()


def test_skopeo_reads_the_layout(layout: OciLayout, tmp_path: Path, skopeo: str) -> None:
    repository = new_repository()
    build_image(layout, repository, "1", files={"other.txt": b"an older tag\n"})
    image = build_image(layout, repository, "2")
    reference = f"oci:{layout.root}:{repository}:2"

    inspected = subprocess.run([skopeo, "inspect", reference], capture_output=True, text=True, timeout=120, check=False)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Digest"] == image.manifest_digest
    assert json.loads(inspected.stdout)["Layers"] == [image.layer_digest]

    target = tmp_path / "copied"
    copied = subprocess.run(
        [skopeo, "--insecure-policy", "copy", reference, f"dir:{target}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert copied.returncode == 0, copied.stderr
    layer = (target / image.layer_digest.removeprefix("sha256:")).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        member = tar.extractfile("hello.txt")
        assert member is not None and member.read() == image.files["hello.txt"]
