"""The Python environment layer: which Python the base image has, and its packages as wheels.

The target is read from the base image, never from the worker: from its layers (the
``python3`` a lookup along the config's own ``PATH`` finds, symlinks followed inside the
layers, and the C library: glibc's version string inside ``libc.so.6``, or musl's loader,
which is refused), its labels or ``Env`` (``org.mms.python``, ``PYTHON_VERSION`` as the
official images set) only filling in what the layers do not tell: an image built FROM a base
inherits them. The glibc version maps to the highest manylinux level
uv accepts that is not above it (glibc 2.27 installs manylinux_2_17 wheels). Packages are
installed with
``uv pip install --target --python-version --python-platform --only-binary :all:``, which
evaluates environment markers for the target (plain pip evaluates them for the host, pip
issue 11664), then console-script shebangs are rewritten so no worker path ships.

A few pure-Python projects publish source distributions only (pyspark): their wheels are
built once per worker with pip (a pure-Python wheel fits every target) and offered to uv
with ``--find-links``, so the whole environment still resolves together, from wheels.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

import requests
import uv
import zstandard
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, parse_wheel_filename
from packaging.version import InvalidVersion, Version
from pypi_simple import DigestMismatchError, NoSuchProjectError, PyPISimple

from workers.build_context import REQUIREMENT_FILES
from workers.builders import BuildFailed, Log
from workers.oci.media import LAYER_COMPRESSION
from workers.sandbox import Limits, SandboxFailed, run_contained

__all__ = [
    "LAYOUT_VERSION",
    "TargetPython",
    "dependency_cache_key",
    "detect_java",
    "detect_target",
    "install_dependencies",
    "source_only",
    "tar_reader",
]

DEFAULT_INDEX_URL = "https://pypi.org/simple"
LAYOUT_VERSION = "1"  # bump when the dependency layer's layout changes: old cache entries retire
SITE_PACKAGES = "/opt/mms/site-packages"
_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}
_VERSION = re.compile(r"(\d+)\.(\d+)")
_PYTHON_NAME = re.compile(r"python3(?:\.(\d+))?")
_PATH_DIR = re.compile(r"/[A-Za-z0-9._+@/-]*")
_LIBC = re.compile(r"^(?:\./)?(?:usr/)?lib(?:64)?/(?:[a-z0-9_]+-linux-gnu/)?(libc\.so\.6|libc-(\d+)\.(\d+)\.so)$")
_MUSL = re.compile(r"^(?:\./)?lib/ld-musl-[a-z0-9_]+\.so\.1$")
_GLIBC_VERSION = re.compile(rb"version (\d+)\.(\d+)")


def glibc_banner(data: bytes) -> tuple[int, int] | None:
    """The version in libc's "GNU C Library ... version 2.36" banner line. Found with find(),
    one line at a time: a lazy regex over a tenant's 16 MiB file took minutes."""
    start = data.find(b"GNU C Library")
    while start != -1:
        end = data.find(b"\n", start)
        found = _GLIBC_VERSION.search(data, start, end if end != -1 and end - start < 4096 else start + 4096)
        if found:
            return int(found[1]), int(found[2])
        start = data.find(b"GNU C Library", start + 1)
    return None


_NO_WHEEL = (
    re.compile(r"Wheels are required for `([^`]+)`"),
    re.compile(r"Because (\S+?)(?:[=<>!~][^ ]*)? has no (?:usable )?wheels"),
    re.compile(r"Because (\S+?)(?:[=<>!~][^ ]*)? has no wheels with a matching"),
)
_NOT_FOUND = re.compile(r"Because (\S+) was not found in the package registry")
_MAX_LIBC_READ = 16 << 20
# Where Debian, the Temurin and the former official openjdk images put a java launcher.
_JAVA_BIN = re.compile(
    r"^(?:\./)?(?:usr/bin/java|usr/lib/jvm/[^/]+/(?:jre/)?bin/java|"
    r"opt/java/[^/]+/bin/java|usr/local/openjdk-[^/]+/bin/java)$"
)
# Pure-Python projects published as source distributions only (their wheel is built here).
SOURCE_ONLY = frozenset({"pyspark"})
_NAME = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)")
_WHEEL_NAME = re.compile(r"[A-Za-z0-9_.+!-]+\.whl")
_SDIST_NAME = re.compile(r"[A-Za-z0-9_.+!-]+\.(?:tar\.gz|zip)")
_LOCAL_FILE = re.compile(r"file://" + re.escape(REQUIREMENT_FILES) + r"/(?P<name>[^#\s]+)(?:#\S*)?")


@dataclass(frozen=True)
class TargetPython:
    """The base image's Python, as uv names it."""

    version: str  # "3.11"
    platform: str  # uv's --python-platform, e.g. "x86_64-manylinux_2_36"
    # The interpreter the image runs: the path a PATH lookup in the base finds, else "python3"
    # (the version came from a label, so the base's own PATH finds it at run time).
    executable: str = "python3"
    libc: str = ""  # what the base has ("glibc-2.41"); the platform may name a lower level

    def describe(self) -> str:
        return f"Python {self.version} on {self.platform}"


Opener = AbstractContextManager[BinaryIO]  # opens one layer as its tar (see ``tar_reader``)

# The manylinux levels uv's --python-platform accepts (a test compares them with the uv this
# worker runs): a base's glibc maps to the highest one not above it, as wheels built for an
# older glibc run on a newer one.
MANYLINUX_LEVELS = (
    (2, 17),
    (2, 28),
    (2, 31),
    (2, 32),
    (2, 33),
    (2, 34),
    (2, 35),
    (2, 36),
    (2, 37),
    (2, 38),
    (2, 39),
    (2, 40),
)
MIN_PYTHON = (3, 8)  # the oldest Python the scoring server runs on (see SERVER_REQUIREMENTS)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Docker's, when the config has none


def detect_target(
    config: dict, layers: Callable[[], Iterable[Opener]], *, base: str = "the base image"
) -> TargetPython:
    """Read the target from the layers, ``config``'s labels and ENV filling in what they lack.

    ``layers()`` yields one opener per layer, base first; each opens the layer's tar. Python
    is the ``python3`` the config's own ``PATH`` finds, symlinks followed inside the layers.
    ``base`` names the image in error messages.
    """
    arch = _ARCH.get(config.get("architecture", "amd64"), config.get("architecture", "amd64"))
    labels = (config.get("config") or {}).get("Labels") or {}
    env = dict(e.split("=", 1) for e in (config.get("config") or {}).get("Env") or [] if "=" in e)
    # Absolute folders of plain characters only: the path found goes into a script and shebangs.
    search = [d for d in (env.get("PATH") or DEFAULT_PATH).split(":") if _PATH_DIR.fullmatch(d)]
    # The layers are the truth; the labels and PYTHON_VERSION only fill in what they cannot
    # tell. An image built FROM a base inherits its labels and ENV, so they may name the
    # base's Python while the PATH now finds another (a conda Python added on top).
    found, libc = _scan(layers(), search)
    executable, version = found if found is not None else ("python3", None)
    version = version or _short(labels.get("org.mms.python")) or _short(env.get("PYTHON_VERSION"))
    libc = libc or labels.get("org.mms.libc")
    if version is None and executable != "python3":
        raise BuildFailed(
            "environment",
            f"{base} has {executable} but no single python3.N beside it tells its version: "
            "label the image org.mms.python=3.N",
        )
    if version is None:
        raise BuildFailed(
            "environment",
            f"{base} has no python3 on its PATH ({':'.join(search)}); use a base image with Python "
            f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer",
        )
    if tuple(int(n) for n in version.split(".")) < MIN_PYTHON:
        raise BuildFailed(
            "environment",
            f"{base} has Python {version}; the scoring server needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer",
        )
    if libc is None:
        raise BuildFailed(
            "environment", f"cannot tell the C library of {base} (no glibc libc.so.6, no musl loader found)"
        )
    return TargetPython(version, platform_for(arch, libc, base), executable, libc)


def platform_for(arch: str, libc: str, base: str = "the base image") -> str:
    """uv's ``--python-platform`` for a base of ``arch`` (x86_64, aarch64) with ``libc``
    (``glibc-2.27``, ``musl``); BuildFailed, naming ``base``, for one it cannot serve."""
    if libc == "musl":
        raise BuildFailed(
            "environment",
            f"{base} uses musl libc (Alpine?): the oci builder installs manylinux wheels, which need "
            "glibc; use a glibc base image (Debian, Ubuntu, UBI), or the docker builder (builder: docker)",
        )
    if arch not in _ARCH.values():
        raise BuildFailed("environment", f"{base} is for {arch}; the oci builder supports amd64 and arm64 base images")
    match = re.fullmatch(r"glibc-(\d+)\.(\d+)(?:\.\d+)?", libc)
    if match is None:
        raise BuildFailed("environment", f"{base} has an unknown C library {libc!r} (expected glibc-2.N or musl)")
    have = (int(match[1]), int(match[2]))
    usable = [level for level in MANYLINUX_LEVELS if level <= have]
    if not usable:
        lowest = MANYLINUX_LEVELS[0]
        raise BuildFailed(
            "environment",
            f"{base} has glibc {have[0]}.{have[1]}, older than the oldest wheels uv installs "
            f"(manylinux glibc {lowest[0]}.{lowest[1]}); use a newer base image",
        )
    major, minor = usable[-1]
    return f"{arch}-manylinux_{major}_{minor}"


def _short(text: str | None) -> str | None:
    match = _VERSION.match(text or "")
    return f"{match[1]}.{match[2]}" if match else None


_OTHER = ""  # in a scanned tree: a path that is now neither a symlink nor a python file
_ABSENT = object()


def _scan(openers: Iterable[Opener], search: list[str]) -> tuple[tuple[str, str | None] | None, str | None]:
    """((python path, major.minor), libc) from the layers, Python found along ``search``;
    later layers override earlier ones and their whiteouts delete."""
    # Only what a lookup needs: every symlink (any folder on the way may be one: /bin →
    # usr/bin) and the files named python3 or python3.N. Value: link target, None for a file.
    tree: dict[str, str | None] = {}
    libc = None
    for opener in openers:
        added: dict[str, str | None] = {}
        deleted: list[str] = []  # whiteouts: a path, or "dir/" for an opaque folder's contents
        with opener as layer:
            for tar, member in scan_layer(layer):
                name = _clean(member.name)
                folder, _, leaf = name.rpartition("/")
                if leaf.startswith(".wh."):
                    deleted.append(f"{folder}/" if leaf == ".wh..wh..opq" else f"{folder}/{leaf[4:]}".lstrip("/"))
                    continue
                if member.issym():
                    added[name] = member.linkname
                elif (member.isfile() or member.islnk()) and _PYTHON_NAME.fullmatch(leaf):
                    added[name] = None
                elif name in tree:
                    added[name] = _OTHER  # a folder or another file now stands there
                if _MUSL.match(name):
                    libc = "musl"
                    continue
                match = _LIBC.match(name)
                if match and match[2]:
                    libc = f"glibc-{match[2]}.{match[3]}"
                elif match and member.isfile() and member.size <= _MAX_LIBC_READ:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    banner = glibc_banner(data)
                    if banner:
                        libc = f"glibc-{banner[0]}.{banner[1]}"
        for gone in deleted:  # a layer's whiteouts hide the layers below it, not its own files
            prefix = gone if gone.endswith("/") else f"{gone}/"
            for path in [p for p in tree if p == gone or p.startswith(prefix)]:
                del tree[path]
        tree.update(added)
        for path in [p for p, v in tree.items() if v == _OTHER]:
            del tree[path]
    return _find_python(tree, search), libc


def _clean(name: str) -> str:
    """A member name as a path from the root: no leading ./ or /, no trailing /."""
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def _find_python(tree: dict[str, str | None], search: list[str]) -> tuple[str, str | None] | None:
    """(path, major.minor or None) of the first python3 along ``search``; failing that, the
    first folder holding exactly one python3.N (a base without the python3 name)."""
    for folder in search:
        candidate = f"{folder.rstrip('/')}/python3"
        real = _resolve(tree, candidate)
        if tree.get(real, _ABSENT) is None:
            match = _PYTHON_NAME.fullmatch(real.rpartition("/")[2])
            if match and match[1]:
                return candidate, f"3.{match[1]}"
            # A real file named python3: its version from the one python3.N beside it.
            versions = _versions_in(tree, real.rpartition("/")[0])
            return candidate, (versions.pop() if len(versions) == 1 else None)
    for folder in search:
        versions = _versions_in(tree, _resolve(tree, folder))
        if len(versions) == 1:
            version = versions.pop()
            return f"{folder.rstrip('/')}/python{version}", version
    return None


def _versions_in(tree: dict[str, str | None], folder: str) -> set[str]:
    found = set()
    for path in tree:
        where, _, leaf = path.rpartition("/")
        match = _PYTHON_NAME.fullmatch(leaf)
        if where == folder and match and match[1] and tree.get(_resolve(tree, path), _ABSENT) is None:
            found.add(f"3.{match[1]}")
    return found


_MAX_PATH_PARTS = 256  # PATH_MAX is 4096 bytes: a deeper path is a tenant's trap


def _resolve(tree: dict[str, str | None], path: str, hops: int = 40) -> str:
    """``path`` with every symlink in the tree followed (relative to the root; no leading /)."""
    todo = deque(p for p in path.split("/") if p)
    done: list[str] = []
    while todo:
        if len(todo) + len(done) > _MAX_PATH_PARTS:
            return ""  # no real path is this deep: nothing there
        part = todo.popleft()
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        link = tree.get("/".join([*done, part]))
        if link:  # a symlink (None: a file, "": never kept)
            hops -= 1
            if hops < 0:
                return ""  # a loop: nothing there
            if link.startswith("/"):
                done = []
            todo.extendleft(reversed([p for p in link.split("/") if p][:_MAX_PATH_PARTS]))
            continue
        done.append(part)
    return "/".join(done)


def tar_reader(chunks: Iterator[bytes], media_type: str) -> BinaryIO:
    """The tar inside a layer blob of ``media_type`` (gzip, zstd or none), read as it streams;
    ValueError for a media type whose compression is unknown."""
    if media_type not in LAYER_COMPRESSION:
        raise ValueError(f"layer media type {media_type!r} is not a tar, a gzip tar or a zstd tar")
    raw = _ChunkReader(chunks)
    compression = LAYER_COMPRESSION[media_type]
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[return-value]
    return raw  # type: ignore[return-value]


# A base's layers are a tenant's: what one tar header may hold (a pax or GNU long-name record:
# tarfile reads it whole, and parses pax with a regex that is quadratic before Python
# 3.11.10), and how many entries one layer may have (stream mode keeps each one).
MAX_TAR_HEADER_BYTES = 64 * 1024
MAX_LAYER_ENTRIES = 1_000_000


class _BoundedTarInfo(tarfile.TarInfo):
    def _proc_gnulong(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        self._check_header_size()
        return super()._proc_gnulong(tarfile)  # type: ignore[misc]

    def _proc_pax(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        self._check_header_size()
        return super()._proc_pax(tarfile)  # type: ignore[misc]

    def _check_header_size(self) -> None:
        if self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.HeaderError(f"a tar header record of {self.size} bytes (at most {MAX_TAR_HEADER_BYTES})")


def scan_layer(layer: BinaryIO) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Each entry of a layer's tar as it streams, with the tar to read the entry's data from;
    headers and the number of entries bounded (a hostile layer fails as unreadable)."""
    with tarfile.open(fileobj=layer, mode="r|", tarinfo=_BoundedTarInfo) as tar:
        for count, member in enumerate(tar, 1):
            if count > MAX_LAYER_ENTRIES:
                raise tarfile.HeaderError(f"more than {MAX_LAYER_ENTRIES} entries in one layer")
            yield tar, member
            tar.members.clear()  # read once, in order: nothing needs them kept


# What a layer whose bytes are not what its media type says raises while it is read.
UNREADABLE_LAYER = (gzip.BadGzipFile, zlib.error, EOFError, zstandard.ZstdError, tarfile.TarError)


class _ChunkReader:
    """A file-like ``read`` over an iterator of byte chunks (for the streaming readers)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buffer = iter(chunks), b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def detect_java(config: dict, layers: Callable[[], Iterable[Opener]]) -> str | None:
    """The base image's Java: its ``org.mms.java`` label, else the path of a ``java`` launcher
    found in its layers (a later layer's whiteout removes it), else None."""
    labels = (config.get("config") or {}).get("Labels") or {}
    if labels.get("org.mms.java"):
        return labels["org.mms.java"]
    found: set[str] = set()
    for opener in layers():
        with opener as layer:
            for _, member in scan_layer(layer):
                folder, _, base = member.name.rpartition("/")
                if base.startswith(".wh."):
                    gone = f"{folder}/{base[4:]}".lstrip("./")
                    found = {f for f in found if f != gone and not f.startswith(f"{gone}/")}
                elif _JAVA_BIN.match(member.name) and (member.isfile() or member.issym()):
                    found.add(member.name.lstrip("./"))
    return f"/{min(found)}" if found else None


def source_only(requirements: Iterable[str]) -> list[str]:
    """The requirement lines naming a project in ``SOURCE_ONLY``."""
    picked = []
    for line in requirements:
        if "@" in line:  # a direct reference: a file of the account's own, not the index's
            continue
        match = _NAME.match(line)
        if match and re.sub(r"[-_.]+", "-", match[1]).lower() in SOURCE_ONLY:
            picked.append(line)
    return picked


def build_source_wheels(
    requirements: list[str],
    dest: Path,
    log: Log,
    *,
    cache: Path,
    index_url: str,
    ca_bundle: Path | None = None,
    limits: Limits = Limits(),
) -> None:
    """Put a wheel of each ``SOURCE_ONLY`` requirement into ``dest`` (this build's own
    find-links folder).

    The sdist comes from the operator's index, its sha256 checked against the index's; its
    build backend runs contained (``workers.sandbox``: no network, no worker files, limits).
    Wheels are cached under the sdist's digest and the worker's setuptools, exactly the
    build's inputs, so an account can only ever be served what the same bytes build into.
    """
    wanted = source_only(requirements)
    if not wanted:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for line in wanted:
        wheel = _index_wheel(
            line, dest.parent / "sdists", log, cache=cache, index_url=index_url, ca_bundle=ca_bundle, limits=limits
        )
        shutil.copy2(wheel, dest / wheel.name)


def build_wheel_contained(sdist: Path, log: Log, *, cache: Path, limits: Limits, what: str) -> Path:
    """The wheel of ``sdist``: cached under its digest, else built contained and cached."""
    digest = _sha256(sdist)
    cached = _cache_entry(cache, digest)
    wheel = _cached_wheel(cached)
    if wheel is not None:
        log(f"mms: {what}: wheel built before from the same sdist ({digest[:12]})")
        return wheel
    shutil.rmtree(cached, ignore_errors=True)  # absent, or no longer what was recorded
    log(f"mms: {what} is published as source only: building its wheel contained")
    out = sdist.parent / f"built-{digest[:12]}"
    # A copy the sandbox's own uid may read (a fetched file is private to the worker).
    staged = sdist.parent / f"in-{digest[:12]}" / sdist.name
    staged.parent.mkdir(mode=0o755, exist_ok=True)
    shutil.copyfile(sdist, staged)
    staged.chmod(0o644)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-index",
        "--no-build-isolation",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--progress-bar",
        "off",
        "-w",
        "/out",
        f"/in/{sdist.name}",
    ]
    try:
        wheel = run_contained(
            command,
            inputs={staged: f"/in/{sdist.name}"},
            output=out,
            limits=limits,
            log=log,
            what=f"building a wheel of {what}",
            collect=lambda made: _store_wheel(made, cached, limits.file_bytes),
        )
    except SandboxFailed as exc:
        raise BuildFailed("environment", str(exc)) from None
    assert wheel is not None
    return wheel


def localise_requirements(
    requirements: list[str], files: Mapping[str, Path], dest: Path, log: Log, *, cache: Path, limits: Limits
) -> list[str]:
    """Point lines naming a package file under ``REQUIREMENT_FILES`` at the worker's copy;
    a source distribution is built into a wheel first, contained."""
    out = []
    for line in requirements:
        match = _LOCAL_FILE.search(line)
        if match is None:
            out.append(line)
            continue
        name = match["name"]
        if name not in files:
            raise BuildFailed("environment", f"requirement file {name} was not fetched")
        path = files[name]
        if not name.endswith(".whl"):
            dest.mkdir(parents=True, exist_ok=True)
            wheel = build_wheel_contained(path, log, cache=cache, limits=limits, what=name)
            path = dest / wheel.name
            shutil.copy2(wheel, path)
            line = line[: match.start()] + f"file://{path}"  # the wheel is not the sdist named
        else:
            line = line[: match.start()] + f"file://{path}" + line[match.end("name") :]
        out.append(line)
    return out


def _index_wheel(
    line: str, folder: Path, log: Log, *, cache: Path, index_url: str, ca_bundle: Path | None, limits: Limits
) -> Path:
    """The wheel of the newest sdist on the index that ``line`` admits: the one cached under
    the digest the index gives for it, else the sdist downloaded (and checked against that
    digest) and built contained."""
    try:
        requirement = Requirement(line)
    except InvalidRequirement as exc:
        raise BuildFailed("environment", f"requirement {line!r}: {exc}") from None
    if requirement.url:
        raise BuildFailed(
            "environment", f"requirement {line!r}: a direct reference; name a version from the package index"
        )
    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca_bundle) if ca_bundle else True
    try:
        with PyPISimple(endpoint=index_url, session=session) as client:
            page = client.get_project_page(requirement.name)
            candidates = [
                p
                for p in page.packages
                if p.package_type == "sdist"
                and p.version
                and p.digests.get("sha256")
                and _SDIST_NAME.fullmatch(p.filename)
                and requirement.specifier.contains(p.version, prereleases=False)
            ]
            if not candidates:
                raise BuildFailed("environment", f"the package index has no source distribution for {line}")
            best = max(candidates, key=lambda p: Version(p.version))
            digest = best.digests["sha256"].lower()
            wheel = _cached_wheel(_cache_entry(cache, digest))
            if wheel is not None:
                log(f"mms: {line}: wheel built before from {best.filename} ({digest[:12]})")
                return wheel
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / best.filename
            log(f"mms: downloading {best.filename} from the package index")
            client.download_package(best, path, verify=True)
    except (requests.RequestException, NoSuchProjectError, DigestMismatchError, InvalidVersion, OSError) as exc:
        raise BuildFailed("environment", f"cannot download the source of {line}: {_one_line(str(exc))}") from None
    return build_wheel_contained(path, log, cache=cache, limits=limits, what=line)


def _cache_entry(cache: Path, sdist_digest: str) -> Path:
    # The wheel follows from the sdist's bytes and the setuptools that builds it: both in the key.
    return cache / f"{sdist_digest}-setuptools-{metadata.version('setuptools')}"


def _cached_wheel(folder: Path) -> Path | None:
    """The wheel cached in ``folder``, if its recorded digest still matches."""
    try:
        record = json.loads((folder / "wheel.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    wheel = folder / record.get("file", "")
    if not wheel.is_file() or _sha256(wheel) != record.get("sha256"):
        return None
    return wheel


def _store_wheel(out: Path, cached: Path, max_bytes: int) -> Path:
    """Copy the one wheel the contained build made into the cache; its name and size are
    the tenant's choice, so both are checked before either is used."""
    made = list(out.iterdir())
    wheels = [p for p in made if p.suffix == ".whl" and p.is_file() and not p.is_symlink()]
    if len(wheels) != 1 or len(made) != 1:
        raise BuildFailed(
            "environment",
            f"the contained build made {len(wheels)} wheel(s) "
            f"and {len(made) - len(wheels)} other file(s), not one wheel",
        )
    name = wheels[0].name
    try:
        if not _WHEEL_NAME.fullmatch(name):
            raise InvalidWheelFilename(name)
        parse_wheel_filename(name)
    except (InvalidWheelFilename, InvalidVersion):
        raise BuildFailed(
            "environment", f"the contained build made a wheel with an invalid name ({name[:80]!r})"
        ) from None
    if wheels[0].stat().st_size > max_bytes:
        raise BuildFailed("environment", f"the contained build made a wheel larger than {max_bytes >> 20} MiB")
    staging = cached.with_name(f".{cached.name}.{os.getpid()}.{secrets.token_hex(4)}")
    staging.mkdir(parents=True)
    wheel = staging / name
    shutil.copyfile(wheels[0], wheel)  # a copy the worker owns, not the sandbox's file
    (staging / "wheel.json").write_text(json.dumps({"file": name, "sha256": _sha256(wheel)}))
    try:
        staging.rename(cached)
    except OSError:  # another worker cached it first: theirs is as good, once checked
        shutil.rmtree(staging, ignore_errors=True)
    found = _cached_wheel(cached)
    if found is None:
        raise BuildFailed("environment", "the built wheel could not be cached")
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:299] + "…"


def normalise_requirements(lines: Iterable[str]) -> list[str]:
    """Requirement lines without blanks, comments or trailing spaces, order kept."""
    kept = []
    for line in lines:
        text = line.split(" #", 1)[0].strip()
        if text and not text.startswith("#"):
            kept.append(text)
    return kept


def dependency_cache_key(requirements: list[str], target: TargetPython, index_url: str = DEFAULT_INDEX_URL) -> str:
    """What the dependency layer is a function of; equal keys reuse one layer."""
    material = {
        "requirements": requirements,
        # The interpreter's path and the exact libc do not change which wheels install.
        "target": {"version": target.version, "platform": target.platform},
        "index": index_url,
        "uv": metadata.version("uv"),
        "layout": LAYOUT_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def install_dependencies(
    requirements: list[str],
    target: TargetPython,
    dest: Path,
    log: Log,
    *,
    cache_dir: Path | None = None,
    ca_bundle: Path | None = None,
    timeout: float = 1800,
    wheelhouse: Path | None = None,
    index_url: str = DEFAULT_INDEX_URL,
) -> None:
    """Install wheels for ``requirements`` into ``dest`` for ``target``; BuildFailed if not.

    ``wheelhouse`` holds the wheels ``build_source_wheels`` made for source-only projects.
    """
    dest.mkdir(parents=True, exist_ok=True)
    req_file = dest.parent / "requirements.txt"
    req_file.write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")
    command = [
        uv.find_uv_bin(),
        "pip",
        "install",
        "--no-config",
        "--target",
        str(dest),
        "--python-version",
        target.version,
        "--python-platform",
        target.platform,
        "--only-binary",
        ":all:",
        "--no-progress",
        "--index-url",
        index_url,
        "-r",
        str(req_file),
    ]
    if wheelhouse is not None and source_only(requirements):
        command += ["--find-links", str(wheelhouse)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_") or k in _UV_PASSTHROUGH}
    if cache_dir is not None:
        env["UV_CACHE_DIR"] = str(cache_dir)
    else:
        env["UV_NO_CACHE"] = "1"
    if ca_bundle is not None:
        env["SSL_CERT_FILE"] = str(ca_bundle)
    log(f"mms: installing {len(requirements)} requirement(s) as wheels for {target.describe()}")
    output: list[str] = []
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except OSError as exc:
        raise BuildFailed("environment", f"cannot run uv: {exc}") from None
    with proc:
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                output.append(line.rstrip())
                log(f"    {line.rstrip()}")
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:  # a cancelled build (log raised) or a timeout
                proc.kill()
    if code != 0:
        raise BuildFailed("environment", _explain(output, target))
    _rewrite_shebangs(dest / "bin", target.executable)


_UV_PASSTHROUGH = {"UV_NATIVE_TLS", "UV_HTTP_TIMEOUT"}  # never an index: the operator's setting is


def _explain(output: list[str], target: TargetPython) -> str:
    text = "\n".join(output)
    for pattern in _NO_WHEEL:
        match = pattern.search(text)
        if match:
            return (
                f"{match[1]} has no wheel for {target.describe()}; the oci builder installs "
                "wheels only: use the docker builder (builder: docker) to build it from source"
            )
    match = _NOT_FOUND.search(text)
    if match:
        return f"no package named {match[1]} was found in the package index"
    errors = [line.strip() for line in output if line.strip().startswith(("error:", "cause:"))]
    return "installing the requirements failed: " + ("; ".join(errors) or (output or ["uv failed"])[-1])


def _rewrite_shebangs(bin_dir: Path, executable: str = "python3") -> None:
    # uv writes the worker's own interpreter into console scripts; the image's Python runs them.
    if not bin_dir.is_dir():
        return
    shebang = f"#!{executable}\n" if executable.startswith("/") else f"#!/usr/bin/env {executable}\n"
    for script in bin_dir.iterdir():
        if not script.is_file():
            continue
        data = script.read_bytes()
        if data.startswith(b"#!"):
            first, _, rest = data.partition(b"\n")
            if b"python" in first:
                script.write_bytes(shebang.encode() + rest)
