"""Image builds as the API sees them: create (and ring the queue), read, list, cancel, log."""

from __future__ import annotations

import logging
import time
import uuid

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, lazyload

from app.builds.lifecycle import cancel_build, create_build, delete_build
from app.errors import BadRequest, Conflict, NotFound
from app.image_store.oci_layout import OciLayout
from app.orm import BuildLogChunk, Event, Image, ImageName, Manifest, Service, SubjectKind
from app.queue import BuildQueue, after_commit
from app.schemas.images import ImageCreate
from app.services.accounts import AccountRef
from app.services.lookup import get_in_account, not_found, parse_uuid
from app.services.manifests import get_manifest
from app.services.paging import page_by_name_and_version
from app.services.versioning import claim_next_version

log = logging.getLogger("mms.images")


def create_image(
    session: Session,
    account: AccountRef,
    body: ImageCreate,
    *,
    queue: BuildQueue,
    default_builder: str,
    available_builders: tuple[str, ...] = ("oci", "docker"),
    created_by: str | None,
) -> Image:
    """Record a build as NotStarted and ring the queue once the transaction commits."""
    builder = body.builder or default_builder
    if builder not in available_builders:
        raise BadRequest(
            f"the {builder} builder is not available on this service; use one of: {', '.join(available_builders)}",
            code="BuilderUnavailable",
        )
    manifest = get_manifest(session, account, manifest_id=body.manifestId)
    _, version = claim_next_version(session, ImageName, account_id=account.id, name=body.name)
    image = create_build(
        session,
        account_id=account.id,
        manifest_id=manifest.id,
        name=body.name,
        version=version,
        description=body.description,
        image_type=body.imageType,
        compute_resource_id=body.computeResourceId,
        builder=builder,
        created_by=created_by,
    )
    image_id = str(image.id)
    after_commit(session, lambda: queue.publish_build(image_id))
    return image


def get_image(session: Session, account: AccountRef, *, image_id: str) -> Image:
    """One image of the account, or 404."""
    return get_in_account(session, Image, account, image_id, kind="image")


def get_image_and_version(session: Session, account: AccountRef, *, image_id: str) -> tuple[Image, int]:
    """One image of the account and the id of its newest event (its version), in one query; or 404.

    Its manifest is loaded only if it is read (a poll answered 304 never does).
    """
    parsed = parse_uuid(image_id)
    newest_event = (
        select(func.coalesce(func.max(Event.id), 0))
        .where(Event.subject_id == Image.id, Event.subject_kind == SubjectKind.IMAGE)
        .scalar_subquery()
    )
    row = (
        session.execute(select(Image, newest_event).where(Image.id == parsed).options(lazyload(Image.manifest))).first()
        if parsed
        else None
    )
    if row is None or row[0].account_id != account.id:
        raise not_found("image", image_id)
    return row[0], row[1]


def get_operation(session: Session, account: AccountRef, *, operation_id: str) -> Image:
    """The build an operation id stands for, or 404."""
    parsed = parse_uuid(operation_id)
    image = session.scalars(select(Image).where(Image.operation_id == parsed)).first() if parsed else None
    if image is None or image.account_id != account.id:
        raise NotFound(f"operation '{operation_id}' was not found", code="OperationNotFound")
    return image


def list_images(
    session: Session,
    account: AccountRef,
    *,
    manifest_id: str | None,
    manifest_name: str | None,
    count: int | None,
    skip_token: str | None,
) -> tuple[list[Image], str | None]:
    """A page of images by name, newest version first; filter by manifest id or name."""
    query = select(Image).where(Image.account_id == account.id)
    if manifest_id is not None:
        query = query.where(Image.manifest_id == parse_uuid(manifest_id))
    if manifest_name is not None:
        query = query.where(
            Image.manifest_id.in_(
                select(Manifest.id).where(Manifest.account_id == account.id, Manifest.name == manifest_name)
            )
        )
    return page_by_name_and_version(session, query, Image, count=count, skip_token=skip_token)


def cancel_image(session: Session, account: AccountRef, *, image_id: str) -> Image:
    """Cancel a queued build at once, or ask the worker running it to stop; 409 once it is final."""
    return cancel_build(session, get_image(session, account, image_id=image_id))


def read_log(session: Session, image: Image) -> str:
    """The build log so far (every attempt, in order)."""
    chunks = session.scalars(
        select(BuildLogChunk.text).where(BuildLogChunk.image_id == image.id).order_by(BuildLogChunk.seq)
    )
    return "".join(chunks)


def delete_image(session: Session, account: AccountRef, *, image_id: str, layout: OciLayout | None = None) -> None:
    """Forget an image that is not being built (cancel a running build first); in the
    embedded store (``layout``) its tag goes too, once the deletion commits, so it can no
    longer be pulled (its blobs go at the next garbage collection)."""
    image = get_image(session, account, image_id=image_id)
    # The builders tag <account id>/<lower-cased name>:<version> (workers.pipeline): an image
    # whose name differs only in case shares that tag, and keeps it.
    repository, tag = f"{image.account_id}/{image.name.lower()}", str(image.version)
    shared = session.scalars(
        select(Image.id).where(
            Image.account_id == account.id,
            Image.id != image.id,
            Image.version == image.version,
            func.lower(Image.name) == image.name.lower(),
        )
    ).first()
    _refuse_if_deployed(session, image)
    try:
        with session.begin_nested():
            delete_build(session, image)  # 409 while it runs
    except IntegrityError:  # a service was created on it meanwhile
        _refuse_if_deployed(session, image)
        raise
    if layout is not None and shared is None:
        after_commit(session, lambda: _untag(layout, repository, tag))


def _refuse_if_deployed(session: Session, image: Image) -> None:
    """409 ImageInUse while a service runs ``image``, or its serving generation does during a
    rollout (a roll back goes back to it)."""
    using = or_(Service.image_id == image.id, Service.serving_image_id == image.id)
    names = list(session.scalars(select(Service.name).where(using).order_by(Service.name).limit(3)))
    if names:
        raise Conflict(
            f"image '{image.id}' is deployed as service(s) {', '.join(names)}: "
            "delete them or move them to another image first",
            code="ImageInUse",
        )


def _untag(layout: OciLayout, repository: str, tag: str) -> None:
    try:
        layout.delete_tag(repository, tag)
    except ValueError:  # a name the builders never tagged (e.g. one with odd characters)
        return
    log.info("image.untagged", extra={"repository": repository, "tag": tag})


def drop_orphan_tags(session: Session, layout: OciLayout, *, grace_seconds: float) -> list[str]:
    """Untag the embedded store's images whose record is gone (a crash between a deletion's
    commit and its untag; an account deleted whole) once their tag is ``grace_seconds`` old,
    so a build that has just pushed keeps its tag; the ``repository:tag`` names removed.

    Only tags the builders make are considered, ``<account id>/<lower-cased name>:<version>``
    (workers.pipeline); the published bases and caches under ``mms/`` are not images.
    """
    tagged: dict[tuple[uuid.UUID, str, int], tuple[str, str]] = {}
    for repository in layout.repositories():
        account, _, name = repository.partition("/")
        try:
            account_id = uuid.UUID(account)
        except ValueError:
            continue
        for tag in layout.tags(repository):
            if tag.isdigit():
                tagged[(account_id, name, int(tag))] = (repository, tag)
    if not tagged:
        return []
    accounts = {account_id for account_id, _, _ in tagged}
    recorded = {
        tuple(row)
        for row in session.execute(
            select(Image.account_id, func.lower(Image.name), Image.version).where(Image.account_id.in_(accounts))
        )
    }
    orphans = [ref for key, ref in tagged.items() if key not in recorded]
    removed = layout.delete_stale_tags(orphans, untouched_since=time.time() - grace_seconds)
    for ref_name in removed:
        log.info("image.orphan_tag_removed", extra={"tag": ref_name})
    return removed
