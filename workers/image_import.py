"""Import an image into the service's image store (or MMS_REGISTRY): ``mms base-image import``.

Three sources: a ``docker save`` tar (docker-archive: ``manifest.json``, a config and layer
tars), an OCI image layout in a tar (oci-archive: ``index.json`` → manifest → blobs; from
``skopeo copy … oci-archive:`` or ``buildah push … oci-archive:``; ``docker save`` of Docker 25
and newer holds both), or a reference in a registry the fetch policy lets the service reach.

An archive may come from a user, so it is read as hostile: only plain files and folders with
plain relative names, no links, bounded sizes and counts, every blob's sha256 checked against
the name it is asked for by, every layer's uncompressed sha256 against the config's
``rootfs.diff_ids``. Everything is read and checked (and uncompressed layers gzipped) in a
scratch folder before the first byte goes to the store, so a refused import leaves nothing
there. The image is written as an OCI manifest whose config carries labels naming the image's
Python and C library when they can be found, so builds on it never scan its layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self

from app.image_store.oci_layout import check_repository
from workers.builders import BuildFailed, Log
from workers.builders.oci import Store, put_image
from workers.oci.layers import ParallelGzip
from workers.oci.media import (
    DOCKER_LAYER,
    INDEX_TYPES,
    LAYER_COMPRESSION,
    MANIFEST_TYPES,
    OCI,
    OCI_LAYER,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
)
from workers.oci.python_env import UNREADABLE_LAYER, detect_target, tar_reader
from workers.oci.remote_registry import DIGEST, ImageReference, RemoteRegistryClient, RemoteRegistryError, file_chunks

__all__ = [
    "IMPORT_NAMESPACE",
    "ImportLimits",
    "ImportRefused",
    "Imported",
    "import_archive",
    "import_reference",
    "imported_repository",
]

logger = logging.getLogger(__name__)

IMPORT_NAMESPACE = "mms/imported"  # under ``mms/``: every account's builds may start from it
_CHUNK = 1 << 20
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# A member name: plain components only (no "..", no empty part, no odd characters).
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+:=-]{0,254}")
_GZIP_MAGIC, _ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


class ImportRefused(ValueError):
    """The source is not an image this service takes; the message says what is wrong, in one line."""


@dataclass(frozen=True)
class ImportLimits:
    """Bounds on what an import reads: the archive (or the image) in all, each layer once
    uncompressed, the number of archive members and of layers, a JSON document."""

    max_bytes: int = 20 << 30
    max_members: int = 10_000
    max_layers: int = 127  # overlayfs' own limit on the engine
    max_json_bytes: int = 4 << 20
    # A symlink from one member to another: `docker save` of an older engine writes one for a
    # layer that appears twice. Allowed only for the service's own engine's export.
    internal_links: bool = False


@dataclass(frozen=True)
class Imported:
    reference: str  # <registry>/mms/imported/<name>:<tag>
    digest: str
    size: int
    python_version: str | None  # None: no Python found (builds on it would fail)


@dataclass(frozen=True)
class _Staged:
    path: Path
    digest: str
    size: int
    media_type: str


# A layer to read: opens its blob's bytes; its media type (None: a docker-archive layer, sniffed),
# the digest and size it must have (None: unknown, as in a docker-archive), a name for messages.
@dataclass(frozen=True)
class _LayerSource:
    open: Callable[[], AbstractContextManager[Iterable[bytes]]]
    media_type: str | None
    digest: str | None
    size: int | None
    name: str


def imported_repository(name: str) -> tuple[str, str]:
    """(repository, tag) for ``--name NAME[:TAG]``: ``mms/imported/<name>`` and the tag (latest)."""
    repo, _, tag = name.partition(":")
    tag = tag or "latest"
    if not _TAG.fullmatch(tag):
        raise ImportRefused(f"--name: invalid tag {tag!r} (letters, digits, '.', '_', '-'; at most 128)")
    repository = f"{IMPORT_NAMESPACE}/{repo}"
    try:
        check_repository(repository)
    except ValueError:
        raise ImportRefused(
            f"--name: invalid image name {repo!r} (lower-case letters and digits separated by '.', '_', '-' or '/')"
        ) from None
    return repository, tag


# -- archives -------------------------------------------------------------------------------


def import_archive(
    store: Store,
    registry: str,
    archive: Path,
    repository: str,
    tag: str,
    log: Log,
    *,
    platform: tuple[str, str] = ("linux", "amd64"),
    limits: ImportLimits = ImportLimits(),
) -> Imported:
    """Import a docker-archive or oci-archive tar as ``<registry>/<repository>:<tag>``."""
    with _open_tar(archive) as tar:
        members = _checked_members(tar, archive.name, limits)
        reader = _ArchiveReader(tar, members, archive.name, limits)
        if "index.json" in members:
            config, layers = reader.oci_image(platform)
            kind = "oci-archive"
        elif "manifest.json" in members:
            config, layers = reader.docker_image()
            kind = "docker-archive"
        else:
            raise ImportRefused(
                f"{archive.name} is neither a docker-archive (no manifest.json) nor an oci-archive (no index.json)"
            )
        log(f"mms: importing {archive.name} ({kind}, {len(layers)} layers)")
        return _import(store, registry, repository, tag, config, layers, log, limits, source=archive.name)


@contextmanager
def _open_tar(archive: Path) -> Iterator[tarfile.TarFile]:
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed below; its opening is what fails)
    except tarfile.TarError:
        raise ImportRefused(f"{archive.name} is not a readable tar archive (plain, gzip, bzip2 or xz)") from None
    except OSError as exc:
        raise ImportRefused(f"{archive.name} cannot be read: {exc.strerror or exc}") from None
    with tar:
        yield tar


def _checked_members(tar: tarfile.TarFile, archive: str, limits: ImportLimits) -> dict[str, tarfile.TarInfo]:
    """The archive's plain files by name; refused at the first member that is anything else."""
    files: dict[str, tarfile.TarInfo] = {}
    links: dict[str, str] = {}
    total = count = 0
    try:
        for member in tar:
            count += 1
            if count > limits.max_members:
                raise ImportRefused(f"{archive} has more than {limits.max_members} members")
            shown, name = member.name[:200], member.name
            while name.startswith("./"):
                name = name[2:]
            if member.isdir():
                name = name.rstrip("/")
                if name in ("", "."):
                    continue  # the archive's own root
            if member.name.startswith("/") or not all(_COMPONENT.fullmatch(p) for p in name.split("/")):
                raise ImportRefused(
                    f"{archive}: member {shown!r} has an unsafe name (absolute, '..' or odd characters)"
                )
            if member.issym() and limits.internal_links:
                links[name] = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
                continue
            if member.issym() or member.islnk():
                raise ImportRefused(
                    f"{archive}: member {shown!r} is a link (to {member.linkname[:200]!r}); links are refused"
                )
            if member.isdir():
                continue
            if not member.isfile():
                raise ImportRefused(f"{archive}: member {shown!r} is not a plain file or folder")
            if name in files:
                raise ImportRefused(f"{archive}: member {shown!r} appears twice")
            total += member.size
            if member.size > limits.max_bytes or total > limits.max_bytes:
                raise ImportRefused(f"{archive}: members larger than {limits.max_bytes} bytes in all (the limit)")
            files[name] = member
    except tarfile.TarError as exc:
        raise ImportRefused(f"{archive} is not a readable tar archive: {exc}") from None
    for name, target in links.items():  # an alias of a plain file in the archive, nothing else
        if target not in files:
            raise ImportRefused(f"{archive}: member {name[:200]!r} links outside the archive's files")
        files[name] = files[target]
    return files


class _ArchiveReader:
    def __init__(
        self, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], archive: str, limits: ImportLimits
    ) -> None:
        self.tar, self.members, self.archive, self.limits = tar, members, archive, limits

    def member(self, name: str, what: str) -> tarfile.TarInfo:
        name = name.removeprefix("./")
        found = self.members.get(name)
        if found is None:
            raise ImportRefused(f"{self.archive}: {what} {name[:200]!r} is not in the archive")
        return found

    def read(self, name: str, what: str, digest: str | None = None) -> bytes:
        member = self.member(name, what)
        if member.size > self.limits.max_json_bytes:
            raise ImportRefused(f"{self.archive}: {what} {name[:200]!r} is over {self.limits.max_json_bytes} bytes")
        data = self.tar.extractfile(member).read()
        if digest is not None and _sha(data) != digest:
            raise ImportRefused(f"{self.archive}: {what} {name[:200]!r} does not match its digest {digest}")
        return data

    def json(self, name: str, what: str, digest: str | None = None) -> Any:
        try:
            return json.loads(self.read(name, what, digest))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ImportRefused(f"{self.archive}: {what} {name[:200]!r} is not JSON: {exc}") from None

    @contextmanager
    def chunks(self, name: str) -> Iterator[Iterable[bytes]]:
        handle = self.tar.extractfile(self.members[name])
        yield iter(lambda: handle.read(_CHUNK), b"")

    def opener(self, name: str) -> Callable[[], AbstractContextManager[Iterable[bytes]]]:
        return lambda: self.chunks(name)

    # -- oci-archive: index.json → (index →) manifest → config and layers, all by digest

    def blob_name(self, descriptor: Any, what: str) -> str:
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        size = descriptor.get("size") if isinstance(descriptor, dict) else None
        if not (isinstance(digest, str) and DIGEST.fullmatch(digest) and digest.startswith("sha256:")):
            raise ImportRefused(f"{self.archive}: the {what} has no valid sha256 digest")
        if not isinstance(size, int) or size < 0:
            raise ImportRefused(f"{self.archive}: the {what} {digest[:19]} has no valid size")
        name = f"blobs/sha256/{digest.removeprefix('sha256:')}"
        if self.member(name, what).size != size:
            raise ImportRefused(f"{self.archive}: the {what} {digest[:19]} is not of its size {size}")
        return name

    def oci_image(self, platform: tuple[str, str]) -> tuple[bytes, list[_LayerSource]]:
        document = self.json("index.json", "the index")
        media_type, depth = OCI_INDEX_TYPE, 0
        while media_type in INDEX_TYPES:
            depth += 1
            if depth > 3:
                raise ImportRefused(f"{self.archive}: image indexes nested more than 3 deep")
            entry = _pick(document, platform, self.archive)
            media_type = entry.get("mediaType")
            name = self.blob_name(entry, "manifest")
            document = self.json(name, "manifest", entry["digest"])
        if media_type not in MANIFEST_TYPES:
            raise ImportRefused(f"{self.archive}: manifest of media type {str(media_type)[:100]!r} is not an image")
        config_name = self.blob_name(document.get("config"), "config")
        config = self.read(config_name, "config", document["config"]["digest"])
        layers = []
        for descriptor in _layer_list(document, self.archive, self.limits):
            if descriptor.get("urls"):
                raise ImportRefused(f"{self.archive}: a layer is stored outside the archive (foreign layer)")
            name = self.blob_name(descriptor, "layer")
            layer_type = descriptor.get("mediaType")
            if layer_type not in LAYER_COMPRESSION:
                raise ImportRefused(
                    f"{self.archive}: layer {descriptor['digest'][:19]} has media type "
                    f"{str(layer_type)[:100]!r}, not a tar (uncompressed, gzip or zstd)"
                )
            digest, size = descriptor["digest"], descriptor["size"]
            layers.append(_LayerSource(self.opener(name), layer_type, digest, size, digest[:19]))
        return config, layers

    # -- docker-archive: manifest.json names the config and layer files

    def docker_image(self) -> tuple[bytes, list[_LayerSource]]:
        images = self.json("manifest.json", "manifest.json")
        if not isinstance(images, list) or not images:
            raise ImportRefused(f"{self.archive}: manifest.json lists no image")
        if len(images) > 1:
            raise ImportRefused(f"{self.archive}: manifest.json lists {len(images)} images; save one image at a time")
        image = images[0]
        if not isinstance(image, dict) or not isinstance(image.get("Config"), str):
            raise ImportRefused(f"{self.archive}: manifest.json names no config")
        if image.get("LayerSources"):
            raise ImportRefused(f"{self.archive}: a layer is stored outside the archive (foreign layer)")
        config_name = image["Config"]
        # Its name is its digest (<hex>.json, or blobs/sha256/<hex>): hold it to that.
        named = re.search(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$", config_name)
        config = self.read(config_name, "config", f"sha256:{named[1]}" if named else None)
        names = image.get("Layers")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ImportRefused(f"{self.archive}: manifest.json lists no layers")
        if len(names) > self.limits.max_layers:
            raise ImportRefused(f"{self.archive}: {len(names)} layers, more than {self.limits.max_layers}")
        layers = []
        for name in names:
            member = self.member(name, "layer").name.removeprefix("./")
            hexed = re.search(r"(?:^|/)blobs/sha256/([0-9a-f]{64})$", member)
            digest = f"sha256:{hexed[1]}" if hexed else None  # Docker 25+: named by its digest
            layers.append(_LayerSource(self.opener(member), None, digest, None, member))
        return config, layers


OCI_INDEX_TYPE = INDEX_TYPES[0]


def _pick(index: Any, platform: tuple[str, str], archive: str) -> dict[str, Any]:
    """The index entry for ``platform``, or its only image."""
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ImportRefused(f"{archive}: an index lists no manifests")
    if len(entries) > 1000:
        raise ImportRefused(f"{archive}: an index lists more than 1000 manifests")
    wanted = [e for e in entries if _platform(e) == platform]
    if wanted:
        return wanted[0]
    # Attestations (unknown/unknown) and other platforms aside, an entry without one is the image.
    plain = [e for e in entries if not e.get("platform")]
    if len(plain) == 1:
        return plain[0]
    offered = sorted({"/".join(_platform(e)) for e in entries if e.get("platform")} - {"unknown/unknown"})
    if plain:
        raise ImportRefused(f"{archive} holds {len(plain)} images; import an archive of one image")
    raise ImportRefused(
        f"{archive} has no image for {platform[0]}/{platform[1]} "
        f"(it has {', '.join(offered) or 'none'}): use --platform"
    )


def _platform(entry: dict[str, Any]) -> tuple[str, str]:
    plat = entry.get("platform") if isinstance(entry.get("platform"), dict) else {}
    return str(plat.get("os")), str(plat.get("architecture"))


def _layer_list(manifest: Any, source: str, limits: ImportLimits) -> list[dict[str, Any]]:
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not all(isinstance(d, dict) for d in layers):
        raise ImportRefused(f"{source}: the manifest lists no layers")
    if len(layers) > limits.max_layers:
        raise ImportRefused(f"{source}: {len(layers)} layers, more than {limits.max_layers}")
    return layers


# -- a registry ------------------------------------------------------------------------------


def import_reference(
    store: Store,
    registry: str,
    reference: str,
    repository: str,
    tag: str,
    log: Log,
    *,
    policy: Any,
    login: tuple[str, str] | None = None,
    platform: tuple[str, str] = ("linux", "amd64"),
    limits: ImportLimits = ImportLimits(),
) -> Imported:
    """Import ``reference`` from a registry the fetch ``policy`` lets the service reach."""
    try:
        ref = ImageReference.parse(reference)
    except ValueError as exc:
        raise ImportRefused(str(exc)) from None
    username, password = login or (None, None)
    with RemoteRegistryClient(ref.host, username, password, policy=policy) as source:
        try:
            manifest = source.get_manifest(ref.repository, ref.reference, platform=platform)
            if manifest.media_type not in MANIFEST_TYPES:
                raise ImportRefused(f"{reference}: manifest of media type {manifest.media_type!r} is not an image")
            descriptor = manifest.body.get("config")
            digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
            if not (isinstance(digest, str) and DIGEST.fullmatch(digest)):
                raise ImportRefused(f"{reference}: the manifest has no valid config digest")
            config = source.get_blob(ref.repository, digest, max_bytes=limits.max_json_bytes)
            layers = []
            for layer in _layer_list(manifest.body, reference, limits):
                if layer.get("urls"):
                    raise ImportRefused(f"{reference}: a layer is stored outside the registry (foreign layer)")
                digest, size, media_type = layer.get("digest"), layer.get("size"), layer.get("mediaType")
                if not (isinstance(digest, str) and DIGEST.fullmatch(digest) and isinstance(size, int) and size >= 0):
                    raise ImportRefused(f"{reference}: a layer has no valid digest or size")
                if media_type not in LAYER_COMPRESSION:
                    raise ImportRefused(
                        f"{reference}: layer {digest[:19]} has media type {str(media_type)[:100]!r}, "
                        "not a tar (uncompressed, gzip or zstd)"
                    )
                opener = _registry_opener(source, ref.repository, digest)
                layers.append(_LayerSource(opener, media_type, digest, size, digest[:19]))
            log(f"mms: importing {ref} ({manifest.digest}, {len(layers)} layers)")
            return _import(store, registry, repository, tag, config, layers, log, limits, source=str(ref))
        except RemoteRegistryError as exc:
            raise ImportRefused(f"{reference}: {exc}") from None


def _registry_opener(
    source: RemoteRegistryClient, repository: str, digest: str
) -> Callable[[], AbstractContextManager[Iterable[bytes]]]:
    return lambda: source.open_blob(repository, digest)


# -- the import itself ------------------------------------------------------------------------


def _import(
    store: Store,
    registry: str,
    repository: str,
    tag: str,
    config_raw: bytes,
    sources: list[_LayerSource],
    log: Log,
    limits: ImportLimits,
    *,
    source: str,
) -> Imported:
    config = _checked_config(config_raw, len(sources), source)
    diff_ids = config["rootfs"]["diff_ids"]
    with tempfile.TemporaryDirectory(prefix="mms-import-") as tmp:
        work = Path(tmp)
        budget = [limits.max_bytes]  # what all layers may still take, read and uncompressed
        staged = [
            _stage(layer, diff_id, work / f"layer-{n}", source, budget)
            for n, (layer, diff_id) in enumerate(zip(sources, diff_ids, strict=True))
        ]
        labels = dict((config.get("config") or {}).get("Labels") or {})
        python = None
        try:
            target = detect_target(config, lambda: [_opened(s) for s in staged], base=source)
        except BuildFailed as exc:  # imported all the same: a RUN step may install Python
            log(f"mms: warning: {exc.message}; builds on this image need a Python of their own")
        else:
            python = target.version
            labels |= {"org.mms.python": target.version, "org.mms.libc": target.libc}
            log(f"mms: {target.describe()}")
        # The source's config, labelled (its digest changes: it is the imported image's own).
        image_config = config.get("config") if isinstance(config.get("config"), dict) else {}
        config["config"] = {**image_config, "Labels": labels}
        raw = json.dumps(config, separators=(",", ":")).encode()
        # Checked and staged: only now does anything go to the store.
        prefix = registry.rstrip("/").partition("/")[2]
        repo = f"{prefix}/{repository}" if prefix else repository
        for blob in staged:
            how = store.push_blob(repo, blob.digest, blob.size, file_chunks(blob.path))
            log(f"mms: layer {blob.digest[:19]} ({blob.size} bytes) {how}")
        descriptors = [{"mediaType": s.media_type, "digest": s.digest, "size": s.size} for s in staged]
        digest = put_image(store, repo, tag, OCI, raw, descriptors)
    reference = f"{registry.rstrip('/')}/{repository}:{tag}"
    size = len(raw) + sum(s.size for s in staged)
    log(f"mms: imported {reference} {digest} ({size} bytes)")
    logger.info("base_image.imported", extra={"image": reference, "digest": digest})
    return Imported(reference, digest, size, python)


def _checked_config(raw: bytes, layers: int, source: str) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImportRefused(f"{source}: the image config is not JSON: {exc}") from None
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and DIGEST.fullmatch(d) for d in diff_ids):
        raise ImportRefused(f"{source}: the image config has no valid rootfs.diff_ids")
    if len(diff_ids) != layers:
        raise ImportRefused(f"{source}: the image config lists {len(diff_ids)} layers, the manifest {layers}")
    if config.get("os", "linux") != "linux":
        raise ImportRefused(f"{source}: the image is for {str(config.get('os'))[:40]}, not linux")
    if "config" in config and not isinstance(config["config"], dict | None):
        raise ImportRefused(f"{source}: the image config's config is not an object")
    labels = (config.get("config") or {}).get("Labels")
    if labels is not None and not (
        isinstance(labels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        raise ImportRefused(f"{source}: the image config's labels are not strings")
    return config


class _Budget(Exception):
    pass


def _stage(layer: _LayerSource, diff_id: str, dest: Path, source: str, budget: list[int]) -> _Staged:
    """Read ``layer`` once into ``dest`` (gzipped when it is a plain tar), checking its digest,
    size and uncompressed digest; what it is stored as."""
    what = f"{source}: layer {layer.name[:120]}"

    def counted(chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise _Budget
            yield chunk

    raw_hash, raw_size = hashlib.sha256(), 0
    try:
        with layer.open() as chunks:
            stream = counted(chunks)
            first = next(stream, b"")
            media_type = layer.media_type or _sniff(first)
            compression = LAYER_COMPRESSION[media_type]
            if compression is None:
                # A plain tar: its digest is its diff_id; stored gzipped, as the builders' own layers.
                out_hash = _HashingFile(dest.open("wb"))
                with out_hash, ParallelGzip(out_hash, 6) as gz:  # type: ignore[arg-type]
                    for chunk in _chain(first, stream):
                        raw_hash.update(chunk)
                        raw_size += len(chunk)
                        gz.write(chunk)
                stored = _Staged(dest, f"sha256:{out_hash.hash.hexdigest()}", out_hash.size, OCI_LAYER)
            else:
                with dest.open("wb") as out:
                    for chunk in _chain(first, stream):
                        raw_hash.update(chunk)
                        raw_size += len(chunk)
                        out.write(chunk)
                stored_type = OCI_LAYER if compression == "gzip" else OCI_LAYER_ZSTD
                stored = _Staged(dest, f"sha256:{raw_hash.hexdigest()}", raw_size, stored_type)
    except _Budget:
        raise ImportRefused(f"{source}: the image's layers are larger than the limit, read and uncompressed") from None
    except RemoteRegistryError as exc:
        raise ImportRefused(f"{what}: {exc}") from None
    digest = f"sha256:{raw_hash.hexdigest()}"
    if layer.digest is not None and digest != layer.digest:
        raise ImportRefused(f"{what} does not match its digest {layer.digest} (its content is {digest})")
    if layer.size is not None and raw_size != layer.size:
        raise ImportRefused(f"{what} is {raw_size} bytes, not the {layer.size} its manifest says")
    if compression is None:
        uncompressed = digest
    else:
        uncompressed = _uncompressed_digest(dest, media_type, what, budget)
    if uncompressed != diff_id:
        raise ImportRefused(f"{what}: its tar's digest {uncompressed} is not the config's diff_id {diff_id}")
    return stored


def _sniff(first: bytes) -> str:
    if first.startswith(_GZIP_MAGIC):
        return DOCKER_LAYER
    if first.startswith(_ZSTD_MAGIC):
        return OCI_LAYER_ZSTD
    return OCI_LAYER_TAR


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _uncompressed_digest(path: Path, media_type: str, what: str, budget: list[int]) -> str:
    hasher = hashlib.sha256()
    try:
        with _opened_file(path, media_type) as tar:
            while block := tar.read(_CHUNK):
                budget[0] -= len(block)
                if budget[0] < 0:
                    raise ImportRefused(f"{what}: the image's layers are larger than the limit, read and uncompressed")
                hasher.update(block)
    except UNREADABLE_LAYER as exc:
        raise ImportRefused(f"{what} is not a readable compressed tar: {type(exc).__name__}: {exc}") from None
    return f"sha256:{hasher.hexdigest()}"


@contextmanager
def _opened_file(path: Path, media_type: str) -> Iterator[BinaryIO]:
    chunks = file_chunks(path)()
    try:
        yield tar_reader(chunks, media_type)
    finally:
        chunks.close()


def _opened(staged: _Staged) -> AbstractContextManager[BinaryIO]:
    return _opened_file(staged.path, staged.media_type)


class _HashingFile:
    """A file that hashes and counts what is written to it (the gzip blob's digest)."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.hash, self.size = sink, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.sink.write(data)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sink.close()


def _sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
