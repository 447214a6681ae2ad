"""Receiving a request body to a temporary file: streamed, size-capped, hashed."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from app.errors import PayloadTooLarge
from app.private_files import private_dir

log = logging.getLogger("mms.uploads")
_PREFIX = ".upload-"


@dataclass(frozen=True)
class SpooledBody:
    path: Path
    size: int
    sha256: str


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the upload is larger than the limit of {max_bytes} bytes (MMS_ASSET_MAX_BYTES)",
        code="AssetTooLarge",
    )


async def spool_body(request: Request, *, directory: Path, max_bytes: int) -> SpooledBody:
    """Stream the body to a file in ``directory``; nothing is left behind when it fails."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    private_dir(directory)
    fd, name = tempfile.mkstemp(dir=directory, prefix=_PREFIX)
    path, digest, size = Path(name), hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                digest.update(chunk)
                out.write(chunk)  # page-cache writes: cheaper than a thread hop per chunk
    except BaseException:
        # Includes a client that hangs up half way (ClientDisconnect): no partial file stays.
        path.unlink(missing_ok=True)
        raise
    return SpooledBody(path=path, size=size, sha256=digest.hexdigest())


def remove_stale_uploads(directory: Path, *, older_than_seconds: float) -> int:
    """Delete upload files nobody has written to for ``older_than_seconds``: those of a process
    killed mid-upload (``kill -9`` skips the clean-up above). Judged by age alone, since other
    API processes may share the folder: a file one of them is writing now is recent."""
    cutoff, removed = time.time() - older_than_seconds, 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if (
                entry.name.startswith(_PREFIX)
                and entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime < cutoff
            ):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:  # another process starting removed it first
            continue
    if removed:
        log.info("uploads.stale_removed", extra={"count": removed, "directory": str(directory)})
    return removed
