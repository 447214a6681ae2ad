"""Pulling from the image store: the read side of the OCI Distribution API at ``/v2/``.

``pull`` answers one /v2/<name>/... path: it checks the caller (``app.auth.registry_tokens``)
before it looks anything up, then reads the image store's layout. Failures are
``DistributionError``s, in the spec's shape ``{"errors": [{"code", "message", "detail"}]}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from app.auth.registry_tokens import require_pull
from app.errors import DistributionError
from app.image_store import image_layout
from app.image_store.oci_layout import Descriptor, OciLayout, check_digest, check_tag

if TYPE_CHECKING:
    from app.context import ServiceContext

__all__ = [
    "MAX_TAGS_PAGE",
    "Blob",
    "Manifest",
    "TagsPage",
    "Target",
    "get_blob",
    "get_manifest",
    "list_tags",
    "parse_target",
    "pull",
    "resolve_manifest",
]

MAX_TAGS_PAGE = 1000
_TARGET = re.compile(r"(?P<name>.*)/(?:manifests/(?P<reference>[^/]+)|blobs/(?P<digest>[^/]+)|tags/list)")


@dataclass(frozen=True)
class Target:
    """What a /v2/<name>/... path asks for: ``kind`` is manifests, blobs or tags."""

    kind: str
    repository: str
    reference: str = ""


@dataclass(frozen=True)
class Manifest:
    """A manifest found; ``content`` is None when only its descriptor was asked for (HEAD)."""

    descriptor: Descriptor
    content: bytes | None


@dataclass(frozen=True)
class Blob:
    digest: str
    path: Path
    size: int


@dataclass(frozen=True)
class TagsPage:
    """A page of a repository's tags; ``next_last`` is the ``last`` of the next page, if any."""

    repository: str
    tags: list[str]
    limit: int
    next_last: str | None


def parse_target(path: str) -> Target:
    """The repository and object a /v2 path names; 404 for a path that is no pull route."""
    match = _TARGET.fullmatch(path)
    if match is None:
        raise DistributionError(
            "UNSUPPORTED",
            f"/v2/{path} is not a route of this registry; it serves "
            "/v2/<name>/manifests/<reference>, /v2/<name>/blobs/<digest> and /v2/<name>/tags/list",
            status_code=404,
        )
    if match["reference"] is not None:
        return Target("manifests", match["name"], match["reference"])
    if match["digest"] is not None:
        return Target("blobs", match["name"], match["digest"])
    return Target("tags", match["name"])


def pull(
    session: Session,
    *,
    context: ServiceContext,
    authorization: str | None,
    path: str,
    head: bool = False,
    n: str | None = None,
    last: str | None = None,
) -> Manifest | Blob | TagsPage:
    """What the /v2/``path`` names, if the caller may pull its repository (``head``: a
    manifest's descriptor only; ``n`` and ``last`` page the tags)."""
    target = parse_target(path)
    repository, reference = target.repository, target.reference
    require_pull(session, context=context, authorization=authorization, repository=repository)
    layout = image_layout(context.settings)
    if target.kind == "manifests":
        if head:
            return Manifest(resolve_manifest(layout, repository=repository, reference=reference), None)
        return Manifest(*get_manifest(layout, repository=repository, reference=reference))
    if target.kind == "blobs":
        blob, size = get_blob(layout, repository=repository, digest=reference)
        return Blob(reference, blob, size)
    tags, limit, next_last = list_tags(layout, repository=repository, n=n, last=last)
    return TagsPage(repository, tags, limit, next_last)


# -- reading the layout -------------------------------------------------------------------


def resolve_manifest(layout: OciLayout, *, repository: str, reference: str) -> Descriptor:
    """The manifest a tag or digest names in ``repository``; 400 or 404 otherwise."""
    try:
        if ":" in reference:
            check_digest(reference)
        else:
            check_tag(reference)
    except ValueError as exc:
        code = "DIGEST_INVALID" if ":" in reference else "TAG_INVALID"
        raise DistributionError(code, str(exc)[:300], detail={"reference": reference[:300]}) from None
    descriptor = layout.resolve(repository, reference)
    if descriptor is None:
        raise DistributionError(
            "MANIFEST_UNKNOWN",
            f"manifest {reference} is not in repository {repository}",
            detail={"name": repository, "reference": reference},
        )
    return descriptor


def get_manifest(layout: OciLayout, *, repository: str, reference: str) -> tuple[Descriptor, bytes]:
    """The manifest's descriptor and content."""
    descriptor = resolve_manifest(layout, repository=repository, reference=reference)
    try:
        with layout.open_blob(descriptor.digest) as handle:
            return descriptor, handle.read()
    except FileNotFoundError:
        message = f"manifest {reference} is not in repository {repository}"
        raise DistributionError("MANIFEST_UNKNOWN", message) from None


def get_blob(layout: OciLayout, *, repository: str, digest: str) -> tuple[Path, int]:
    """The file and size of a blob ``repository`` may serve; 400 or 404 otherwise."""
    try:
        check_digest(digest)
    except ValueError as exc:
        raise DistributionError("DIGEST_INVALID", str(exc)[:300], detail={"digest": digest[:300]}) from None
    size = layout.has_blob(digest) if layout.is_linked(repository, digest) else None
    if size is None:
        message = f"blob {digest} is not in repository {repository}"
        raise DistributionError("BLOB_UNKNOWN", message, detail={"digest": digest})
    return layout.blob_path(digest), size


def list_tags(
    layout: OciLayout, *, repository: str, n: str | None, last: str | None
) -> tuple[list[str], int, str | None]:
    """A page of tags in lexical order after ``last``: the tags, the page size, and the
    ``last`` of the next page (None on the final page). Pages hold at most MAX_TAGS_PAGE."""
    limit = MAX_TAGS_PAGE
    if n is not None:
        if not n.isascii() or not n.isdigit():
            message = "n must be a whole number of at least 0"
            raise DistributionError("PAGINATION_NUMBER_INVALID", message, detail={"n": n[:50]})
        # A registry may answer fewer than n; the Link header leads to the rest.
        limit = MAX_TAGS_PAGE if len(n) > 6 else min(int(n), MAX_TAGS_PAGE)
    tags = layout.tags(repository)
    if not tags and not layout.has_repository(repository):
        message = f"repository {repository} is not known"
        raise DistributionError("NAME_UNKNOWN", message, detail={"name": repository})
    if last:
        tags = [tag for tag in tags if tag > last]
    page = tags[:limit]
    more = limit > 0 and len(tags) > limit
    return page, limit, page[-1] if more else None
