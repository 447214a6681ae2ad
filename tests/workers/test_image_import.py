"""`mms base-image import`: docker-archive and oci-archive tars into the embedded image store.

The archives are made here, byte by byte, as `docker save` and `skopeo copy … oci-archive:`
write them; the command runs as a process on a data folder of its own (the embedded
default). The imported image is read back from the store and built on by the oci builder.
Archives that lie or attack are refused in one line, and leave nothing in the store.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from app.image_store.oci_layout import OciLayout
from workers.build_context import BuildSpec
from workers.builders.oci import OciBuilder
from workers.oci.image_store_client import ImageStoreClient
from workers.oci.media import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST

GLIBC = b"\x00junk GNU C Library (Debian GLIBC 2.36-9+deb12u4) stable release version 2.36.\n"
PATH = "/opt/miniconda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _layer(entries: dict[str, bytes | str]) -> bytes:
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


# A miniconda-style base: the system's libc in one layer, conda's Python under /opt/miniconda.
LAYERS = [
    _layer({"usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC, "usr/bin/true": b"elf"}),
    _layer({"opt/miniconda/bin/python3.12": b"elf", "opt/miniconda/bin/python3": "python3.12"}),
]


def _config(layers: list[bytes], arch: str = "amd64") -> bytes:
    return json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": [f"PATH={PATH}"], "Cmd": ["python3"], "Labels": {"maintainer": "someone"}},
            "rootfs": {"type": "layers", "diff_ids": [_sha(t) for t in layers]},
        }
    ).encode()


def _write_tar(path: Path, members: dict[str, bytes | tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, value in members.items():
            if isinstance(value, tarfile.TarInfo):
                tar.addfile(value)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return path


def docker_archive(path: Path, layers: list[bytes] = LAYERS, **extra: bytes | tarfile.TarInfo) -> Path:
    """What `docker save` wrote before Docker 25: <id>/layer.tar, <config digest>.json, manifest.json."""
    config = _config(layers)
    config_name = f"{_sha(config).removeprefix('sha256:')}.json"
    names = [f"{hashlib.sha256(str(n).encode()).hexdigest()}/layer.tar" for n in range(len(layers))]
    manifest = [{"Config": config_name, "RepoTags": ["my-miniconda:1"], "Layers": names}]
    members: dict[str, bytes | tarfile.TarInfo] = {config_name: config}
    members |= dict(zip(names, layers, strict=True))
    members |= {"manifest.json": json.dumps(manifest).encode(), **extra}
    return _write_tar(path, members)


def oci_archive(path: Path, *, corrupt_layer: bool = False) -> Path:
    """An OCI layout in a tar with an index of two platforms (arm64 first), gzip layers."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        blobs[f"blobs/sha256/{_sha(data).removeprefix('sha256:')}"] = data
        return {"digest": _sha(data), "size": len(data)}

    entries = []
    for arch in ("arm64", "amd64"):
        gz = [gzip.compress(t, mtime=0) for t in LAYERS]
        layers = [{"mediaType": OCI_LAYER, **blob(g)} for g in gz]
        config = {"mediaType": OCI_CONFIG, **blob(_config(LAYERS, arch))}
        manifest = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
        ).encode()
        entries.append({"mediaType": OCI_MANIFEST, **blob(manifest), "platform": {"os": "linux", "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    top = {"schemaVersion": 2, "manifests": [{"mediaType": OCI_INDEX, **blob(index)}]}
    if corrupt_layer:  # same size, other bytes: the digest no longer holds
        name = next(n for n, data in blobs.items() if data.startswith(b"\x1f\x8b"))
        blobs[name] = blobs[name][:-1] + bytes([blobs[name][-1] ^ 1])
    members = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": json.dumps(top).encode(), **blobs}
    return _write_tar(path, members)


def run_import(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
    env["MMS_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "workers", "base-image", "import", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _reference(stderr: str) -> str:
    line = next(line for line in stderr.splitlines() if line.startswith("imported "))
    return line.split()[1]


def test_a_docker_archive_is_imported_gzipped_labelled_and_an_oci_build_works_on_it(tmp_path: Path) -> None:
    archive = docker_archive(tmp_path / "base.tar")
    data = tmp_path / "data"
    done = run_import(data, str(archive), "--name", "miniconda:1")
    assert done.returncode == 0, done.stderr
    reference = _reference(done.stderr)
    host, _, rest = reference.partition("/")
    assert rest == "mms/imported/miniconda:1"
    assert "Python 3.12 on x86_64-manylinux_2_36" in done.stderr

    store = ImageStoreClient(OciLayout(data / "images"), host)
    manifest = store.get_manifest("mms/imported/miniconda", "1")
    assert manifest.media_type == OCI_MANIFEST
    config = json.loads(store.get_blob("mms/imported/miniconda", manifest.body["config"]["digest"]))
    # The plain tars are stored gzipped; the config's diff_ids still name them uncompressed.
    assert [d["mediaType"] for d in manifest.body["layers"]] == [OCI_LAYER, OCI_LAYER]
    for descriptor, diff_id in zip(manifest.body["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = store.get_blob("mms/imported/miniconda", descriptor["digest"])
        assert _sha(blob) == descriptor["digest"] and len(blob) == descriptor["size"]
        assert _sha(gzip.decompress(blob)) == diff_id
    assert config["rootfs"]["diff_ids"] == [_sha(t) for t in LAYERS]
    labels = config["config"]["Labels"]
    assert labels == {"maintainer": "someone", "org.mms.python": "3.12", "org.mms.libc": "glibc-2.36"}
    assert config["config"]["Env"] == [f"PATH={PATH}"]

    # A build on it, as a manifest naming it as baseImage would run: the labels spare the scan.
    app = tmp_path / "app"
    app.mkdir()
    (app / "score.py").write_text("def init():\n    pass\n\ndef run(data):\n    return data\n")
    lines: list[str] = []
    result = OciBuilder(host, layout=OciLayout(data / "images"), cache_dir=tmp_path / "cache").build_and_push(
        BuildSpec(base_image=reference, driver_program="score.py", app_dir=app), "acct/img", "1", lines.append
    )
    log = "\n".join(lines)
    assert "Python 3.12 on x86_64-manylinux_2_36" in log, log
    built = store.get_manifest("acct/img", "1")
    assert built.digest == result.digest
    assert [d["digest"] for d in built.body["layers"][:2]] == [d["digest"] for d in manifest.body["layers"]]


def test_an_oci_archive_with_an_index_imports_the_linux_amd64_image(tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = run_import(data, f"oci-archive:{oci_archive(tmp_path / 'base.oci.tar')}", "--name", "conda-oci")
    assert done.returncode == 0, done.stderr
    assert _reference(done.stderr).endswith("/mms/imported/conda-oci:latest")
    store = ImageStoreClient(OciLayout(data / "images"), "x")
    manifest = store.get_manifest("mms/imported/conda-oci", "latest")
    config = json.loads(store.get_blob("mms/imported/conda-oci", manifest.body["config"]["digest"]))
    assert config["architecture"] == "amd64"
    # Gzip layers are kept as they are: the same digests as in the archive.
    assert [d["digest"] for d in manifest.body["layers"]] == [_sha(gzip.compress(t, mtime=0)) for t in LAYERS]

    arm = run_import(
        tmp_path / "arm", str(tmp_path / "base.oci.tar"), "--name", "conda-oci", "--platform", "linux/arm64"
    )
    assert arm.returncode == 0, arm.stderr
    missing = run_import(tmp_path / "s390x", str(tmp_path / "base.oci.tar"), "--name", "x", "--platform", "linux/s390x")
    assert missing.returncode != 0
    assert "has no image for linux/s390x (it has linux/amd64, linux/arm64): use --platform" in missing.stderr


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("make", "args", "said"),
    [
        (
            lambda p: docker_archive(p, **{"../../etc/cron.d/evil": b"* * * * * root sh\n"}),
            [],
            "member '../../etc/cron.d/evil' has an unsafe name",
        ),
        (
            lambda p: docker_archive(p, **{"/etc/passwd": b"root::0:0::/:/bin/sh\n"}),
            [],
            "member '/etc/passwd' has an unsafe name",
        ),
        (
            lambda p: docker_archive(p, **{"abc/layer.tar": _link("abc/layer.tar", "/etc/shadow")}),
            [],
            "member 'abc/layer.tar' is a link (to '/etc/shadow'); links are refused",
        ),
        (
            lambda p: docker_archive(p, hard=_link("hard", "manifest.json", tarfile.LNKTYPE)),
            [],
            "member 'hard' is a link",
        ),
        (lambda p: oci_archive(p, corrupt_layer=True), [], "does not match its digest sha256:"),
        (
            # A layer whose bytes are not what the config's diff_ids say.
            lambda p: _swap_second_layer(p),
            [],
            "is not the config's diff_id",
        ),
        (
            lambda p: docker_archive(p, layers=[LAYERS[0], _layer({"big": os.urandom(3 << 20)})]),
            ["--max-size-mb", "2"],
            "larger than 2097152 bytes in all (the limit)",
        ),
        (lambda p: _write_tar(p, {"hello.txt": b"hi"}), [], "is neither a docker-archive"),
        (lambda p: p.write_bytes(b"not a tar at all" * 100) and p, [], "is not a readable tar archive"),
    ],
    ids=["traversal", "absolute", "symlink", "hardlink", "digest", "diff-id", "oversized", "not-an-image", "not-a-tar"],
)
def test_a_hostile_or_broken_archive_is_refused_in_one_line_and_leaves_nothing(
    tmp_path: Path, make, args: list[str], said: str
) -> None:
    archive = make(tmp_path / "evil.tar")
    data = tmp_path / "data"
    done = run_import(data, str(archive), "--name", "evil", *args)
    assert done.returncode != 0
    assert said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    # Progress lines aside, the failure is one line, the last.
    errors = [line for line in done.stderr.splitlines() if not line.startswith("mms: ")]
    assert len(errors) == 1 and errors[0].startswith("error: import refused: "), done.stderr
    stored = [p for p in (data / "images").rglob("*") if p.is_file()] if (data / "images").exists() else []
    assert stored == []


def _swap_second_layer(path: Path) -> Path:
    archive = docker_archive(path)
    # Rewrite the archive with the second layer's bytes changed, the config (its diff_ids) kept.
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    second = json.loads(members["manifest.json"])[0]["Layers"][1]
    members[second] = _layer({"opt/miniconda/bin/python3.12": b"elf", "opt/evil": b"x"})
    path.unlink()
    return _write_tar(path, members)


def test_a_bad_name_or_a_missing_file_is_refused_before_anything(tmp_path: Path) -> None:
    done = run_import(tmp_path, str(tmp_path / "nowhere.tar"), "--name", "Bad Name")
    assert done.returncode != 0 and "--name: invalid image name 'Bad Name'" in done.stderr
    done = run_import(tmp_path, "docker-archive:/nowhere.tar", "--name", "ok")
    assert done.returncode != 0 and "docker-archive:/nowhere.tar: no such archive file" in done.stderr
