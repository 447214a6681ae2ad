"""The image store's OCI image layout, holding many repositories: the builder writes it, ``/v2/`` reads it.

On disk (https://github.com/opencontainers/image-spec/blob/main/image-layout.md):

    oci-layout                          {"imageLayoutVersion": "1.0.0"}
    index.json                          one descriptor per tag, annotated
                                        org.opencontainers.image.ref.name = "<repository>:<tag>"
    blobs/sha256/<hex>                  content-addressed, shared by every repository
    repositories/<name>/_layers/sha256/<hex>     blobs the repository may serve (empty files)
    repositories/<name>/_manifests/sha256/<hex>  its manifests (the file holds the media type)
    .incoming/                          files being written, renamed into place when complete
    .index.lock                         serialises read-modify-write of index.json (flock)

Several processes may write at once: a blob or a link appears by renaming a complete file
into place, and index.json is rewritten under an exclusive lock and renamed over the old
one, so readers (who never lock) see the old index or the new one, never half of either.
The per-repository links mirror Distribution's: a blob is served under a repository only
if one of its manifests references it, so a digest learnt from one tenant's image cannot
be read through another repository.

Untagging leaves blobs and links behind; ``collect_garbage`` removes what no tag reaches.
A writer touches (mtime) every blob and link it relies on, and the collector spares what
was touched within a grace period, so a build pushing meanwhile keeps its blobs: the
collector holds the index lock while it sweeps, and ``put_manifest`` checks again under
that lock that everything it references is still there before the tag appears.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_MEDIA_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "REF_NAME_ANNOTATION",
    "CollectedGarbage",
    "Descriptor",
    "OciLayout",
    "check_digest",
    "check_repository",
    "check_tag",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST})
_INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

# The distribution spec's grammar; a component starts and ends with [a-z0-9], so no
# component can be "." or ".." or collide with the "_layers"/"_manifests" folders.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
MAX_REPOSITORY_LENGTH = 255
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # what the distribution spec asks registries to accept
_MAX_INDEX_DEPTH = 2  # an index of image manifests, or of indexes of them
_CHUNK = 1024 * 1024
# index.json is re-parsed unless unchanged: a rewrite within one timestamp tick may reuse
# the inode and size of the one before, so only a file this old is trusted to the cache.
_CACHE_MIN_AGE_NS = 2_000_000_000


def check_repository(name: str) -> str:
    """``name`` if it is a valid repository name, else ValueError."""
    if not isinstance(name, str) or len(name) > MAX_REPOSITORY_LENGTH or not _REPOSITORY.fullmatch(name):
        raise ValueError(
            f"invalid repository name {name!r}: lower-case letters and digits separated by "
            "'.', '_', '__', '-' or '/', at most 255 characters"
        )
    return name


def check_tag(tag: str) -> str:
    """``tag`` if it is a valid tag, else ValueError."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise ValueError(f"invalid tag {tag!r}: 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'")
    return tag


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:`` and 64 lower-case hex digits, else ValueError."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"invalid digest {digest!r}: expected sha256: and 64 lower-case hex digits")
    return digest


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, which one, and how big."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            body["annotations"] = dict(self.annotations)
        return body


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ValueError(f"{where} is not a descriptor object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ValueError(f"{where} has no mediaType")
    try:
        check_digest(digest)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"{where} has no valid size")
    return Descriptor(media_type, digest, size)


def _references(content: bytes, media_type: str) -> list[Descriptor]:
    """The descriptors a manifest or index points at; ValueError when it is not one."""
    if media_type not in MANIFEST_MEDIA_TYPES:
        raise ValueError(f"unsupported manifest media type {media_type!r}; use one of {sorted(MANIFEST_MEDIA_TYPES)}")
    if len(content) > MAX_MANIFEST_BYTES:
        raise ValueError(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        document = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the manifest is not valid JSON") from None
    if not isinstance(document, dict) or document.get("schemaVersion") != 2:
        raise ValueError("the manifest is not a JSON object with schemaVersion 2")
    if document.get("mediaType", media_type) != media_type:
        raise ValueError(f"the manifest says mediaType {document.get('mediaType')!r}, not {media_type!r}")
    if media_type in _INDEX_TYPES:
        children = document.get("manifests")
        if not isinstance(children, list):
            raise ValueError("the index has no manifests list")
        return [_descriptor(child, f"manifests[{i}]") for i, child in enumerate(children)]
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise ValueError("the manifest has no layers list")
    return [_descriptor(document.get("config"), "config")] + [
        _descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers)
    ]


def _ref_name(entry: Any) -> str | None:
    annotations = entry.get("annotations") if isinstance(entry, dict) else None
    value = annotations.get(REF_NAME_ANNOTATION) if isinstance(annotations, dict) else None
    return value if isinstance(value, str) else None


def _split_ref_name(ref_name: str) -> tuple[str, str] | None:
    """``(repository, tag)`` of a ref name we wrote; None for anyone else's (e.g. ``latest``)."""
    repository, _, tag = ref_name.rpartition(":")
    if _REPOSITORY.fullmatch(repository) and _TAG.fullmatch(tag):
        return repository, tag
    return None


@dataclass
class CollectedGarbage:
    """What ``collect_garbage`` removed."""

    blobs: int = 0
    bytes: int = 0
    links: int = 0
    staging_files: int = 0
    tags: int = 0  # tags of images whose record is gone (counted by the caller that removed them)


def _touch(path: Path) -> bool:
    """Mark ``path`` as in use now (the collector spares it); whether it exists."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class OciLayout:
    """One OCI image layout directory; nothing is created on disk before the first write."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self._repositories = self.root / "repositories"
        self._incoming = self.root / ".incoming"
        self._index_path = self.root / "index.json"
        self._lock_path = self.root / ".index.lock"
        # (inode, mtime, size) of the parsed index.json -> {repository: {tag: descriptor}}
        self._tag_cache: tuple[tuple[int, int, int], dict[str, dict[str, Descriptor]]] | None = None

    # -- blobs --------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob with this digest lives (whether or not it is there)."""
        return self._blobs / check_digest(digest).removeprefix("sha256:")

    def has_blob(self, digest: str) -> int | None:
        """The blob's size, or None when the layout does not hold it."""
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: str) -> BinaryIO:
        """The blob opened for reading; FileNotFoundError when absent."""
        return self.blob_path(digest).open("rb")

    def put_blob_file(self, src: Path, digest: str) -> None:
        """Store the file ``src`` as the blob ``digest`` (ValueError if its sha256 differs).

        On the same file system the blob is a hard link to ``src``, so ``src`` must not be
        changed afterwards (replace or delete it instead); elsewhere it is copied.
        """
        target = self.blob_path(digest)
        if _touch(target):
            return
        self._ensure_layout()
        staging = self._staging_path()
        try:
            try:
                os.link(src, staging)
                actual = _sha256_file(staging)
            except FileNotFoundError:
                raise
            except OSError:  # another file system, or one without hard links: copy
                actual = self._copy_hashing(Path(src), staging)
            if actual != digest:
                raise ValueError(f"{Path(src).name} has digest {actual}, not {digest}")
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)

    def put_blob_bytes(self, data: bytes) -> str:
        """Store ``data`` as a blob and return its digest."""
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if not _touch(self.blob_path(digest)):
            self._ensure_layout()
            self._write_atomic(self.blob_path(digest), data)
        return digest

    # -- repositories -------------------------------------------------------------------

    def link_blob(self, repository: str, digest: str) -> None:
        """Let ``repository`` serve the blob ``digest`` (ValueError if the layout lacks it)."""
        path = self._link_path(repository, "_layers", digest)
        if not _touch(self.blob_path(digest)):
            raise ValueError(f"blob {digest} is not in the layout")
        if _touch(path):
            return
        self._ensure_layout()
        self._write_atomic(path, b"")

    def is_linked(self, repository: str, digest: str) -> bool:
        """Whether ``repository`` may serve the blob ``digest``."""
        return self._link_path(repository, "_layers", digest).exists()

    def put_manifest(self, repository: str, tag: str, manifest: bytes, media_type: str) -> str:
        """Store a manifest (or index) and point ``repository:tag`` at it; returns its digest.

        Every blob it references must be in the layout already (ValueError naming the first
        one missing); they are linked to the repository before the tag becomes visible.
        """
        check_repository(repository)
        check_tag(tag)
        self._link_references(repository, manifest, media_type, depth=0)
        digest = self.put_blob_bytes(manifest)
        self._link_manifest(repository, digest, media_type)
        ref_name = f"{repository}:{tag}"
        entry = Descriptor(media_type, digest, len(manifest), {REF_NAME_ANNOTATION: ref_name}).to_json()

        def retag(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # Under the lock the collector sweeps with: what it took is gone for good.
            self._check_still_there(repository, digest, media_type)
            return [e for e in entries if _ref_name(e) != ref_name] + [entry]

        self._update_index(retag)
        return digest

    def resolve(self, repository: str, reference: str) -> Descriptor | None:
        """The manifest a tag or a ``sha256:`` digest names in ``repository``, or None.

        A digest resolves only if it is one of this repository's manifests.
        """
        check_repository(repository)
        if ":" in reference:
            media_type = self._manifest_media_type(repository, check_digest(reference))
            size = self.has_blob(reference) if media_type else None
            return Descriptor(media_type, reference, size) if media_type and size is not None else None
        check_tag(reference)
        return self._tag_map().get(repository, {}).get(reference)

    def tags(self, repository: str) -> list[str]:
        """The repository's tags, sorted."""
        return sorted(self._tag_map().get(check_repository(repository), {}))

    def repositories(self) -> list[str]:
        """The repositories with at least one tag, sorted."""
        return sorted(self._tag_map())

    def has_repository(self, repository: str) -> bool:
        """Whether ``repository`` holds a tag or ever held a manifest."""
        check_repository(repository)
        return repository in self._tag_map() or (self._repositories / repository / "_manifests").is_dir()

    def delete_tag(self, repository: str, tag: str) -> bool:
        """Remove ``repository:tag`` from the index; whether it was there. Blobs stay."""
        ref_name = f"{check_repository(repository)}:{check_tag(tag)}"
        if not self._index_path.exists():
            return False
        removed = False

        def without(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
            nonlocal removed
            kept = [e for e in entries if _ref_name(e) != ref_name]
            removed = len(kept) != len(entries)
            return kept

        self._update_index(without)
        return removed

    def delete_stale_tags(self, refs: Iterable[tuple[str, str]], *, untouched_since: float) -> list[str]:
        """Remove the tags ``refs`` ((repository, tag) pairs) whose manifest nobody put since
        ``untouched_since`` (a ``time.time()``); the ``repository:tag`` names removed.

        Decided under the index lock, by the manifest link's mtime (``put_manifest`` touches
        it before the tag goes in), so a tag put again meanwhile stays. A tag whose manifest
        is not linked serves nothing and goes.
        """
        wanted = {f"{check_repository(repository)}:{check_tag(tag)}" for repository, tag in refs}
        removed: list[str] = []
        if not wanted or not self._index_path.exists():
            return removed

        def stale(entry: dict[str, Any], ref_name: str) -> bool:
            try:
                link = self._link_path(ref_name.rpartition(":")[0], "_manifests", entry.get("digest"))
                return link.stat().st_mtime < untouched_since
            except ValueError:  # an entry someone else wrote badly: not ours to judge
                return False
            except FileNotFoundError:
                return True

        def without(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
            kept = []
            for entry in entries:
                ref_name = _ref_name(entry)
                if ref_name in wanted and stale(entry, ref_name):
                    removed.append(ref_name)
                else:
                    kept.append(entry)
            return kept

        self._update_index(without)
        return removed

    def touch_blob(self, repository: str, digest: str) -> None:
        """Mark a blob a writer relies on, and its link in ``repository`` if any, as in use."""
        _touch(self.blob_path(digest))
        _touch(self._link_path(repository, "_layers", digest))

    def collect_garbage(self, *, grace_seconds: float, now: float | None = None) -> CollectedGarbage:
        """Remove blobs, repository links and staging files that no tag reaches and that
        nothing touched for ``grace_seconds`` (a build pushing now keeps its blobs)."""
        done = CollectedGarbage()
        if not self._index_path.exists():
            return done
        cutoff = (time.time() if now is None else now) - grace_seconds

        def old(path: Path) -> bool:
            try:
                return path.stat().st_mtime < cutoff
            except FileNotFoundError:
                return False

        with self._index_lock():
            self._tag_cache = None
            reached: dict[str, set[str]] = {}  # repository → digests its tags reach
            for repository, tags in self._tag_map().items():
                for descriptor in tags.values():
                    self._reach(
                        descriptor.digest, descriptor.media_type, reached.setdefault(repository, set()), depth=0
                    )
            live = set().union(*reached.values()) if reached else set()
            if self._repositories.is_dir():
                for kind in ("_layers", "_manifests"):
                    for folder in self._repositories.rglob(kind):
                        repository = folder.parent.relative_to(self._repositories).as_posix()
                        for link in (folder / "sha256").glob("*"):
                            if f"sha256:{link.name}" not in reached.get(repository, ()) and old(link):
                                link.unlink(missing_ok=True)
                                done.links += 1
            if self._blobs.is_dir():
                for blob in self._blobs.iterdir():
                    if f"sha256:{blob.name}" not in live and old(blob):
                        size = blob.stat().st_size
                        blob.unlink(missing_ok=True)
                        done.blobs, done.bytes = done.blobs + 1, done.bytes + size
            if self._incoming.is_dir():
                for staging in self._incoming.iterdir():
                    if old(staging):
                        staging.unlink(missing_ok=True)
                        done.staging_files += 1
        return done

    # -- internals ----------------------------------------------------------------------

    def _reach(self, digest: str, media_type: str, found: set[str], *, depth: int) -> None:
        """Add ``digest`` and everything it references (an index's children too) to ``found``."""
        found.add(digest)
        if media_type not in MANIFEST_MEDIA_TYPES:
            return
        try:
            references = _references(self.blob_path(digest).read_bytes(), media_type)
        except (FileNotFoundError, ValueError):
            return  # a broken manifest reaches nothing more; the collector removes nothing it names
        for reference in references:
            if reference.media_type in MANIFEST_MEDIA_TYPES and depth < _MAX_INDEX_DEPTH:
                self._reach(reference.digest, reference.media_type, found, depth=depth + 1)
            else:
                found.add(reference.digest)

    def _check_still_there(self, repository: str, digest: str, media_type: str) -> None:
        needed: set[str] = set()
        self._reach(digest, media_type, needed, depth=0)
        for blob in sorted(needed):
            linked = (
                self._link_path(repository, "_layers", blob).exists()
                or self._link_path(repository, "_manifests", blob).exists()
            )
            if self.has_blob(blob) is None or not linked:
                raise ValueError(
                    f"blob {blob} was removed while the manifest was stored (garbage collection); push the image again"
                )

    def _link_path(self, repository: str, kind: str, digest: str) -> Path:
        hex_digest = check_digest(digest).removeprefix("sha256:")
        return self._repositories / check_repository(repository) / kind / "sha256" / hex_digest

    def _link_manifest(self, repository: str, digest: str, media_type: str) -> None:
        path = self._link_path(repository, "_manifests", digest)
        if not _touch(path):
            self._write_atomic(path, media_type.encode())

    def _manifest_media_type(self, repository: str, digest: str) -> str | None:
        try:
            media_type = self._link_path(repository, "_manifests", digest).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return media_type if media_type in MANIFEST_MEDIA_TYPES else None

    def _link_references(self, repository: str, content: bytes, media_type: str, *, depth: int) -> None:
        """Check every blob ``content`` references is present, then link them (children of an
        index recursively, since a client pulls the child manifests and their layers too)."""
        references = _references(content, media_type)
        for reference in references:
            size = self.has_blob(reference.digest)
            if size is None:
                raise ValueError(f"the manifest references blob {reference.digest}, which is not in the layout")
            if size != reference.size:
                raise ValueError(f"blob {reference.digest} is {size} bytes, the manifest says {reference.size}")
        self._ensure_layout()
        for reference in references:
            if media_type in _INDEX_TYPES and reference.media_type in MANIFEST_MEDIA_TYPES:
                if depth >= _MAX_INDEX_DEPTH:
                    raise ValueError("image indexes are nested too deeply")
                child = self.blob_path(reference.digest).read_bytes()
                self._link_references(repository, child, reference.media_type, depth=depth + 1)
                self._link_manifest(repository, reference.digest, reference.media_type)
            else:
                self.link_blob(repository, reference.digest)

    def _tag_map(self) -> dict[str, dict[str, Descriptor]]:
        try:
            with self._index_path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                cached = self._tag_cache
                if cached is not None and cached[0] == key:
                    return cached[1]
                index = json.loads(handle.read())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise RuntimeError(f"{self._index_path} is not valid JSON") from None
        tags: dict[str, dict[str, Descriptor]] = {}
        for entry in index.get("manifests", []) if isinstance(index, dict) else []:
            ref_name = _ref_name(entry)
            parsed = _split_ref_name(ref_name) if ref_name else None
            if ref_name is None or parsed is None:
                continue
            try:
                found = _descriptor(entry, ref_name)
            except ValueError:
                continue  # an entry someone else wrote badly is not ours to serve
            repository, tag = parsed
            annotations = {REF_NAME_ANNOTATION: ref_name}
            tags.setdefault(repository, {})[tag] = Descriptor(found.media_type, found.digest, found.size, annotations)
        if time.time_ns() - stat.st_mtime_ns > _CACHE_MIN_AGE_NS:
            self._tag_cache = (key, tags)
        return tags

    def _update_index(self, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
        self._ensure_layout()
        with self._index_lock():
            index = self._load_index()
            entries = [e for e in index.get("manifests", []) if isinstance(e, dict)]
            changed = change(entries)
            if changed != entries:
                index["manifests"] = changed
                self._write_atomic(self._index_path, json.dumps(index, indent=2).encode())

    def _load_index(self) -> dict[str, Any]:
        try:
            index = json.loads(self._index_path.read_bytes())
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        except ValueError:
            raise RuntimeError(f"{self._index_path} is not valid JSON; not overwriting it") from None
        if not isinstance(index, dict):
            raise RuntimeError(f"{self._index_path} is not an image index; not overwriting it")
        return index

    @contextmanager
    def _index_lock(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _ensure_layout(self) -> None:
        """Make the layout's skeleton on first write; spec-valid (oci-layout, index.json) at once."""
        if self._index_path.exists() and self._incoming.is_dir():
            return
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._incoming.mkdir(parents=True, exist_ok=True)
        if not (self.root / "oci-layout").exists():
            version = json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
            self._write_atomic(self.root / "oci-layout", version)
        if not self._index_path.exists():
            with self._index_lock():
                if not self._index_path.exists():
                    empty = json.dumps(self._load_index(), indent=2).encode()
                    self._write_atomic(self._index_path, empty)

    def _staging_path(self) -> Path:
        return self._incoming / f"{os.getpid()}-{secrets.token_hex(8)}"

    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = self._staging_path()
        try:
            with staging.open("xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)

    @staticmethod
    def _copy_hashing(src: Path, staging: Path) -> str:
        digest = hashlib.sha256()
        with src.open("rb") as source, staging.open("xb") as target:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                target.write(chunk)
            target.flush()
            os.fsync(target.fileno())
        return f"sha256:{digest.hexdigest()}"
