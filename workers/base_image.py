"""Publish the project's own inference base image from a root file system tarball, daemonless.

The tarball comes from ``scripts/infra/base-rootfs.sh`` (debootstrap: python3, pip, venv,
CA certificates, tini) of a Debian release (``RELEASES``: bullseye, Python 3.9; bookworm,
3.11; trixie, 3.13), or ``spark-rootfs.sh`` for the ``spark`` variant (bookworm plus
Debian's headless Java 17). It becomes one gzip layer as it is, with an image config written
here (PATH, LANG, CMD, and labels naming its Python, C library and Java, so builds on it
never scan its layers), pushed to a registry or into the embedded image store with the same
calls the oci builder uses. No Docker engine is involved.

Tags: ``py<ver>-<yyyymmdd>`` and the moving ``py<ver>`` (``py<ver>-spark[-<yyyymmdd>]`` for
the spark variant), ``<ver>`` read from the root file system. ``latest`` moves with the cpu
variant of ``DEFAULT_RELEASE`` only (the release the tarball's ``etc/mms-base-release``
names): the base a manifest gets when it names none.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import BinaryIO

from app.services.base_images import BASE_REPOSITORY
from workers.builders import BuildFailed, Log
from workers.builders.oci import Store, put_image
from workers.oci.layers import compress_tar
from workers.oci.media import OCI
from workers.oci.python_env import detect_target, tar_reader
from workers.oci.remote_registry import file_chunks

__all__ = [
    "BASE_REPOSITORY",
    "DEFAULT_RELEASE",
    "RELEASES",
    "VARIANTS",
    "cuda_version",
    "debian_release",
    "java_version",
    "publish_base_image",
]

logger = logging.getLogger(__name__)

_VERSION = re.compile(r"(\d+)\.(\d+)(\.\d+)?")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VARIANTS = ("cpu", "spark", "gpu")
RELEASES = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}  # Debian release: its Python
DEFAULT_RELEASE = "bookworm"
_RELEASE_FILE = re.compile(r"^(?:\./)?etc/mms-base-release$")
_SUITE = re.compile(r"^MMS_BASE_SUITE=(\S+)$", re.MULTILINE)
_JAVA_RELEASE = re.compile(r"^(?:\./)?usr/lib/jvm/[^/]+/release$")
_JAVA_VERSION = re.compile(r'^JAVA_VERSION="([^"]+)"', re.MULTILINE)
# Debian's libcudart11.0 ships libcudart.so.11.8.89 (and the soname link libcudart.so.11.0):
# the CUDA runtime's version is in the file's name.
_CUDA_RUNTIME = re.compile(r"^(?:\./)?usr/lib/[^/]+/libcudart\.so\.(\d+\.\d+)\.\d+$")


def publish_base_image(
    store: Store,
    registry: str,
    rootfs_tar: str | Path,
    python_version: str | None,
    log: Log,
    *,
    today: date | None = None,
    variant: str = "cpu",
) -> str:
    """Push ``rootfs_tar`` as ``py<ver>[-spark]-<yyyymmdd>`` and ``py<ver>[-spark]`` (and
    ``latest``, see the module's doc); return the first reference.

    ``registry`` is ``host[:port][/prefix]``, the address ``store`` is reached by.
    ``python_version``: what the tarball must carry, None for whatever it does.
    """
    wanted = None
    if python_version is not None:
        match = _VERSION.fullmatch(python_version)
        if not match:
            raise ValueError(f"python_version must look like 3.11 or 3.11.2, not {python_version!r}")
        wanted = f"{match[1]}.{match[2]}"
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    day = today or datetime.now(UTC).date()
    host, _, prefix = registry.rstrip("/").partition("/")
    repo = f"{prefix}/{BASE_REPOSITORY}" if prefix else BASE_REPOSITORY
    tar = Path(rootfs_tar)
    release = debian_release(tar)
    java = java_version(tar)
    if variant == "spark" and java is None:
        raise ValueError(
            f"{tar.name} has no Java runtime (usr/lib/jvm/*/release), which the "
            "spark variant needs: make it with scripts/infra/spark-rootfs.sh"
        )
    cuda = cuda_version(tar) if variant == "gpu" else None
    if variant == "gpu" and cuda is None:
        raise ValueError(
            f"{tar.name} has no CUDA runtime (usr/lib/*/libcudart.so.*), which the gpu "
            "variant needs: make it with scripts/infra/gpu-rootfs.sh"
        )
    with tempfile.TemporaryDirectory(prefix="mms-base-") as tmp:
        log(f"mms: compressing {tar.name} into a layer")
        layer = compress_tar(tar, Path(tmp) / "rootfs.tar.gz", f"mms base-image publish: {tar.name}")
        created = datetime(day.year, day.month, day.day, tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {
                "Env": [f"PATH={_PATH}", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1"],
                "Cmd": ["python3"],
                "Labels": {
                    "org.mms.rootfs.sha256": layer.diff_id.removeprefix("sha256:"),
                    "org.mms.build-date": day.isoformat(),
                },
            },
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
            "history": [{"created": created, "created_by": layer.created_by}],
        }
        try:
            target = detect_target(config, lambda: [_opened(layer.path)], base=tar.name)
        except BuildFailed as exc:  # no Python, musl, too old: not a base builds can use
            raise ValueError(exc.message) from None
        short = target.version
        if wanted is not None and wanted != short:
            raise ValueError(f"{tar.name} has Python {short}, not {python_version}")
        moving = f"py{short}" if variant == "cpu" else f"py{short}-{variant}"
        tags = [f"{moving}-{day:%Y%m%d}", moving]
        if variant == "cpu" and release == DEFAULT_RELEASE:
            tags.append("latest")
        config["config"]["Labels"] |= {"org.mms.python": python_version or short, "org.mms.libc": target.libc}
        if release is not None:
            config["config"]["Labels"]["org.mms.debian-release"] = release
        if java is not None:  # SparkPython builds check for Java by this label
            config["config"]["Labels"]["org.mms.java"] = java
        if cuda is not None:
            config["config"]["Labels"]["org.mms.cuda"] = cuda
        extras = (f", Java {java}" if java else "") + (f", CUDA {cuda}" if cuda else "")
        log(f"mms: layer {layer.digest} ({layer.size} bytes); {target.describe()}{extras}")
        how = store.push_blob(repo, layer.digest, layer.size, file_chunks(layer.path))
        log(f"mms: layer {how}")
        raw = json.dumps(config, separators=(",", ":")).encode()
        layers = [{"mediaType": OCI.layer, "digest": layer.digest, "size": layer.size}]
        for tag in tags:
            digest = put_image(store, repo, tag, OCI, raw, layers)
            log(f"mms: pushed {host}/{repo}:{tag} {digest}")
    reference = f"{registry.rstrip('/')}/{BASE_REPOSITORY}:{tags[0]}"
    logger.info("base_image.published", extra={"image": reference, "digest": digest})
    return reference


def debian_release(rootfs_tar: Path) -> str | None:
    """The Debian release base-rootfs.sh wrote into the tarball (``etc/mms-base-release``), or
    None for a root file system made some other way."""
    try:
        with tarfile.open(rootfs_tar, "r:") as tar:
            for member in tar:
                if member.isfile() and _RELEASE_FILE.match(member.name):
                    found = _SUITE.search(tar.extractfile(member).read().decode(errors="replace"))
                    return found[1] if found else None
    except tarfile.TarError as exc:
        raise ValueError(f"{rootfs_tar.name} is not a readable tar: {exc}") from None
    return None


def java_version(rootfs_tar: Path) -> str | None:
    """The Java a root file system tarball carries (its JDK's ``release`` file), or None."""
    try:
        with tarfile.open(rootfs_tar, "r:") as tar:
            for member in tar:
                if member.isfile() and _JAVA_RELEASE.match(member.name):
                    release = tar.extractfile(member).read().decode(errors="replace")
                    found = _JAVA_VERSION.search(release)
                    if found:
                        return found[1]
    except tarfile.TarError as exc:
        raise ValueError(f"{rootfs_tar.name} is not a readable tar: {exc}") from None
    return None


def cuda_version(rootfs_tar: Path) -> str | None:
    """The CUDA runtime (major.minor) a root file system tarball carries, or None."""
    try:
        with tarfile.open(rootfs_tar, "r:") as tar:
            for member in tar:
                found = _CUDA_RUNTIME.match(member.name)
                if found and member.isfile():
                    return found[1]
    except tarfile.TarError as exc:
        raise ValueError(f"{rootfs_tar.name} is not a readable tar: {exc}") from None
    return None


@contextmanager
def _opened(path: Path) -> Iterator[BinaryIO]:
    yield tar_reader(file_chunks(path)(), OCI.layer)
