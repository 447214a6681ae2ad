"""Receiving a request body to a temporary file: streamed, size-capped, hashed."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from app.errors import PayloadTooLarge


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
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".upload-")
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
