"""Base images whose layers are not gzip: plain tar and zstd (OCI), as well as Docker's gzip.

Each base goes into a real OCI layout (the embedded image store) and the oci builder builds
on it end to end: it reads the layers to find the base's Python, copies them as they are and
puts its own gzip layers on top. A layer it cannot read fails the build saying which.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard

from app.image_store.oci_layout import OciLayout
from workers.build_context import BuildSpec
from workers.builders import BuildFailed
from workers.builders.oci import OciBuilder
from workers.oci.image_store_client import ImageStoreClient
from workers.oci.media import (
    DOCKER,
    DOCKER_LAYER,
    OCI,
    OCI_LAYER,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    Family,
)

HOST = "127.0.0.1:8000"
GLIBC = b"\x00junk GNU C Library (Debian GLIBC 2.36-9+deb12u4) stable release version 2.36.\n"


def _tar(entries: dict[str, bytes | str]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, value in entries.items():
            info = tarfile.TarInfo(name)
            if isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return raw.getvalue()


COMPRESS = {
    OCI_LAYER_TAR: lambda data: data,
    OCI_LAYER_ZSTD: lambda data: zstandard.ZstdCompressor().compress(data),
    OCI_LAYER: gzip.compress,
    DOCKER_LAYER: gzip.compress,
}


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _base(
    store: ImageStoreClient,
    tag: str,
    layers: list[tuple[str, bytes]],
    family: Family,
    path: str = "/usr/local/bin:/usr/bin:/bin",
) -> str:
    """Push a base image (no labels: the builder must read its layers) under mms/base:tag."""
    tars = [tar for _, tar in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": [f"PATH={path}"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(t) for t in tars]},
        }
    ).encode()
    descriptors = []
    for media_type, blob in layers:
        store.push_blob("mms/base", _digest(blob), len(blob), lambda b=blob: iter([b]))
        descriptors.append({"mediaType": media_type, "digest": _digest(blob), "size": len(blob)})
    store.push_blob("mms/base", _digest(config), len(config), lambda: iter([config]))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": family.manifest,
            "config": {"mediaType": family.config, "digest": _digest(config), "size": len(config)},
            "layers": descriptors,
        }
    ).encode()
    store.put_manifest("mms/base", tag, manifest, family.manifest)
    return f"{HOST}/mms/base:{tag}"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    # One store and one cache for the module: the dependency layer is installed once.
    return OciLayout(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("builder-cache")


def _spec(tmp_path: Path, base_image: str) -> BuildSpec:
    app = tmp_path / "app"
    app.mkdir()
    (app / "score.py").write_text("def init():\n    pass\n\ndef run(data):\n    return data\n")
    return BuildSpec(base_image=base_image, driver_program="score.py", app_dir=app)


@pytest.mark.parametrize(
    "media_type", [OCI_LAYER_TAR, OCI_LAYER_ZSTD, DOCKER_LAYER], ids=["oci-tar", "oci-zstd", "docker-gzip"]
)
def test_a_base_with_plain_zstd_or_docker_layers_builds(
    layout: OciLayout, cache: Path, tmp_path: Path, media_type: str
) -> None:
    store = ImageStoreClient(layout, HOST)
    family = DOCKER if media_type == DOCKER_LAYER else OCI
    # The C library in one layer, Python in the next: both layers must be read.
    libc = COMPRESS[media_type](_tar({"usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC}))
    python = COMPRESS[media_type](_tar({"usr/bin/python3.11": b"elf", "usr/bin/python3": "python3.11"}))
    tag = media_type.rsplit(".", 1)[-1].replace("+", "-")
    base = _base(store, tag, [(media_type, libc), (media_type, python)], family)
    lines: list[str] = []
    result = OciBuilder(HOST, layout=layout, cache_dir=cache).build_and_push(
        _spec(tmp_path, base), "acct/img", tag, lines.append
    )

    log = "\n".join(lines)
    assert "base image runs Python 3.11 on x86_64-manylinux_2_36" in log, log
    built = store.get_manifest("acct/img", tag)
    assert built.digest == result.digest
    layers = built.body["layers"]
    # The base's layers are copied as they are; the builder's own are gzip, of the base's family.
    assert [(d["mediaType"], d["digest"]) for d in layers[:2]] == [
        (media_type, _digest(libc)),
        (media_type, _digest(python)),
    ]
    assert {d["mediaType"] for d in layers[2:]} == {family.layer}
    assert store.get_blob("acct/img", layers[1]["digest"]) == python


def test_a_layer_of_an_unknown_media_type_fails_the_build_naming_it(
    layout: OciLayout, cache: Path, tmp_path: Path
) -> None:
    store = ImageStoreClient(layout, HOST)
    odd = "application/vnd.oci.image.layer.v1.tar+bzip2"
    base = _base(store, "bzip2", [(odd, b"BZh91AY&SY")], OCI)
    lines: list[str] = []
    with pytest.raises(BuildFailed) as failed:
        OciBuilder(HOST, layout=layout, cache_dir=cache).build_and_push(
            _spec(tmp_path, base), "acct/img", "bzip2", lines.append
        )
    assert failed.value.step == "pull-base"
    assert odd in failed.value.message and "uncompressed, gzip or zstd" in failed.value.message


def test_a_layer_whose_bytes_are_not_its_media_type_fails_naming_the_layer(
    layout: OciLayout, cache: Path, tmp_path: Path
) -> None:
    store = ImageStoreClient(layout, HOST)
    plain = _tar({"usr/bin/python3.12": b"elf"})  # a plain tar that claims to be zstd
    base = _base(store, "mislabelled", [(OCI_LAYER_ZSTD, plain)], OCI)
    with pytest.raises(BuildFailed) as failed:
        OciBuilder(HOST, layout=layout, cache_dir=cache).build_and_push(
            _spec(tmp_path, base), "acct/img", "mislabelled", lambda line: None
        )
    assert failed.value.step == "pull-base"
    assert f"base layer {_digest(plain)[:19]} is not a readable zstd tar" in failed.value.message


def test_a_miniconda_style_base_builds_on_the_python_its_path_finds(
    layout: OciLayout, cache: Path, tmp_path: Path
) -> None:
    # python3 in /opt/miniconda/bin (a symlink to python3.12 there) comes first on the
    # config's PATH; the system's /usr/bin/python3 (3.11) must not be the one used.
    store = ImageStoreClient(layout, HOST)
    system = gzip.compress(
        _tar(
            {
                "usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC,
                "usr/bin/python3.11": b"elf",
                "usr/bin/python3": "python3.11",
            }
        )
    )
    conda = gzip.compress(_tar({"opt/miniconda/bin/python3.12": b"elf", "opt/miniconda/bin/python3": "python3.12"}))
    path = "/opt/miniconda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    base = _base(store, "miniconda", [(OCI_LAYER, system), (OCI_LAYER, conda)], OCI, path=path)
    lines: list[str] = []
    OciBuilder(HOST, layout=layout, cache_dir=cache).build_and_push(
        _spec(tmp_path, base), "acct/img", "miniconda", lines.append
    )

    log = "\n".join(lines)
    assert "base image runs Python 3.12 on x86_64-manylinux_2_36 (/opt/miniconda/bin/python3)" in log, log
    assert "for Python 3.12 on x86_64-manylinux_2_36" in log  # the wheels are chosen for it
    layers = store.get_manifest("acct/img", "miniconda").body["layers"]
    server = store.get_blob("acct/img", layers[4]["digest"])  # base, base, user, dependencies, server
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(server))) as tar:
        start = tar.extractfile("opt/mms/bin/start").read().decode()
    assert "exec /opt/miniconda/bin/python3 -m scoring_server" in start
    assert "exec tini -- /opt/miniconda/bin/python3 -m scoring_server" in start
    config = json.loads(
        store.get_blob("acct/img", store.get_manifest("acct/img", "miniconda").body["config"]["digest"])
    )
    assert f"PATH={path}" in config["config"]["Env"]  # the base's PATH is kept for score.py's children
