"""Publish the project's own inference base image from a debootstrap rootfs tarball.

The tarball comes from ``scripts/infra/base-rootfs.sh`` (python3, pip, venv, CA
certificates, tini). An imported tarball has no image config, so PATH, LANG and CMD are
set at import, as ``scripts/infra/base-image.sh`` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path

from workers.builders import BuildFailed, Log
from workers.builders.docker import check_stream, engine_client, registry_host

__all__ = ["BASE_REPOSITORY", "publish_base_image"]

logger = logging.getLogger(__name__)

BASE_REPOSITORY = "mms/inference-base"
_VERSION = re.compile(r"(\d+)\.(\d+)(\.\d+)?")


def publish_base_image(registry: str, rootfs_tar: str | Path, python_version: str, log: Log,
                       auth: Mapping[str, str] | None = None, *, docker_host: str | None = None,
                       today: date | None = None) -> str:
    """Import ``rootfs_tar``, push it as ``py<ver>-<yyyymmdd>`` and ``py<ver>``; return the 1st."""
    match = _VERSION.fullmatch(python_version)
    if not match:
        raise ValueError(f"python_version must look like 3.11 or 3.11.2, not {python_version!r}")
    short = f"{match[1]}.{match[2]}"
    day = today or datetime.now(UTC).date()
    repo = f"{registry.rstrip('/')}/{BASE_REPOSITORY}"
    tags = (f"py{short}-{day:%Y%m%d}", f"py{short}")
    tar = Path(rootfs_tar)
    sha = _sha256(tar)
    changes = [
        f"LABEL org.mms.rootfs.sha256={sha} org.mms.python={python_version} "
        f"org.mms.build-date={day.isoformat()}",
        "ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        'CMD ["python3"]',
    ]
    host = registry_host(f"{repo}:x")
    auth_config = ({"username": auth["username"], "password": auth["password"],
                    "serveraddress": host} if auth else {})
    log(f"mms: importing {tar.name} (sha256 {sha[:12]}) as {repo}:{tags[0]}")
    with engine_client(docker_host) as api, tar.open("rb") as fileobj:
        # A file object, not a path: docker-py retries a str it cannot open as a URL.
        answer = api.import_image(src=fileobj, repository=repo, tag=tags[0], changes=changes)
        _check_import(answer)
        api.tag(f"{repo}:{tags[0]}", repo, tags[1])
        for tag in tags:
            log(f"mms: pushing {repo}:{tag}")
            chunks = api.push(repo, tag=tag, stream=True, decode=True, auth_config=auth_config)
            digest = check_stream("push", chunks, log, host, bool(auth_config)).get("Digest")
            log(f"mms: pushed {repo}:{tag} {digest}")
    logger.info("base_image.published", extra={"image": f"{repo}:{tags[0]}", "digest": digest})
    return f"{repo}:{tags[0]}"


def _check_import(answer: str | bytes) -> None:
    """The import answers JSON lines; an ``error`` among them means it failed."""
    text = answer.decode() if isinstance(answer, bytes) else str(answer)
    for line in text.splitlines():
        try:
            chunk = json.loads(line)
        except ValueError:
            continue
        if isinstance(chunk, dict) and (chunk.get("error") or chunk.get("errorDetail")):
            raise BuildFailed("import", str(chunk.get("error") or chunk["errorDetail"]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
