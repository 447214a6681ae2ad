"""The archives of a solved conda environment, downloaded by the service's own fetcher and
checked against their records before anything reads them.

An http(s) package goes through ``workers.fetcher``: its host vetted by the address rules
and the connection pinned to the checked address (a channel host that resolves elsewhere
between the solve and the download is caught here), its size bounded, retried. A ``file://``
channel's package is copied, bounded the same way. Either way the bytes must have the
sha256 the solved record gives (its md5 when only that is given); a package whose record
gives neither is refused. Checked archives are kept under the build cache by digest, so
the next build reads them without a download, checked again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from workers.builders import BuildFailed
from workers.fetcher import FetchError, FetchPolicy, Resolver, fetch

__all__ = ["Archive", "download_archives", "stage"]

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+!-]*\.(?:tar\.bz2|conda)")
_SUBDIR = re.compile(r"[a-z0-9][a-z0-9-]*")
_PARALLEL = 8


@dataclass(frozen=True)
class Archive:
    """One solved package's checked archive on the worker."""

    record: Any  # rattler.RepoDataRecord
    label: str  # name==version=build
    path: Path


def download_archives(
    records: list[Any],
    roots: list[str],
    *,
    cache: Path,
    policy: FetchPolicy,
    resolver: Resolver,
    shown: Callable[[str], str],
) -> list[Archive]:
    """Each record's archive, from under one of ``roots`` (channel URLs ending in ``/``),
    checked against its record; BuildFailed names the package that failed."""
    cache.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(_PARALLEL) as pool:
        jobs = [pool.submit(_archive, r, roots, cache, policy, resolver, shown) for r in records]
        return [job.result() for job in jobs]


def _archive(
    record: Any, roots: list[str], cache: Path, policy: FetchPolicy, resolver: Resolver, shown: Callable[[str], str]
) -> Archive:
    label = f"{record.name.normalized}=={record.version}={record.build}"
    url = str(record.url)
    name, subdir = str(record.file_name), str(record.subdir)
    parts = urlsplit(url)
    if (
        not _FILE_NAME.fullmatch(name)
        or not _SUBDIR.fullmatch(subdir)
        or not parts.path.endswith(f"/{name}")
        or parts.query
        or parts.fragment
        or ".." in unquote(parts.path).split("/")
        or not any(url.startswith(root) for root in roots)
    ):
        raise BuildFailed(
            "environment",
            f"conda: {label} would be downloaded from {shown(url)}, outside the channels it was solved on",
        )
    sha256 = record.sha256.hex() if record.sha256 else None
    md5 = record.md5.hex() if record.md5 else None
    if sha256 is None and md5 is None:
        raise BuildFailed("environment", f"conda: {label}: its channel gives no sha256 or md5 to check it against")
    kept = cache / (f"sha256-{sha256}" if sha256 else f"md5-{md5}") / name
    if kept.is_file() and _matches(kept, sha256, md5):
        return Archive(record, label, kept)
    kept.parent.mkdir(parents=True, exist_ok=True)
    mismatch = BuildFailed(
        "environment",
        f"conda: {label}: the archive at {shown(url)} is not the one its channel's index describes "
        f"({'sha256' if sha256 else 'md5'} mismatch); refused",
    )
    try:
        if parts.scheme == "file":
            _copy_bounded(Path(unquote(parts.path)), kept, policy.max_bytes)
        else:
            fetch(url, kept, policy=policy, expected_sha256=sha256, resolver=resolver)
    except FetchError as exc:
        if exc.reason == "checksum_mismatch":
            raise mismatch from None
        raise BuildFailed("environment", f"conda: downloading {label} failed: {exc}") from None
    if not _matches(kept, sha256, md5):
        kept.unlink(missing_ok=True)
        raise mismatch
    return Archive(record, label, kept)


def _matches(path: Path, sha256: str | None, md5: str | None) -> bool:
    digest = hashlib.sha256() if sha256 else hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == (sha256 or md5)


def _copy_bounded(source: Path, dest: Path, max_bytes: int) -> None:
    """Copy a local channel's file (never through a link) beside ``dest``, then into place."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise FetchError("io_error", f"cannot read {source.name}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as src:
        handle, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out:
                copied = 0
                for block in iter(lambda: src.read(1 << 20), b""):
                    copied += len(block)
                    if copied > max_bytes:
                        raise FetchError("too_large", f"{source.name} exceeds the limit of {max_bytes} bytes")
                    out.write(block)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def stage(archive: Archive, folder: Path) -> Path:
    """``archive`` in ``folder`` for the sandbox: a hard link to the cached copy, else a copy."""
    dest = folder / str(archive.record.subdir) / str(archive.record.file_name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(archive.path, dest)
    except OSError:
        shutil.copyfile(archive.path, dest)
    return dest
